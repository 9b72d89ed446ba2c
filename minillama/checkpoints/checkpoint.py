"""Load any supported checkpoint into a Transformer, and save one as Hugging Face or Meta files.

Loading never holds two copies of the model: the model is built on the meta device, then each checkpoint tensor is
read memory-mapped, converted straight to the target dtype on the target device and assigned in place.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..args import ModelArgs, from_meta_params, to_hf_config, with_rope
from ..util.dtypes import dtype_name, parse_dtype
from ..util.files import atomic_dir, check_dir_writable, read_json, write_json
from ..model import Transformer
from .hf_format import hf_key_files, hf_plan, hf_weight_files, is_hf_dir, read_hf_args, write_hf_weights
from .meta_format import (EXTRAS_NAME, check_meta_split, is_meta_dir, meta_params, meta_plan, meta_weight_files,
                          read_meta_args, write_meta_weights)
from .quantized import is_quantized_dir, load_quantized, read_quant_config, stored_dtype, write_quantized_weights
from .shards import Entry, TensorFiles, check_finite, check_plan, read_entry

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

__all__ = ["load_model", "plan_checkpoint", "read_model_args", "save_hf", "save_meta", "save_quantized",
           "detect_format", "TOKENIZER_FILES"]


def detect_format(path: Union[str, Path]) -> tuple[str, Path]:
    """('hf' | 'meta' | 'quantized', checkpoint dir). A file path inside a checkpoint dir means its dir.
    'quantized' is config.json + quantized*.safetensors: weight-only int8/int4 tensors (quantized.py)."""
    d = Path(path)
    if d.is_file():
        d = d.parent
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if is_quantized_dir(d):
        return "quantized", d
    if is_hf_dir(d):
        return "hf", d
    if is_meta_dir(d):
        return "meta", d
    if (d / "config.json").is_file() or (d / "params.json").is_file():
        return ("hf" if (d / "config.json").is_file() else "meta"), d  # the reader names the missing weights
    raise ValueError(f"{d}: unknown checkpoint format: expected config.json + model*.safetensors / pytorch_model*.bin "
                     "(Hugging Face), params.json + consolidated.*.pth / consolidated.safetensors (Meta, Mistral) or "
                     "config.json + quantized*.safetensors (minillama-convert --quantize)")


def read_model_args(path: Union[str, Path]) -> ModelArgs:
    """The ModelArgs a checkpoint's config describes, without reading any weights (for checks before loading)."""
    fmt, d = detect_format(path)
    if fmt in ("hf", "quantized"):
        return read_hf_args(d)
    files = TensorFiles()
    return read_meta_args(d, files, meta_weight_files(d)[0])  # reads at most a header


@dataclass
class CheckpointPlan:
    """What a checkpoint holds, before any weight is read: its config and, per model tensor, where it lies."""

    dir: Path
    args: ModelArgs  # with the RoPE overrides applied
    files: TensorFiles  # opened lazily; safetensors memory-mapped
    entries: list[Entry]  # checked: every model tensor covered once, shapes as the config says
    shapes: dict[str, tuple]  # model state-dict key -> shape
    head_against_tie: bool = False  # the config ties the head but the file has its own: load_model decides


def plan_checkpoint(path: Union[str, Path], rope_theta: Optional[float] = None, rope_scaling: Optional[dict] = None,
                    max_seq_len: Optional[int] = None) -> CheckpointPlan:
    """Read a checkpoint's config and tensor headers (HF or Meta/Mistral layout) and plan the loading; no weights
    are read. load_model runs this plan; tools that walk a checkpoint tensor by tensor use it directly."""
    fmt, d = detect_format(path)
    if fmt == "quantized":
        raise ValueError(f"{d} holds {read_quant_config(d)['quantize']} weights (a quantized checkpoint); this needs a "
                         "float checkpoint: use the one it was made from")
    files = TensorFiles()
    if fmt == "hf":
        weight_files = hf_weight_files(d)
        args = read_hf_args(d)
        where = hf_key_files(files, weight_files)
        head = "lm_head.weight" in where
    else:
        weight_files, model_parallel = meta_weight_files(d)
        args = read_meta_args(d, files, weight_files)
        head = any("output.weight" in files.keys(f) for f in weight_files)
    tied_in_config = args.tie_embeddings
    if not head and not tied_in_config:
        raise ValueError(f"{d}: the checkpoint has no {'lm_head' if fmt == 'hf' else 'output'}.weight and its "
                         f"config does not tie it to the embeddings: a weight file left out of the index, or a "
                         f"broken save? (a model with tied weights says tie_word_embeddings: true)")
    if head:  # read the file's head; it is dropped in load_model only if it equals the embedding
        args.tie_embeddings = False
    args = with_rope(args, rope_theta, rope_scaling, max_seq_len)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    if args.tie_embeddings:
        shapes.pop("output.weight")
    source = str(d)
    if fmt == "hf":
        entries = hf_plan(where, args, shapes, source)
    else:
        entries = meta_plan(files, weight_files, model_parallel, args, shapes, source)
    check_plan(files, entries, shapes, source)
    return CheckpointPlan(d, args, files, entries, shapes, head_against_tie=head and tied_in_config)


