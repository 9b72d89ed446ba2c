"""ModelArgs: the architecture of every supported family, and how to read it from params.json / config.json."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .util.files import read_json
from .rope import check_rope_scaling


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Meta's SwiGLU width rule: 2/3 of 4*dim, times an optional multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelArgs:
    """Architecture only; batch size and cache length are given to `Transformer.setup_cache`."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None = n_heads (MHA); fewer = GQA; 1 = MQA
    head_dim: Optional[int] = None  # None = dim // n_heads
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # FFN width; None = Meta's rule from multiple_of / ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style scaling dict: {"rope_type": "linear"|"dynamic"|"yarn"|"llama3", "factor": ..., ...}
    rope_scaling: Optional[dict] = None
    max_seq_len: int = 4096  # the context the model was trained for (HF max_position_embeddings)
    sliding_window: Optional[int] = None  # Mistral 7B v0.1: keys older than this many positions are not seen
    tie_embeddings: bool = False
    n_experts: int = 0  # 0 = dense SwiGLU FFN; > 0 = Mixtral sparse MoE
    n_experts_per_tok: int = 2
    family: str = "llama"  # llama | llama2 | codellama | llama3 | mistral | mixtral: picks chat format & conversion

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"ModelArgs: dim {self.dim} is not divisible by n_heads {self.n_heads}; give head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if self.n_experts and not 0 < self.n_experts_per_tok <= self.n_experts:
            raise ValueError(f"ModelArgs: n_experts_per_tok {self.n_experts_per_tok} not in 1..{self.n_experts}")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in (None, "default", "linear", "dynamic", "yarn", "llama3"):
                raise ValueError(f"ModelArgs: unknown rope_scaling type {kind!r}; "
                                 "expected linear, dynamic, yarn or llama3")
            if kind in (None, "default"):
                self.rope_scaling = None
            else:
                self.rope_scaling["rope_type"] = kind
                self.rope_scaling.pop("type", None)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelArgs":
        """A named preset with the released model's real shape."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid names: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})


def with_rope(args: ModelArgs, rope_theta: Optional[float] = None, rope_scaling: Optional[dict] = None,
              max_seq_len: Optional[int] = None, source: str = "rope_scaling") -> ModelArgs:
    """args with RoPE overrides, as the same values written into config.json would give; None keeps the checkpoint's.

    rope_scaling {"rope_type": "default"} removes a scaling. yarn/llama3 without original_max_position_embeddings
    take the checkpoint's context as the original one; without max_seq_len, a linear/yarn/llama3 scaling extends the
    context to factor x the original (dynamic NTK keeps it: its trained context is the base of its formula).
    """
    theta, scaling, context = args.rope_theta, args.rope_scaling, args.max_seq_len
    if rope_scaling is not None:
        s = check_rope_scaling(rope_scaling, source)
        inner_theta = s.pop("rope_theta", None)  # transformers >= 5 keeps theta inside rope_parameters
        if inner_theta is not None:
            if rope_theta is not None and float(inner_theta) != float(rope_theta):
                raise ValueError(f"{source}: rope_theta {inner_theta} disagrees with rope_theta {rope_theta}")
            rope_theta = inner_theta
        if s["rope_type"] == "default":
            scaling = None
        else:
            if s["rope_type"] in ("yarn", "llama3"):
                s.setdefault("original_max_position_embeddings", args.max_seq_len)
            scaling = s
            if max_seq_len is None and s["rope_type"] != "dynamic":
                context = int(s["factor"] * s.get("original_max_position_embeddings", args.max_seq_len))
    if rope_theta is not None:
        if not rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {rope_theta}")
        theta = float(rope_theta)
    if max_seq_len is not None:
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        context = int(max_seq_len)
    return dataclasses.replace(args, rope_theta=theta, rope_scaling=scaling, max_seq_len=context)


def rope_settings(args: ModelArgs) -> dict:
    """The RoPE a model runs with, as with_rope's keyword arguments (what an adapter records of its base)."""
    scaling = dict(args.rope_scaling) if args.rope_scaling else {"rope_type": "default"}
    return {"rope_theta": args.rope_theta, "rope_scaling": scaling, "max_seq_len": args.max_seq_len}


