"""Quantized checkpoints: weight-only int8 / int4 (or NF4) weights written once (`minillama-convert SRC DST
--quantize int8`) and loaded as they are, with no float copy of a quantized weight in between.

The directory holds config.json, generation_config.json and the tokenizer files as a Hugging Face one does, and the
tensors in quantized.safetensors (or quantized-0000i-of-0000n.safetensors + quantized.safetensors.index.json): not
model.safetensors, so transformers (which would skip a quantization it does not know and load random weights) finds
no weights and says so. Then:
- config.json carries "quantization_config":
      {"quant_method": "minillama", "quantize": "int4-g128",
       "weights": {"layers.0.attention.wq.weight": {"format": "int4", "group_size": 128}, ...,
                   "output.weight": {"format": "int8"}}}
  "quantize" is the name it was made with; "weights" lists every quantized weight, the rest is float.
- tensors carry minillama's own state-dict names (Meta's, what a float model's state_dict() holds). Float ones
  (embeddings, norms, Mixtral's router, an int4 linear no group divides) are in the checkpoint dtype; each quantized
  weight K is two tensors, scales in the checkpoint dtype:
      int8: K.packed (out, in) int8 codes in -127..127, K.scale (out,):  w = packed * scale[:, None]
      int4: K.packed (out, in/2) uint8, two 0..15 codes per byte, column 2j in the low nibble;
            K.scales_and_zeros (in/G, out, 2):  w[r, c] = (q - 8) * scale[c // G, r] + zero[c // G, r]
  A Mixtral expert stack K = layers.i.feed_forward.experts.w1/w2/w3 (E, out, in) holds its E matrices' tensors
  stacked: K.packed (E, out, in) and K.scale (E, out); or K.packed (E, out, in/2) and K.scales_and_zeros
  (E, in/G, out, 2).
  nf4 ({"format": "nf4"}: layer linears and expert stacks; the head stays float, as QLoRA has it): K.packed,
  K.absmax_q, K.absmax_scale, K.absmax_mean, the four flat arrays quant.NF4Weight holds (uint8 codes, int8 block
  scales, int32 bits of the float32 group scales and means; quant.py has the layout and nf4_saved_layout the
  sizes). They load into the NF4 modules `--quantize nf4` builds, which dequantize to the dtype asked for (None:
  the checkpoint's).
  This int4 layout is the portable one (weight_only.Int4Weight's "plain"); the CPU kernel's own order depends on
  the torch build, so loading repacks the codes for it (an exact reordering).

Codes and scales are those quantize-on-load computes from the same float tensors in the same dtype, so loading
this checkpoint with the dtype it was written in gives the model `load_model(SRC, quantize=...)` gives, bit for bit.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..args import with_rope
from ..model import Transformer
from ..util.files import read_json
from ..quant import NF4Weight, nf4_format, nf4_saved_layout, nf4_tensors, set_nf4_
from ..weight_only import (INT4_GROUPS, QUANTIZE_NAMES, quantize_weight, saved_layout, set_quantized_, weight_format,
                           weight_from_saved)
from .hf_format import hf_key_files, read_hf_args, write_sharded
from .shards import Entry, Pending, Source, TensorFiles, check_finite, index_weight_files, read_entry

QUANT_METHOD = "minillama"
PREFIX, INDEX = "quantized", ".safetensors.index.json"  # quantized.safetensors, quantized.safetensors.index.json
_FLOAT = "float"  # an expected tensor of any floating dtype
_ST_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_ST_NAMES = {torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32"}
SCHEMES = (*QUANTIZE_NAMES, "nf4")  # what --quantize may save


def is_quantized_dir(d: Path) -> bool:
    """config.json beside quantized.safetensors (or its index): what save_quantized writes."""
    return (d / "config.json").is_file() and any((d / f"{PREFIX}{n}").is_file() for n in (".safetensors", INDEX))


def quantized_weight_files(d: Path) -> list[Path]:
    """The quantized dir's weight files; every file its index names must exist."""
    index = d / f"{PREFIX}{INDEX}"
    return index_weight_files(index) if index.is_file() else [d / f"{PREFIX}.safetensors"]


