"""Model + tokenizer (+ adapter) ready for inference, in one process or split by tensor parallelism under torchrun.

    loaded = load_for_inference("Meta-Llama-3.1-8B-Instruct/", LoadOptions(adapter="out/final"))
    loaded.model, loaded.tok, loaded.dist, loaded.tp_group
    loaded.draft = load_draft("Llama-3.2-1B-Instruct/", loaded)   # speculative decoding's draft model (optional)

One process: the model is loaded straight onto the device. Under torchrun with N > 1 processes, each rank reads the
checkpoint on the CPU (safetensors are memory-mapped, so the OS shares the pages), is split by tensor parallelism,
then moves its shard to its device. Bad input raises ValueError / FileNotFoundError naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ..args import rope_settings, with_rope
from ..util.distributed import DistInfo, init_distributed
from ..util.dtypes import parse_dtype
from ..util.files import read_json
from ..rope import runs_past_context

# encoded by a draft's tokenizer and the target's: the ids must agree (same vocabulary size is not enough)
TOKENIZER_PROBE = "Draft check: naïve café, 3.14 * x_1 -> 数据; def f(x):\n\treturn x  # ok"
# Hugging Face's GenerationConfig defaults for what a generation_config.json leaves out
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


def unwrap_merged_lora(model: nn.Module) -> None:
    """Swap merged LoRALinear layers back to nn.Linear so tensor parallelism can split them."""
    from ..linear import Linear
    from ..lora.layers import LoRALinear
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear) and m.merged:
            with torch.device("meta"):
                lin = Linear(m.in_features, m.out_features, bias=False)
            lin.weight = m.weight
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, lin)


def _apply_adapters(model: nn.Module, adapters: dict, must_merge: bool, merge: bool, log) -> None:
    """One adapter is merged in (decoding then costs no more than the base model) unless merge is False; several
    stay side by side, the first in use (lora.set_adapter / set_row_adapters choose)."""
    from ..lora.peft import load_adapter
    from ..lora.merge import merge_lora
    if len(adapters) > 1 and must_merge:
        raise ValueError(f"{len(adapters)} adapters ({', '.join(adapters)}): tensor parallel needs one adapter, merged "
                         "into the weights; run a single process to serve several")
    for name, path in adapters.items():
        load_adapter(model, path, name=name)
    if len(adapters) > 1:
        log(f"[adapters {', '.join(adapters)} loaded side by side]")
        return
    if not (merge or must_merge):
        return
    try:
        merge_lora(model)
    except ValueError as e:
        if must_merge:
            raise ValueError(f"adapter {next(iter(adapters.values()))}: tensor parallel needs the adapter merged, "
                             f"but: {e}") from None
        log(f"[adapter kept unmerged: {e}]")


def rope_overrides(adapters, rope_theta=None, rope_scaling=None, log=None) -> dict:
    """load_model's RoPE keywords: the adapters' recorded base RoPE (if any; several must agree), explicit values
    winning. adapters: a dir, {name: dir}, or None."""
    from ..lora.peft_extras import read_base_rope
    log = log or (lambda msg: None)
    dirs = list(adapters.values()) if isinstance(adapters, dict) else [adapters] if adapters else []
    found = {d: read_base_rope(d) for d in dirs}
    found = {d: r for d, r in found.items() if r}
    if len({json.dumps(r, sort_keys=True) for r in found.values()}) > 1:
        raise ValueError("the adapters were trained on bases with different RoPE settings: "
                         + "; ".join(f"{d}: {r}" for d, r in found.items()))
    rope = dict(next(iter(found.values()), {}))
    explicit = {k: v for k, v in (("rope_theta", rope_theta), ("rope_scaling", rope_scaling)) if v is not None}
    for key, value in explicit.items():
        if key in rope and rope[key] != value:
            log(f"[--{key} {value} replaces the adapter's {rope[key]}]")
    if "rope_scaling" in explicit:
        rope.pop("max_seq_len", None)  # a new scaling derives its own context (args.with_rope)
    return {**rope, **explicit}


def extend_context(model: nn.Module, max_seq_len: Optional[int], log=None) -> None:
    """Raise the model's context to max_seq_len (never lower it: that is only a cap on the caller's side).

    Dynamic NTK keeps its trained context, the base of its formula, and runs past it anyway. A yarn scaling that
    takes its original context from max_seq_len gets the old value written in, so its frequencies stay the same."""
    args = model.args
    if not max_seq_len or max_seq_len <= args.max_seq_len or runs_past_context(args.rope_scaling):
        return
    scaling = None  # keep the checkpoint's
    if args.rope_scaling and args.rope_scaling["rope_type"] == "yarn":
        scaling = {"original_max_position_embeddings": args.max_seq_len, **args.rope_scaling}
    model.args = with_rope(args, rope_scaling=scaling, max_seq_len=max_seq_len)
    model.reset_rope()
    (log or (lambda msg: None))(f"[context extended from {args.max_seq_len} to {max_seq_len} tokens]")


@dataclass
class GenerationDefaults:
    """What a checkpoint's generation_config.json says about decoding, read as transformers reads it."""

    path: Optional[Path]  # the file, or None when the checkpoint has none
    sampling: dict  # temperature / top_p / top_k / repetition_penalty it implies (empty without a file)
    why: str  # how temperature was derived, for --help
    eos_ids: list[int]
    max_new_tokens: Optional[int]
    max_length: Optional[int]