_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = {**_LLAMA31_ROPE, "factor": 32.0}

PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-6, max_seq_len=2048, family="llama"),
    "llama-13b": dict(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-6, max_seq_len=2048, family="llama"),
    "llama-33b": dict(dim=6656, n_layers=60, n_heads=52, norm_eps=1e-6, max_seq_len=2048, family="llama"),
    "llama-65b": dict(dim=8192, n_layers=80, n_heads=64, norm_eps=1e-5, max_seq_len=2048, family="llama"),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, max_seq_len=4096, family="llama2"),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, max_seq_len=4096, family="llama2"),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3,
                       max_seq_len=4096, family="llama2"),
    "codellama-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32016, rope_theta=1e6, max_seq_len=16384,
                         family="codellama"),
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                      ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=8192, family="llama3"),
    "llama3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
                       ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=8192, family="llama3"),
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                        ffn_dim_multiplier=1.3, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                        max_seq_len=131072, family="llama3"),
    "llama3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
                         ffn_dim_multiplier=1.3, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                         max_seq_len=131072, family="llama3"),
    "llama3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
                          ffn_dim_multiplier=1.2, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                          max_seq_len=131072, family="llama3"),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                        ffn_dim_multiplier=1.5, rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE,
                        max_seq_len=131072, tie_embeddings=True, family="llama3"),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                        ffn_dim_multiplier=1.0, rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE,
                        max_seq_len=131072, tie_embeddings=True, family="llama3"),
    "mistral-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000,
                       rope_theta=10000.0, max_seq_len=32768, sliding_window=4096, family="mistral"),
    "mixtral-8x7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000,
                         rope_theta=1e6, max_seq_len=32768, n_experts=8, n_experts_per_tok=2, family="mixtral"),
    "mixtral-8x22b": dict(dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, hidden_dim=16384, vocab_size=32768,
                          rope_theta=1e6, max_seq_len=65536, n_experts=8, n_experts_per_tok=2, family="mixtral"),
}


def _check_keys(d: dict, required: tuple[str, ...], source: str):
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{source}: missing required keys {missing}")


# (kind, lowest, highest) of every size a config file gives: checked before anything is built from it. The upper
# bounds are far above any released model and far below what would hang or exhaust memory just building the model.
_INT, _NUM = "an integer", "a number"
HF_BOUNDS = {
    "hidden_size": (_INT, 1, 1 << 17), "num_hidden_layers": (_INT, 1, 1024), "num_attention_heads": (_INT, 1, 4096),
    "num_key_value_heads": (_INT, 1, 4096), "head_dim": (_INT, 1, 1 << 14), "intermediate_size": (_INT, 1, 1 << 20),
    "vocab_size": (_INT, 1, 1 << 22), "max_position_embeddings": (_INT, 1, 1 << 24), "rms_norm_eps": (_NUM, 0, 1),
    "rope_theta": (_NUM, 0, 1e12), "num_local_experts": (_INT, 0, 1024), "num_experts_per_tok": (_INT, 1, 1024),
    "sliding_window": (_INT, 1, 1 << 24),
}
META_BOUNDS = {
    "dim": HF_BOUNDS["hidden_size"], "n_layers": HF_BOUNDS["num_hidden_layers"],
    "n_heads": HF_BOUNDS["num_attention_heads"], "n_kv_heads": HF_BOUNDS["num_key_value_heads"],
    "head_dim": HF_BOUNDS["head_dim"], "hidden_dim": HF_BOUNDS["intermediate_size"], "multiple_of": (_INT, 1, 1 << 16),
    "ffn_dim_multiplier": (_NUM, 0, 64), "norm_eps": HF_BOUNDS["rms_norm_eps"], "rope_theta": HF_BOUNDS["rope_theta"],
    "max_seq_len": HF_BOUNDS["max_position_embeddings"], "sliding_window": HF_BOUNDS["sliding_window"],
}