def load_model(path: Union[str, Path], device="cpu", dtype: Optional[Union[torch.dtype, str]] = torch.float32,
               quantize: Optional[str] = None, max_seq_len: Optional[int] = None, rope_theta: Optional[float] = None,
               rope_scaling: Optional[dict] = None) -> Transformer:
    """Build the model a checkpoint describes and load its weights; eval mode. dtype=None keeps the checkpoint's.

    rope_theta / rope_scaling / max_seq_len override the checkpoint's RoPE base, scaling and context, exactly as the
    same values in its config.json would (args.with_rope; rope_scaling {"rope_type": "default"} removes a scaling).
    params.json does not record the context; dynamic NTK and yarn read it.
    quantize: "nf4" (quant.py), or weight-only "int8" / "int4" / "int4-g64" / "int4-g128" for inference
    (weight_only.py): each layer linear is quantized as its tensor arrives, the output head once loaded or tied.
    A checkpoint saved quantized (save_quantized) loads as it was saved; quantize may only repeat its scheme.
    """
    from ..weight_only import QUANTIZE_NAMES, quantize_head_
    if quantize not in (None, "nf4", *QUANTIZE_NAMES):
        raise ValueError(f"quantize={quantize!r}: expected None, 'nf4' or one of {', '.join(QUANTIZE_NAMES)}")
    dtype = parse_dtype(dtype, "load_model: dtype")
    device = torch.device(device)
    fmt, d = detect_format(path)
    if fmt == "quantized":
        saved = read_quant_config(d)["quantize"]
        if quantize not in (None, saved):
            raise ValueError(f"{d} is already quantized as {saved} (its config.json's quantization_config); quantize "
                             f"{quantize} differs: load it as {saved} (or without quantize), or quantize the float "
                             "checkpoint it was made from")
        rope = {"rope_theta": rope_theta, "rope_scaling": rope_scaling, "max_seq_len": max_seq_len}
        return load_quantized(d, device, dtype, rope)
    plan = plan_checkpoint(path, rope_theta, rope_scaling, max_seq_len)
    with torch.device("meta"):
        model = Transformer(plan.args)
    _load_entries(model, plan.files, plan.entries, plan.shapes, device, dtype, quantize)
    if plan.head_against_tie:
        _tie_or_keep_head(model, plan.dir)
    model.reset_rope(device)
    model.tie_weights()
    if quantize in QUANTIZE_NAMES:
        quantize_head_(model, quantize)
    return model.eval()


def _tie_or_keep_head(model: Transformer, d: Path) -> None:
    """The config ties the output head to the embedding but the file has its own: tie when they are equal, else keep
    the file's head (untied) and say so. This is what transformers does; dropping it would change the function."""
    if torch.equal(model.output.weight, model.tok_embeddings.weight):
        model.args.tie_embeddings = True
        return
    warnings.warn(f"{d}: the config ties the output head to the embeddings (tie_word_embeddings), but the checkpoint "
                  "holds a different output head; keeping the checkpoint's head, untied (as transformers does). Set "
                  "tie_word_embeddings to false in its config.json to silence this.", stacklevel=3)