def read_quant_config(d: Path) -> dict:
    """config.json's quantization_config, checked: {"quantize": name, "weights": {key: (format, group)}}."""
    where = f"{d / 'config.json'}: quantization_config"
    q = read_json(d / "config.json").get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{where}: expected an object with quant_method {QUANT_METHOD!r} beside the "
                         f"{PREFIX}*.safetensors files, found {json.dumps(q)[:80]}")
    if q.get("quantize") not in SCHEMES:
        raise ValueError(f"{where}.quantize is {q.get('quantize')!r}, expected one of {', '.join(SCHEMES)}")
    if not isinstance(q.get("weights"), dict):
        raise ValueError(f"{where}.weights: expected an object of weight name -> {{format, group_size}}")
    weights = {}
    for key, spec in q["weights"].items():
        fmt = spec.get("format") if isinstance(spec, dict) else None
        group = spec.get("group_size") if isinstance(spec, dict) else None
        nf4 = q["quantize"] == "nf4"
        if nf4 and not (fmt == "nf4" and group is None):
            raise ValueError(f"{where}.weights[{key!r}] is {spec!r}, expected {{\"format\": \"nf4\"}}")
        if not nf4 and not ((fmt == "int8" and group is None) or (fmt == "int4" and group in INT4_GROUPS)):
            raise ValueError(f"{where}.weights[{key!r}] is {spec!r}, expected {{\"format\": \"int8\"}} or "
                             f"{{\"format\": \"int4\", \"group_size\": one of {', '.join(map(str, INT4_GROUPS))}}}")
        weights[key] = (fmt, group)
    return {"quantize": q["quantize"], "weights": weights}


def scheme_format(quantize: str, key: str, shape: tuple) -> Optional[tuple[str, Optional[int]]]:
    """How scheme `quantize` stores the model tensor `key` of `shape`: (format, group size) or None (float)."""
    return nf4_format(key, shape) if quantize == "nf4" else weight_format(quantize, key, shape)


def _layout(fmt: tuple, shape: tuple, dtype: torch.dtype) -> dict[str, tuple]:
    """{tensor suffix: (shape, dtype)} a weight of `shape` is saved as in format fmt."""
    return nf4_saved_layout(shape) if fmt[0] == "nf4" else saved_layout(fmt, shape, dtype)


# ---- writing ----

class _Parts:
    """One weight, read and quantized when the first of its tensors is written; each tensor is handed out once, so
    nothing of it stays alive after the last."""

    def __init__(self, read: Callable[[], torch.Tensor], fmt: tuple):
        self.read, self.fmt, self.parts = read, fmt, None

    def take(self, suffix: str) -> torch.Tensor:
        if self.parts is None:
            w = self.read()
            self.parts = nf4_tensors(w) if self.fmt[0] == "nf4" else quantize_weight(self.fmt, w)
        return self.parts.pop(suffix)


def stored_dtype(files: TensorFiles, src: Source) -> torch.dtype:
    """A float tensor's dtype as its file stores it, read from the header."""
    name = files.dtype(src.file, src.key)  # 'BF16' in safetensors, 'torch.bfloat16' in .pth
    return _ST_FLOATS.get(name) or getattr(torch, name.removeprefix("torch."))


def _reader(files: TensorFiles, group: list[Entry], dtype: Optional[torch.dtype]) -> Callable[[], torch.Tensor]:
    """Reads one model tensor in `dtype` (None: as stored): one entry, or an expert stack from its slots."""
    def read_one(e: Entry) -> torch.Tensor:
        t = read_entry(files, e)
        t = t.to(dtype or t.dtype)
        check_finite(t, e.sources[0])
        return t

    if group[0].slot is None:
        return lambda: read_one(group[0]).contiguous()
    return lambda: torch.stack([read_one(e) for e in sorted(group, key=lambda e: e.slot)])