def check_bounds(config: dict, bounds: dict, source: str) -> None:
    """Every present, non-null key of `bounds` holds a value of its kind within its range (a number: finite and
    above the lowest, e.g. rms_norm_eps > 0); else one ValueError naming the file and the key."""
    for key, (kind, lo, hi) in bounds.items():
        v = config.get(key)
        if v is None:
            continue
        if kind == _INT:
            ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
            rule = f"an integer in [{lo}, {hi}]"
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo < v <= hi
            rule = f"a finite number > {lo} (at most {hi:g})"
        if not ok:
            raise ValueError(f"{source}: {key} must be {rule}, got {v!r}")


FAMILIES = ("llama", "llama2", "codellama", "llama3", "mistral", "mixtral")


def detect_family(config: dict, kind: str) -> str:
    """The model family of a checkpoint config: picks the chat format, the BOS/EOS fallback and conversions.

    kind "hf": a config.json (model_type, vocab_size, rope theta); kind "meta": a Meta/Mistral params.json.
    mixtral: MoE. mistral: Mistral's model type, or Mistral's params.json keys (hidden_dim, head_dim,
    sliding_window). llama3: Meta's 128K vocabulary. llama2 / codellama: Meta's 32K SentencePiece vocabulary (Llama 1
    and 2 share format and tokenizer; Code Llama raised theta to 1e6, +16 infilling tokens). llama: any other
    Llama-architecture model (e.g. SmolLM2), whose tokenizer brings its own chat format.
    """
    vocab = config.get("vocab_size") or -1
    if kind == "meta":
        theta = float(config.get("rope_theta") or 10000.0)
        if config.get("moe"):
            return "mixtral"
        if vocab >= 128000:
            return "llama3"
        if any(k in config for k in ("hidden_dim", "head_dim", "sliding_window")):
            return "mistral"
        return "codellama" if theta >= 1e6 else "llama2"
    if kind != "hf":
        raise ValueError(f"detect_family: kind must be 'hf' or 'meta', got {kind!r}")
    model_type = config.get("model_type", "llama")
    if model_type in ("mixtral", "mistral"):
        return model_type
    theta = float((config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta") or 10000.0)
    if vocab >= 128000:
        return "llama3"
    if vocab in (32000, 32016):  # Meta's SentencePiece vocabulary (+16 infilling tokens for Code Llama)
        return "codellama" if theta >= 1e6 else "llama2"
    return "llama"


def read_family(ckpt_dir) -> Optional[str]:
    """detect_family of the config.json or params.json in a checkpoint dir; None when the dir has neither."""
    d = Path(ckpt_dir)
    if (d / "config.json").is_file():
        return detect_family(read_json(d / "config.json"), "hf")
    if (d / "params.json").is_file():
        return detect_family(read_json(d / "params.json"), "meta")
    return None


def from_meta_params(params: dict, vocab_size: Optional[int] = None, source: str = "params.json") -> ModelArgs:
    """Meta (Llama 1/2/3) or Mistral (`moe`, `hidden_dim`, `head_dim`) params.json -> ModelArgs.

    `vocab_size` fills in Llama 1/2's `vocab_size: -1` (taken from the tokenizer beside the checkpoint).
    """
    _check_keys(params, ("dim", "n_layers", "n_heads"), source)
    check_bounds(params, META_BOUNDS, source)
    vocab = params.get("vocab_size", -1)
    if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int) or vocab > 1 << 22):
        raise ValueError(f"{source}: vocab_size must be an integer (-1: the tokenizer's), got {vocab!r}")
    moe_cfg = params.get("moe") or {}
    if not isinstance(moe_cfg, dict):
        raise ValueError(f"{source}: moe must be an object, got {moe_cfg!r}")
    check_bounds(moe_cfg, {"num_experts": HF_BOUNDS["num_local_experts"],
                           "num_experts_per_tok": HF_BOUNDS["num_experts_per_tok"]}, f"{source}: moe")
    if vocab is None or vocab <= 0:
        if vocab_size is None:
            raise ValueError(f"{source}: vocab_size is {vocab} and no tokenizer.model was found beside it to take it from")
        vocab = vocab_size
    moe = params.get("moe") or {}
    rope_scaling = None
    if params.get("use_scaled_rope"):
        rope_scaling = {**_LLAMA31_ROPE, "factor": float(params.get("rope_scaling_factor") or 8.0)}
    theta = float(params.get("rope_theta") or 10000.0)
    family = detect_family({**params, "vocab_size": vocab}, "meta")
    return ModelArgs(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"), head_dim=params.get("head_dim"), vocab_size=vocab,
        hidden_dim=params.get("hidden_dim"), multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"), norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=theta, rope_scaling=rope_scaling,
        max_seq_len=params.get("max_seq_len", params.get("max_position_embeddings", 131072 if rope_scaling else 4096)),
        sliding_window=params.get("sliding_window"), tie_embeddings=params.get("tie_embeddings", False),
        n_experts=moe.get("num_experts", 0), n_experts_per_tok=moe.get("num_experts_per_tok", 2), family=family,
    )


