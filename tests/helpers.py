"""Test utilities: tiny random transformers models, and an HF -> Meta/Mistral conversion written independently of
minillama (own q/k permutation, own model-parallel split) so the loaders are checked against something else."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# our ModelArgs for tiny random models built directly (no transformers)
TINY_ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=96, max_seq_len=64)
MOE_ARGS = dict(n_experts=4, n_experts_per_tok=2)


def tiny_model(seed=0, std=0.2, **overrides):
    """A random tiny Transformer, eval mode; weights larger than the default init so differences would show."""
    from minillama import ModelArgs, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**TINY_ARGS, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std) if p.dim() > 1 else p.normal_(1.0, 0.1)
    return model


# transformers config for tiny HF models
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, max_position_embeddings=64, rms_norm_eps=1e-5)


def tiny_hf(kind: str = "llama", seed: int = 0, **overrides):
    """A random LlamaForCausalLM / MistralForCausalLM / MixtralForCausalLM with weights large enough to show errors."""
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    }[kind]
    cfg = {**TINY, **({"num_local_experts": 8, "num_experts_per_tok": 2} if kind == "mixtral" else {}), **overrides}
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.15)
    return model


@torch.no_grad()
def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits.float()


def random_tokens(vocab: int, T: int = 24, B: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


def read_safetensors_dir(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in d."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ---- independent HF -> Meta conversion ----

def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta interleaved rows: Meta row 2i+p of a head is HF row p*hd/2 + i."""
    head_dim = w.shape[0] // n_heads
    half = head_dim // 2
    idx = []
    for h in range(n_heads):
        for r in range(head_dim):
            i, p = divmod(r, 2)
            idx.append(h * head_dim + p * half + i)
    return w[torch.tensor(idx)]


_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
          "self_attn.o_proj": "attention.wo", "input_layernorm": "attention_norm",
          "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "feed_forward.w1",
          "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
          "block_sparse_moe.gate": "feed_forward.gate"}