def quantized_tensors(plan, quantize: str, dtype: Optional[torch.dtype]) -> tuple[list[Pending], dict]:
    """A float checkpoint's tensors as the quantized checkpoint holds them, each made only when written, and the
    quantization_config naming the quantized weights. plan: checkpoint.CheckpointPlan of the source."""
    groups: dict[str, list[Entry]] = defaultdict(list)
    for e in sorted(plan.entries, key=lambda e: (str(e.sources[0].file), e.target)):  # shard by shard
        groups[e.target].append(e)
    if plan.args.tie_embeddings:  # the head is its own int8 copy of the embedding (the lookup stays float)
        groups["output.weight"] = groups["tok_embeddings.weight"]
    pending, weights = [], {}
    for key, group in groups.items():
        stored = dtype or stored_dtype(plan.files, group[0].sources[0])
        shape = tuple(plan.shapes.get(key) or plan.shapes["tok_embeddings.weight"])
        read = _reader(plan.files, group, dtype)
        fmt = scheme_format(quantize, key, shape)
        if fmt is None:
            pending.append(Pending(key, shape, stored, read))
            continue
        weights[key] = {"format": fmt[0], **({"group_size": fmt[1]} if fmt[1] else {})}
        parts = _Parts(read, fmt)
        for suffix, (part_shape, part_dtype) in _layout(fmt, shape, stored).items():
            pending.append(Pending(f"{key}.{suffix}", part_shape, part_dtype, lambda p=parts, s=suffix: p.take(s)))
    return pending, {"quant_method": QUANT_METHOD, "quantize": quantize, "weights": weights}


def write_quantized_weights(plan, out: Path, quantize: str, dtype: Optional[torch.dtype], max_shard_size,
                            log=lambda s: None) -> dict:
    """Write the quantized tensors of `plan`'s checkpoint into `out` in safetensors shards, one weight read at a
    time; returns the quantization_config for config.json."""
    pending, config = quantized_tensors(plan, quantize, dtype)
    write_sharded(pending, out, max_shard_size, log, prefix=PREFIX)
    return config


# ---- reading ----

def _expected(model: nn.Module, q: dict, cfg: Path) -> tuple[dict, dict]:
    """({tensor name: (shape, dtype or _FLOAT, what it is)}, {quantized key: shape}) for the meta model and the
    checked quantization_config q."""
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        state.pop("output.weight")
    expected, shapes = {}, {}
    for key, fmt in q["weights"].items():
        shape = state.pop(key, None) or (tuple(model.tok_embeddings.weight.shape) if key == "output.weight" else None)
        quantizable = "nf4" if fmt[0] == "nf4" else "int8"
        if shape is None or scheme_format(quantizable, key, shape) is None:
            what = "a layer linear or an expert stack" if fmt[0] == "nf4" else \
                "a layer linear, an expert stack or the output head"
            raise ValueError(f"{cfg}: quantization_config.weights names {key!r}, which is not {what} of the model "
                             "config.json describes")
        if fmt[0] == "int4" and shape[-1] % fmt[1]:
            raise ValueError(f"{cfg}: quantization_config.weights[{key!r}] has group_size {fmt[1]}, which does not "
                             f"divide its rows of {shape[-1]} weights")
        for suffix, (part_shape, part_dtype) in _layout(fmt, shape, torch.float32).items():
            kind = _FLOAT if part_dtype.is_floating_point else part_dtype
            expected[f"{key}.{suffix}"] = (part_shape, kind, f"the {fmt[0]} {suffix} of {key}")
        shapes[key] = shape
    expected.update({k: (s, _FLOAT, "a float tensor") for k, s in state.items()})
    return expected, shapes