def generation_defaults(ckpt: Union[str, Path]) -> GenerationDefaults:
    """Read CKPT/generation_config.json. As in transformers, sampling is on only with "do_sample": true (else
    greedy, temperature 0), and a sampling knob the file leaves out takes GenerationConfig's default."""
    path = Path(ckpt) / "generation_config.json"
    if not path.is_file():
        return GenerationDefaults(None, {}, "", [], None, None)
    cfg = read_json(path, "generation config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")

    def num(key, kind, ok):
        v = cfg.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v) or (kind is int and v != int(v)):
            raise ValueError(f"{path}: {key} must be a valid {kind.__name__}, got {v!r}")
        return kind(v)

    sampling = {k: num(k, type(d), lambda v: v >= 0) for k, d in HF_SAMPLING_DEFAULTS.items()}
    sampling = {k: HF_SAMPLING_DEFAULTS[k] if v is None else v for k, v in sampling.items()}
    if cfg.get("do_sample") is True:
        why = "do_sample: true"
    else:
        sampling["temperature"] = 0.0
        why = "do_sample: false, so greedy" if "do_sample" in cfg else "no do_sample, so greedy as in transformers"
    eos = cfg.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {cfg['eos_token_id']!r}")
    return GenerationDefaults(path, sampling, why, eos, num("max_new_tokens", int, lambda v: v >= 1),
                              num("max_length", int, lambda v: v >= 2))


@dataclass
class Loaded:
    model: nn.Module
    tok: object
    dist: DistInfo
    tp_group: Optional[object]  # the tensor-parallel process group, None in a single process
    draft: Optional[nn.Module] = None  # speculative decoding's draft model (load_draft), EngineConfig.draft_model


@dataclass
class LoadOptions:
    """How load_for_inference loads a checkpoint (every field optional)."""

    tokenizer: Union[str, Path, None] = None  # tokenizer file or dir (default: the checkpoint dir)
    adapter: object = None  # a PEFT adapter dir, or {name: dir} for several
    quantize: Optional[str] = None  # "nf4"
    dtype: object = None  # None: bfloat16 on CUDA, float32 elsewhere
    device: Optional[str] = None  # None: CUDA when available
    chat_format: Optional[str] = None
    merge_adapter: bool = True  # False keeps a single adapter beside the base weights (one process only)
    rope_theta: Optional[float] = None  # overrides the checkpoint's (and the adapters' recorded base RoPE)
    rope_scaling: Optional[dict] = None
    max_seq_len: Optional[int] = None  # see extend_context