@torch.no_grad()
def _load_entries(model: nn.Module, files: TensorFiles, entries: list[Entry], shapes: dict, device, dtype, quantize):
    """Read entries file by file; stacked expert tensors are assigned once all their slots are filled."""
    quantized = None
    if quantize == "nf4":
        from ..quant import load_quantized_
        quantized = load_quantized_
    elif quantize is not None:
        from ..weight_only import load_weight_only_
        quantized = lambda model, key, t: load_weight_only_(model, key, t, quantize)  # noqa: E731
    stacks: dict[str, tuple[torch.Tensor, int]] = {}  # target -> (buffer, slots filled)
    order = sorted(range(len(entries)), key=lambda i: str(entries[i].sources[0].file))  # shard by shard
    last_file = None
    for i in order:
        e = entries[i]
        if last_file is not None and e.sources[0].file != last_file and len(e.sources) == 1:
            files.close(last_file)  # drop the mapping of a finished HF shard
        last_file = e.sources[0].file
        t = read_entry(files, e)  # checkpoint dtype (a transform runs before the cast: a slice converts only itself)
        t = t.to(device=device, dtype=dtype or t.dtype)
        check_finite(t, e.sources[0])
        if e.slot is None:
            _assign(model, e.target, t.contiguous(), quantized)
            continue
        if e.target not in stacks:
            stacks[e.target] = (torch.empty(shapes[e.target], dtype=t.dtype, device=device), 0)
        buf, n = stacks[e.target]
        buf[e.slot].copy_(t)
        stacks[e.target] = (buf, n + 1)
        if n + 1 == shapes[e.target][0]:
            _assign(model, e.target, stacks.pop(e.target)[0], quantized)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor, quantized):
    if quantized is not None and quantized(model, key, tensor):
        return
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(tensor, requires_grad=old.requires_grad))


# ---- saving ----

def _plain_state(model: Transformer, what: str) -> dict[str, torch.Tensor]:
    """The model's state dict, refusing LoRA / quantized models whose extra tensors no format here can hold."""
    args = model.args
    with torch.device("meta"):
        expected = set(Transformer(args).state_dict())
    state = model.state_dict()
    extra = sorted(set(state) - expected)
    if extra:
        raise ValueError(f"{what}: the model has tensors a plain {what} checkpoint cannot hold ({', '.join(extra[:5])}"
                         f"{' ...' if len(extra) > 5 else ''}): merge LoRA with minillama.lora.layers.merge_lora first, "
                         "or load the model without quantization")
    bad = [k for k, v in state.items() if not v.is_floating_point() or v.is_meta]
    if bad:
        raise ValueError(f"{what}: tensors {', '.join(bad[:5])} are quantized or not loaded; save an unquantized model")
    return state


def copy_tokenizer_files(src: Union[str, Path, None], dst: Path, names=TOKENIZER_FILES) -> list[str]:
    if src is None:
        return []
    src = Path(src)
    src = src.parent if src.is_file() else src
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _bos_eos(args: ModelArgs, tokenizer_src, log) -> tuple[Optional[int], Optional[Union[int, list]]]:
    """BOS and EOS ids for config.json: the tokenizer's when tokenizer_src has a readable one, else the family's."""
    if tokenizer_src is not None:
        from ..tokenizer.tokenizer import load_tokenizer
        try:
            tok = load_tokenizer(tokenizer_src)
        except (ValueError, FileNotFoundError) as e:  # no usable tokenizer there (a bug elsewhere still raises)
            log(f"[no BOS/EOS ids from {tokenizer_src}: {e}; using the {args.family} family's]")
        else:
            stops = list(tok.stop_ids or [tok.eos_id])
            return tok.bos_id, stops[0] if len(stops) == 1 else stops
    if args.family == "llama3" and args.vocab_size >= 128256:
        return 128000, 128001
    if args.family in ("llama", "llama2", "codellama", "mistral", "mixtral") and args.vocab_size in (32000, 32016, 32768):
        return 1, 2
    return None, None


def source_extras(src) -> dict:
    """What a source checkpoint says beyond the architecture and that a conversion must carry over:
    {"pad_token_id", "generation_config"} from an HF dir's config.json / generation_config.json, or from the
    EXTRAS_NAME sidecar save_meta writes beside params.json (which cannot hold them)."""
    if src is None:
        return {}
    d = Path(src)
    d = d.parent if d.is_file() else d
    extras: dict = {}
    if (d / EXTRAS_NAME).is_file():
        extras = dict(read_json(d / EXTRAS_NAME, "checkpoint extras"))
    if (d / "config.json").is_file():
        pad = read_json(d / "config.json").get("pad_token_id")
        if pad is not None:
            extras["pad_token_id"] = pad
    if (d / "generation_config.json").is_file():
        extras["generation_config"] = read_json(d / "generation_config.json")
    return {k: v for k, v in extras.items() if k in ("pad_token_id", "generation_config", "tie_word_embeddings")}