def from_hf_config(config: dict, source: str = "config.json") -> ModelArgs:
    """Hugging Face LlamaForCausalLM / MistralForCausalLM / MixtralForCausalLM config.json -> ModelArgs."""
    _check_keys(config, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                         "vocab_size"), source)
    check_bounds(config, HF_BOUNDS, source)
    if isinstance((config.get("rope_parameters") or {}), dict):
        check_bounds(config.get("rope_parameters") or {}, {"rope_theta": HF_BOUNDS["rope_theta"]},
                     f"{source}: rope_parameters")
    if not isinstance(config.get("tie_word_embeddings", False), bool):
        raise ValueError(f"{source}: tie_word_embeddings must be true or false, got {config['tie_word_embeddings']!r}")
    model_type = config.get("model_type", "llama")
    if model_type not in ("llama", "mistral", "mixtral"):
        raise ValueError(f"{source}: model_type {model_type!r} is not supported (llama, mistral, mixtral)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError(f"{source}: attention_bias/mlp_bias are not supported (no Llama/Mistral release uses them)")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (silu)")
    # transformers >= 5 writes rope_parameters (theta inside); older versions rope_theta + rope_scaling
    rope = dict(config.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or config.get("rope_theta") or 10000.0
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    vocab = config["vocab_size"]
    family = detect_family(config, "hf")
    return ModelArgs(
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads"), head_dim=config.get("head_dim"), vocab_size=vocab,
        hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=scaling, max_seq_len=config.get("max_position_embeddings", 4096),
        sliding_window=config.get("sliding_window") if model_type != "llama" else None,
        tie_embeddings=config.get("tie_word_embeddings", False),
        n_experts=config.get("num_local_experts", 0) if model_type == "mixtral" else 0,
        n_experts_per_tok=config.get("num_experts_per_tok", 2), family=family,
    )


def to_hf_config(args: ModelArgs, dtype: str = "float32", bos_id: Optional[int] = None,
                 eos_id: Optional[int | list] = None) -> dict:
    """ModelArgs -> a config.json dict that `transformers` loads (Llama, Mistral or Mixtral class)."""
    if args.n_experts:
        arch, model_type = "MixtralForCausalLM", "mixtral"
    elif args.family == "mistral":
        arch, model_type = "MistralForCausalLM", "mistral"
    else:
        arch, model_type = "LlamaForCausalLM", "llama"
    rope_scaling = dict(args.rope_scaling) if args.rope_scaling else None
    config = {
        "architectures": [arch], "model_type": model_type, "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling, "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu", "torch_dtype": dtype, "dtype": dtype,
        "attention_bias": False, "initializer_range": 0.02,
    }
    if model_type != "llama":
        config["sliding_window"] = args.sliding_window
    else:
        config["mlp_bias"] = False
    if args.n_experts:
        config["num_local_experts"] = args.n_experts
        config["num_experts_per_tok"] = args.n_experts_per_tok
    if bos_id is not None:
        config["bos_token_id"] = bos_id
    if eos_id is not None:
        config["eos_token_id"] = eos_id
    return config
