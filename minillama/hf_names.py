"""Names and layouts shared by the Hugging Face and Meta formats: key mapping and the q/k row permutation.

Meta rotates adjacent feature pairs (x[2i], x[2i+1]); HF's `rotate_half` pairs x[i] with x[i + hd/2]. HF
checkpoints therefore store wq/wk with each head's rows reordered; the permutation below converts between them.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

# Meta module path (inside a layer) -> HF module path (inside model.layers.N)
LAYER_MODULES_META_TO_HF = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.gate": "block_sparse_moe.gate",  # Mixtral router (hub layout)
}
LAYER_MODULES_HF_TO_META = {v: k for k, v in LAYER_MODULES_META_TO_HF.items()}
LAYER_MODULES_HF_TO_META["mlp.gate"] = "feed_forward.gate"  # transformers >= 5 names the router mlp.gate
TOP_META_TO_HF = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
                  "score": "score"}  # a reward model's head (training/reward_model.py), HF's sequence classifier's
TOP_HF_TO_META = {v: k for k, v in TOP_META_TO_HF.items()}

# PEFT / HF target names a user types -> our Meta module leaf names
HF_TARGET_TO_META = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
                     "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "lm_head": "output"}
META_TARGET_TO_HF = {v: k for k, v in HF_TARGET_TO_META.items()}


def _rename(path: str, top: dict, layer_pattern: str, layer_prefix: str, layer_map: dict) -> Optional[str]:
    if path in top:
        return top[path]
    m = re.fullmatch(layer_pattern, path)
    if m and m.group(2) in layer_map:
        return f"{layer_prefix}{m.group(1)}.{layer_map[m.group(2)]}"
    return None


def meta_module_to_hf(path: str) -> Optional[str]:
    """'layers.3.attention.wq' -> 'model.layers.3.self_attn.q_proj'; None if the module has no HF twin."""
    return _rename(path, TOP_META_TO_HF, r"layers\.(\d+)\.(.+)", "model.layers.", LAYER_MODULES_META_TO_HF)


def hf_module_to_meta(path: str) -> Optional[str]:
    """'model.layers.3.self_attn.q_proj' -> 'layers.3.attention.wq'; None if unknown."""
    return _rename(path, TOP_HF_TO_META, r"model\.layers\.(\d+)\.(.+)", "layers.", LAYER_MODULES_HF_TO_META)


def permute_to_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Meta (interleaved pairs) q/k rows -> HF (rotate-half) rows. w (n_heads*hd, ...) -> same shape."""
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def permute_to_meta(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """HF (rotate-half) q/k rows -> Meta (interleaved pairs) rows; inverse of permute_to_hf."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)
