"""Read a llama-architecture GGUF file (Llama, Mistral, Mixtral) as a Hugging Face config + float32 state dict."""

import re
from pathlib import Path

import numpy as np
import torch

from ..hf_names import permute_to_hf

# llama.cpp tensor name -> HF LlamaForCausalLM name, inside blk.N / model.layers.N and at the top level.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_MOE_NAMES = {"ffn_gate_inp.weight": "block_sparse_moe.gate.weight"}  # Mixtral router (E, D)
# stacked experts (E, out, in) -> the hub's per-expert names block_sparse_moe.experts.E.wN.weight
_EXPERT_NAMES = {"ffn_gate_exps.weight": "w1", "ffn_down_exps.weight": "w2", "ffn_up_exps.weight": "w3"}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def open_gguf(path):
    """A memory-mapped gguf.GGUFReader; `gguf` is imported lazily so minillama itself does not need it."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # counts or offsets past the file's end, a bad magic: the reader raises many kinds
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'malformed header'})") from None


def read_metadata(reader) -> dict:
    """All key/value fields of the file as plain Python values (str, int, float, bool, or lists of them)."""
    try:
        return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    except Exception as e:
        raise ValueError(f"{getattr(reader, 'path', 'GGUF file')}: malformed metadata ({type(e).__name__}: {e})") \
            from None


def _f32(value: float) -> float:
    """The shortest decimal that is the same float32, so 1e-5 stored as float32 reads back as 1e-05."""
    return float(str(np.float32(value)))


def hf_config(meta: dict, tensor_names) -> dict:
    """A transformers LlamaConfig dict from GGUF metadata; embeddings are tied when there is no output.weight."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF general.architecture is {arch!r}; only 'llama' is supported")

    def get(key):
        if f"llama.{key}" not in meta:
            raise ValueError(f"GGUF metadata is missing 'llama.{key}'")
        return meta[f"llama.{key}"]

    from ..args import HF_BOUNDS, check_bounds
    sizes = {"hidden_size": get("embedding_length"), "num_attention_heads": get("attention.head_count"),
             "intermediate_size": get("feed_forward_length"), "num_hidden_layers": get("block_count"),
             "max_position_embeddings": get("context_length"),
             "num_key_value_heads": meta.get("llama.attention.head_count_kv"),
             "rms_norm_eps": get("attention.layer_norm_rms_epsilon"), "rope_theta": meta.get("llama.rope.freq_base")}
    check_bounds(sizes, HF_BOUNDS, "GGUF metadata")  # before anything is sized from them
    dim, n_heads = sizes["hidden_size"], sizes["num_attention_heads"]
    head_dim = meta.get("llama.attention.key_length", dim // n_heads)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError("GGUF llama.rope.dimension_count differs from head dim; partial RoPE is not supported")
    if "rope_freqs.weight" in set(tensor_names):
        raise ValueError("GGUF has rope_freqs.weight (Llama 3.1's RoPE scaling); reading it back is not supported")
    vocab_size = meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    token_id = lambda name: meta.get(f"tokenizer.ggml.{name}_token_id")  # noqa: E731
    n_experts = meta.get("llama.expert_count", 0)
    moe = {"num_local_experts": n_experts, "num_experts_per_tok": meta.get("llama.expert_used_count", 2)}
    return {
        "architectures": ["MixtralForCausalLM" if n_experts else "LlamaForCausalLM"],
        "model_type": "mixtral" if n_experts else "llama",
        **(moe if n_experts else {}),
        "hidden_size": dim,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta),
        "max_position_embeddings": get("context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in set(tensor_names),
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": token_id("bos"),
        "eos_token_id": token_id("eos"),
        "pad_token_id": token_id("padding"),
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _rope_scaling(meta: dict):
    """HF rope_scaling from llama.rope.scaling.* (linear and yarn, the types llama.cpp's llama architecture has)."""
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"GGUF llama.rope.scaling.type is {kind!r}; expected none, linear or yarn")
    scaling = {"rope_type": kind, "factor": _f32(meta["llama.rope.scaling.factor"])}
    if kind == "yarn":
        scaling["original_max_position_embeddings"] = meta["llama.rope.scaling.original_context_length"]
    return scaling


def hf_name(gguf_name: str) -> str:
    """HF name of a llama.cpp tensor: blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    names = {**_LAYER_NAMES, **_MOE_NAMES}
    if m is None or m.group(2) not in names:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}"


def hf_state_dict(reader, config: dict, log=None) -> dict:
    """Dequantized float32 HF state dict; q/k rows in HF order; no lm_head when embeddings are tied."""
    from gguf import dequantize

    # llama.cpp's converter permutes HF q/k rows into Meta's interleaved-pair order, so going back is Meta -> HF
    # (the same reshape transformers' GGUF loader undoes with `_reverse_permute_weights`).
    n_heads = {"attn_q.weight": config["num_attention_heads"], "attn_k.weight": config["num_key_value_heads"]}
    state = {}
    for i, t in enumerate(reader.tensors):
        expert = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        expert = _EXPERT_NAMES.get(expert.group(2)) if expert else None
        name = None if expert else hf_name(t.name)
        # Copy: F32 tensors come back as read-only views of the memory-mapped file.
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32, order="C")
        expected = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims fastest-first
        if w.shape != expected:
            raise ValueError(f"GGUF tensor {t.name}: dequantized shape {w.shape}, expected {expected}")
        w = torch.from_numpy(w)
        if expert:  # (E, out, in) -> one HF tensor per expert
            layer = t.name.split(".")[1]
            for e in range(w.shape[0]):
                state[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{expert}.weight"] = w[e].clone()
            continue
        if (kind := t.name.split(".", 2)[-1]) in n_heads:
            w = permute_to_hf(w, n_heads[kind], config["head_dim"])  # (n_heads*hd, dim)
        state[name] = w.contiguous()
        if log is not None and (i + 1) % 50 == 0:
            log(f"  dequantized {i + 1}/{len(reader.tensors)} tensors")
    per_layer = set(_LAYER_NAMES.values())
    if n_experts := config.get("num_local_experts", 0):
        per_layer -= {v for k, v in _LAYER_NAMES.items() if k.startswith("ffn_") and k != "ffn_norm.weight"}
        per_layer |= set(_MOE_NAMES.values())
        per_layer |= {f"block_sparse_moe.experts.{e}.{w}.weight" for e in range(n_experts) for w in ("w1", "w2", "w3")}
    expected = {f"model.layers.{n}.{v}" for n in range(config["num_hidden_layers"]) for v in per_layer}
    expected |= {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= set() if config["tie_word_embeddings"] else {"lm_head.weight"}
    if missing := sorted(expected - state.keys()):
        raise ValueError(f"GGUF file lacks tensors for {missing[:5]} ({len(missing)} missing)")
    return state