def _hf_configs(args: ModelArgs, dtype: torch.dtype, tokenizer_src, log) -> tuple[dict, dict]:
    """config.json and generation_config.json for a model written in `dtype`, keeping the source's pad_token_id and
    generation_config.json (source_extras)."""
    bos, eos = _bos_eos(args, tokenizer_src, log)
    extras = source_extras(tokenizer_src)
    config = to_hf_config(args, dtype=dtype_name(dtype), bos_id=bos, eos_id=eos)
    gen = {"_from_model_config": True,
           **{k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}}
    gen.update(extras.get("generation_config") or {})  # the source's sampling defaults and ids stay as they were
    if extras.get("pad_token_id") is not None:
        config["pad_token_id"] = extras["pad_token_id"]
        gen.setdefault("pad_token_id", extras["pad_token_id"])
    return config, gen


def save_hf(model: Transformer, path: Union[str, Path], tokenizer_src=None, max_shard_size="5GB",
            overwrite: bool = False, log=None) -> Path:
    """Write a Hugging Face dir (config.json, safetensors shards + index, generation_config.json) in the model's dtype.

    tokenizer_src is the source checkpoint: its tokenizer files are copied, and its pad_token_id and
    generation_config.json (source_extras) are kept."""
    state = _plain_state(model, "save_hf")
    log = log or (lambda s: None)
    check_dir_writable(path, overwrite)
    config, gen = _hf_configs(model.args, model.tok_embeddings.weight.dtype, tokenizer_src, log)
    with atomic_dir(path, overwrite) as tmp:
        write_hf_weights(state, model.args, tmp, max_shard_size, log=log)
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", gen)
        copy_tokenizer_files(tokenizer_src, tmp)
    return Path(path).resolve()


def save_quantized(src: Union[str, Path], path: Union[str, Path], quantize: str, dtype: Optional[torch.dtype] = None,
                   max_shard_size="5GB", overwrite: bool = False, log=None, rope: Optional[dict] = None) -> Path:
    """Write the float checkpoint `src` with its linears (and expert stacks) quantized (weight-only int8 / int4, or
    NF4; quantized.py has the layout), read and written one weight at a time: no model is built. dtype: cast before
    quantizing (None: keep the checkpoint's); scales and float tensors are in it. rope: plan_checkpoint's overrides,
    recorded in config.json."""
    from .quantized import SCHEMES
    if quantize not in SCHEMES:
        raise ValueError(f"save_quantized: quantize {quantize!r}: expected one of {', '.join(SCHEMES)}")
    log = log or (lambda s: None)
    check_dir_writable(path, overwrite)
    plan = plan_checkpoint(src, **(rope or {}))
    embedding = next(e for e in plan.entries if e.target == "tok_embeddings.weight").sources[0]
    stored = dtype or stored_dtype(plan.files, embedding)
    config, gen = _hf_configs(plan.args, stored, plan.dir, log)
    with atomic_dir(path, overwrite) as tmp:
        config["quantization_config"] = write_quantized_weights(plan, tmp, quantize, dtype, max_shard_size, log)
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", gen)
        copy_tokenizer_files(plan.dir, tmp)
    return Path(path).resolve()


def save_meta(model: Transformer, path: Union[str, Path], n_shards: int = 1, tokenizer_src=None, log=None,
              overwrite: bool = False) -> Path:
    """Write params.json + consolidated.NN.pth split into n_shards (Meta layout), or Mistral's consolidated.safetensors
    for Mistral/Mixtral models when n_shards is 1."""
    state = _plain_state(model, "save_meta")
    check_meta_split(model.args, n_shards)
    log = log or (lambda s: None)
    kept = from_meta_params(meta_params(model.args)).max_seq_len
    if kept != model.args.max_seq_len:  # Meta's params.json has no context field; Meta's own code takes it as a flag
        log(f"note: params.json cannot record the context of {model.args.max_seq_len} tokens (reading it back gives "
            f"{kept}); load it with max_seq_len={model.args.max_seq_len} / --max_seq_len")
    extras = {k: v for k, v in source_extras(tokenizer_src).items() if k != "tie_word_embeddings"}
    if model.args.tie_embeddings:  # Meta's consolidated files hold `output` even when tied; the sidecar says so
        extras["tie_word_embeddings"] = True
    with atomic_dir(path, overwrite) as tmp:
        write_meta_weights(state, model.args, tmp, n_shards, log=log)
        if extras:
            write_json(tmp / EXTRAS_NAME, extras)
            log(f"wrote {EXTRAS_NAME} ({', '.join(sorted(extras))}: what params.json cannot hold; minillama reads "
                "it back, Meta's own code ignores it)")
        copy_tokenizer_files(tokenizer_src, tmp)
    return Path(path).resolve()