def _check_tensors(files: TensorFiles, where: dict[str, Path], expected: dict, d: Path) -> None:
    """Every expected tensor present, with its shape and dtype; nothing else. One line naming the tensor."""
    for name, (shape, kind, what) in expected.items():
        if name not in where:
            raise ValueError(f"{d}: the quantized checkpoint lacks tensor {name} ({what}), which config.json "
                             "and its quantization_config imply")
        file = where[name]
        got, stored = files.shape(file, name), files.dtype(file, name)
        if tuple(got) != tuple(shape):
            raise ValueError(f"{file}: tensor {name} has shape {list(got)}, expected {list(shape)} ({what})")
        if kind == _FLOAT and stored not in _ST_FLOATS:
            raise ValueError(f"{file}: tensor {name} is {stored}, expected a floating-point tensor ({what})")
        if kind != _FLOAT and stored != _ST_NAMES[kind]:
            raise ValueError(f"{file}: tensor {name} is {stored}, expected {_ST_NAMES[kind]} ({what})")
    unknown = sorted(set(where) - set(expected))
    if unknown:
        raise ValueError(f"{d}: tensor(s) {', '.join(unknown[:10])} are not part of the quantized model config.json "
                         "and its quantization_config describe")


def load_quantized(d: Path, device, dtype: Optional[torch.dtype], rope: dict) -> Transformer:
    """The model a quantized checkpoint holds, its quantized linears built from the saved codes and scales. Float
    tensors and scales are cast to dtype (None: as stored). rope: with_rope's overrides. Eval mode."""
    q = read_quant_config(d)
    args = with_rope(read_hf_args(d), rope.get("rope_theta"), rope.get("rope_scaling"), rope.get("max_seq_len"))
    with torch.device("meta"):
        model = Transformer(args)
    expected, shapes = _expected(model, q, d / "config.json")
    weights = q["weights"]
    files = TensorFiles()
    weight_files = quantized_weight_files(d)
    if any(f.suffix != ".safetensors" for f in weight_files):  # an index could name a pickle: never read it
        raise ValueError(f"{d}: a quantized checkpoint is read from .safetensors files only, found "
                         f"{next(f.name for f in weight_files if f.suffix != '.safetensors')}")
    where = hf_key_files(files, weight_files)
    _check_tensors(files, where, expected, d)
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for file in weight_files:  # shard by shard
        for name in files.keys(file):
            t = files.get(file, name).to(device)
            if t.is_floating_point():
                t = t.to(dtype or t.dtype)
                check_finite(t, Source(file, name))
            t = aligned(t)  # after the cast, which may already have copied it
            key, _, suffix = name.rpartition(".")
            if key in weights:
                parts[key][suffix] = t
            else:
                _assign_float(model, name, t)
        files.close(file)
    model.reset_rope(torch.device(device))
    model.tie_weights()  # before the head is swapped for its int8 copy
    nf4_dtype = dtype or model.tok_embeddings.weight.dtype  # what NF4 weights dequantize to: the float tensors'
    for key, fmt in weights.items():
        if fmt[0] == "nf4":
            set_nf4_(model, key, NF4Weight.from_saved(shapes[key], nf4_dtype, parts.pop(key)))
        else:
            set_quantized_(model, key, weight_from_saved(fmt, parts.pop(key)))
    return model.eval()


def aligned(t: torch.Tensor, to: int = 64) -> torch.Tensor:
    """t itself where its data starts on a `to`-byte boundary, else a copy that does (the allocator's). A tensor read
    from a safetensors file maps the file where it lies in it, 8-byte aligned, and torch's packed int8 kernel on an
    AVX-512 CPU reads its weight with aligned loads: it crashed the process on such a tensor."""
    return t if t.device.type != "cpu" or t.data_ptr() % to == 0 else t.clone()


def _assign_float(model: nn.Module, name: str, t: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    setattr(module, leaf, nn.Parameter(t.contiguous(), requires_grad=getattr(module, leaf).requires_grad))