def load_for_inference(ckpt: Union[str, Path], options: Optional[LoadOptions] = None, log=None) -> Loaded:
    """Join torchrun (if any), load tokenizer + model (+ adapters), split it over the processes; eval mode.

    A single adapter is merged in unless options.merge_adapter is False (set_lora_enabled can then switch it off).
    """
    from ..checkpoints import load_model
    from ..tokenizer.tokenizer import load_tokenizer
    o = options or LoadOptions()
    log = log or (lambda msg: None)
    try:
        info = init_distributed(o.device)
    except RuntimeError as e:  # no CUDA, or a device string torch does not know
        raise ValueError(f"device {o.device}: {e}") from None
    dtype = parse_dtype(o.dtype) or (torch.bfloat16 if info.device.type == "cuda" else torch.float32)
    tp = info.world_size > 1
    if tp and o.quantize:
        raise ValueError(f"--quantize {o.quantize} cannot be combined with tensor parallelism (run a single process)")
    tok = load_tokenizer(o.tokenizer or ckpt, chat_format=o.chat_format)
    # the checkpoint's own end-of-answer ids (e.g. Llama 3.1's [128001, 128008, 128009]) stop generation too
    tok.stop_ids = sorted(set(tok.stop_ids) | set(generation_defaults(ckpt).eos_ids))
    adapters = o.adapter if isinstance(o.adapter, dict) else {"default": o.adapter} if o.adapter else {}
    rope = rope_overrides(adapters, o.rope_theta, o.rope_scaling, log)
    model = load_model(ckpt, device="cpu" if tp else info.device, dtype=dtype, quantize=o.quantize, **rope)
    extend_context(model, o.max_seq_len, log)
    if rope:
        log(f"[RoPE: {rope_settings(model.args)}]")
    if adapters:
        _apply_adapters(model, adapters, must_merge=tp, merge=o.merge_adapter, log=log)
    group = None
    if tp:
        from .tensor_parallel import apply_tensor_parallel, tp_mesh
        unwrap_merged_lora(model)
        mesh = tp_mesh(info.device)
        try:
            apply_tensor_parallel(model, mesh)
        except ValueError as e:
            raise ValueError(f"{ckpt}: {e}") from None
        model.to(info.device)
        group = mesh.get_group()
    if tok.vocab_size > model.args.vocab_size:
        log(f"[warning: tokenizer has {tok.vocab_size} tokens, the model {model.args.vocab_size}]")
    return Loaded(model.eval(), tok, info, group)


def load_draft(ckpt: Union[str, Path], target: Loaded, log=None) -> nn.Module:
    """A draft model for speculative decoding (EngineConfig(speculate="draft", draft_model=...)): ckpt loaded in the
    target's dtype on its device, without adapters. Its vocabulary must be the target's, and its tokenizer (when the
    dir has one) must encode as the target's does."""
    from ..checkpoints import load_model
    from ..tokenizer.tokenizer import find_tokenizer_file, load_tokenizer
    if target.tp_group is not None:
        raise ValueError(f"{ckpt}: a draft model cannot be combined with tensor parallelism (run a single process)")
    file = find_tokenizer_file(Path(ckpt), required=False)
    if file is not None:
        own = load_tokenizer(file)
        if own.vocab_size != target.tok.vocab_size or own.encode(TOKENIZER_PROBE) != target.tok.encode(TOKENIZER_PROBE):
            raise ValueError(f"{ckpt}: its tokenizer ({own.vocab_size} tokens) is not the target's "
                             f"({target.tok.vocab_size} tokens): a draft must share the target's tokenizer")
    model = load_model(ckpt, device=target.dist.device, dtype=target.model.tok_embeddings.weight.dtype)
    if model.args.vocab_size != target.model.args.vocab_size:
        raise ValueError(f"{ckpt}: the draft's vocabulary has {model.args.vocab_size} tokens, the target's "
                         f"{target.model.args.vocab_size}: a draft must share the target's tokenizer")
    n = sum(p.numel() for p in model.parameters())
    (log or (lambda msg: None))(f"[draft model {ckpt}: {n / 1e6:.0f}M parameters, {model.args.n_layers} layers]")
    return model


def broadcast_object(obj, info: DistInfo):
    """Rank 0's obj on every rank (e.g. a line read from stdin); a no-op in one process."""
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank0_print(info: DistInfo, *a, **kw) -> None:
    if info.is_rank0:
        print(*a, **kw, flush=True)