def hf_dir_to_meta_state(hf_dir: Path, cfg: dict, stacked_experts: bool = False) -> dict[str, torch.Tensor]:
    """Hub-layout HF tensors -> Meta / mistral-inference names (or the first Mixtral release's stacked layout)."""
    sd = read_safetensors_dir(hf_dir)
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if "lm_head.weight" in sd:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        for hf, meta in _NAMES.items():
            if pre + hf + ".weight" in sd:
                out[f"layers.{i}.{meta}.weight"] = sd[pre + hf + ".weight"]
        out[f"layers.{i}.attention.wq.weight"] = unpermute_rows(out[f"layers.{i}.attention.wq.weight"], n_heads)
        out[f"layers.{i}.attention.wk.weight"] = unpermute_rows(out[f"layers.{i}.attention.wk.weight"], n_kv)
        n_exp = cfg.get("num_local_experts", 0)
        if stacked_experts and n_exp:  # layers.N.block_sparse_moe.w1 (E*F, D); w2 stored as (E*F, D) too
            out[f"layers.{i}.block_sparse_moe.gate.weight"] = out.pop(f"layers.{i}.feed_forward.gate.weight")
            for w in ("w1", "w2", "w3"):
                per = [sd[f"{pre}block_sparse_moe.experts.{e}.{w}.weight"] for e in range(n_exp)]
                out[f"layers.{i}.block_sparse_moe.{w}"] = torch.cat([p.T if w == "w2" else p for p in per])
        else:
            for e in range(n_exp):
                for w in ("w1", "w2", "w3"):
                    out[f"layers.{i}.feed_forward.experts.{e}.{w}.weight"] = \
                        sd[f"{pre}block_sparse_moe.experts.{e}.{w}.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _mp_dim(key: str, vocab_split: bool):
    """fairscale's layout: wq/wk/wv/w1/w3/output by rows, wo/w2 by columns, embedding by columns (Llama 1/2) or
    rows (Llama 3, vocab_split), norms copied to every shard (None)."""
    leaf = key.split(".")[-2]
    if key == "tok_embeddings.weight":
        return 0 if vocab_split else 1
    if leaf in ("wq", "wk", "wv", "w1", "w3", "output"):
        return 0
    if leaf in ("wo", "w2"):
        return 1
    return None


def split_model_parallel(state: dict[str, torch.Tensor], n: int, vocab_split: bool) -> list[dict]:
    shards = [{} for _ in range(n)]
    for k, v in state.items():
        dim = _mp_dim(k, vocab_split)
        for r in range(n):
            shards[r][k] = v.clone() if dim is None else v.tensor_split(n, dim=dim)[r].clone()
    return shards


def merge_model_parallel(shards: list[dict], vocab_split: bool) -> dict[str, torch.Tensor]:
    out = {}
    for k in shards[0]:
        dim = _mp_dim(k, vocab_split) if len(shards) > 1 else None
        out[k] = shards[0][k] if dim is None else torch.cat([s[k] for s in shards], dim=dim)
    return out


def write_meta_dir(hf_model, out: Path, n_shards: int = 1, vocab_split: bool = False, params_extra=None,
                   vocab_size=None, stacked_experts: bool = False, safetensors: bool = False) -> Path:
    """Save the HF model, convert it independently, write params.json + consolidated files."""
    cfg = hf_model.config.to_dict()
    hf_dir = out.parent / (out.name + "_hf")
    hf_model.save_pretrained(hf_dir)
    state = hf_dir_to_meta_state(hf_dir, cfg, stacked_experts)
    out.mkdir(parents=True)
    rope = cfg.get("rope_parameters") or {}
    params = {"dim": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"], "n_heads": cfg["num_attention_heads"],
              "n_kv_heads": cfg["num_key_value_heads"], "vocab_size": vocab_size or cfg["vocab_size"],
              "norm_eps": cfg["rms_norm_eps"], "rope_theta": rope.get("rope_theta", cfg.get("rope_theta")),
              "max_seq_len": cfg["max_position_embeddings"]}
    if cfg["model_type"] == "mixtral":
        params.update(head_dim=cfg["hidden_size"] // cfg["num_attention_heads"], hidden_dim=cfg["intermediate_size"],
                      moe={"num_experts": cfg["num_local_experts"], "num_experts_per_tok": cfg["num_experts_per_tok"]})
    else:  # Meta's FFN rule reproduces any width with multiple_of 1 and this multiplier
        params.update(multiple_of=1, ffn_dim_multiplier=(cfg["intermediate_size"] + 0.5) / int(2 * 4 * cfg["hidden_size"] / 3))
    params.update(params_extra or {})
    (out / "params.json").write_text(json.dumps(params))
    if safetensors:
        from safetensors.torch import save_file
        save_file(state, str(out / "consolidated.safetensors"))
    else:
        for r, shard in enumerate(split_model_parallel(state, n_shards, vocab_split)):
            torch.save(shard, out / f"consolidated.{r:02d}.pth")
    return out


def train_tiny_spm(out_dir: Path) -> Path:
    """A real sentencepiece model (a few hundred pieces) written as out_dir/tokenizer.model."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(400)]
    text = out_dir / "spm_corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out_dir / "tokenizer"), vocab_size=200,
                                   model_type="bpe", minloglevel=2)
    text.unlink()
    (out_dir / "tokenizer.vocab").unlink()
    return out_dir / "tokenizer.model"


class Payload:
    """Unpickling this creates `marker`: what a crafted file does to a reader that unpickles (torch.load without
    weights_only, torch.distributed.checkpoint's .metadata)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@torch.no_grad()
def randomize_adapter(model, seed: int = 1, std: float = 0.2, magnitude: float = 0.0, whole: float = 0.0):
    """Random adapter weights in our model or a PEFT one: LoRA factors from N(0, std), DoRA magnitudes scaled by
    1 + magnitude * N(0, 1) (so g != 1 shows), PEFT modules_to_save copies nudged by whole * N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "magnitude" in name:
            if magnitude:
                p.mul_(1 + magnitude * torch.randn(p.shape, generator=g))
        elif "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif "modules_to_save" in name and whole:
            p.add_(torch.randn(p.shape, generator=g) * whole)


def stop_reason(new_tokens, max_new_tokens: int) -> str:
    """"stop" if the row ended on a stop token, "length" if it used all max_new_tokens (stops are not returned)."""
    return "length" if len(new_tokens) >= max_new_tokens else "stop"


class CountingForward:
    """Wraps model.forward to record (rows, tokens) of every call: T > 1 is a prefill, T == 1 a decode step."""

    def __init__(self, model):
        self.calls, self.forward = [], model.forward
        model.forward = self

    def __call__(self, tokens, *args, **kwargs):
        self.calls.append(tuple(tokens.shape))
        return self.forward(tokens, *args, **kwargs)


def tiny_smol_vocab_checkpoint(smollm2_dir: Path, path: Path, seed: int = 0):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer, saved as an HF dir. Large weights keep logits
    far from ties, so batching or another process layout cannot flip an argmax. -> (model, checkpoint dir)"""
    from minillama import ModelArgs, Transformer, save_hf
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=96,
                                  max_seq_len=256)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3) if p.dim() > 1 else torch.nn.init.normal_(p, 1.0, 0.1)
    return model, save_hf(model, path, tokenizer_src=smollm2_dir)
