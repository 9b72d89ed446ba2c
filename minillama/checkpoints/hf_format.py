"""Hugging Face checkpoints (config.json + safetensors/bin, optionally sharded with an index): reading and writing.

Mixtral experts are read in both layouts: the hub's per-expert `block_sparse_moe.experts.E.w1.weight` and the fused
`mlp.experts.gate_up_proj` (E, 2F, D) / `mlp.experts.down_proj` (E, D, F) of transformers >= 5. We write the hub
layout, which transformers 5 converts on load and every other tool reads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..util.files import read_json, write_json
from ..args import ModelArgs, from_hf_config
from ..hf_names import hf_module_to_meta, meta_module_to_hf, permute_to_hf, permute_to_meta
from .shards import (Entry, Pending, Source, TensorFiles, index_weight_files, raise_unknown,
                     write_safetensors)

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


def is_hf_dir(d: Path) -> bool:
    return (d / "config.json").is_file() and any((d / n).is_file() for n in INDEX_NAMES + SINGLE_NAMES)


def hf_weight_files(d: Path) -> list[Path]:
    """The weight files of an HF dir; every file an index names must exist."""
    for name in INDEX_NAMES:
        index = d / name
        if index.is_file():
            return index_weight_files(index)
    for name in SINGLE_NAMES:
        if (d / name).is_file():
            return [d / name]
    raise FileNotFoundError(f"{d}: no model.safetensors, pytorch_model.bin or index file beside config.json")


def read_hf_args(d: Path) -> ModelArgs:
    return from_hf_config(read_json(d / "config.json"), source=str(d / "config.json"))


def hf_key_files(files: TensorFiles, weight_files: list[Path]) -> dict[str, Path]:
    """Tensor name -> the file holding it (from the files' own headers, not the index)."""
    where = {}
    for f in weight_files:
        for k in files.keys(f):
            where[k] = f
    return where


_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def hf_plan(where: dict[str, Path], args: ModelArgs, shapes: dict[str, tuple], source: str) -> list[Entry]:
    """HF tensor names -> entries that fill our (Meta-named) parameters."""
    entries, unknown = [], []
    for key, file in where.items():
        src = [Source(file, key)]
        if _IGNORED.fullmatch(key) or (key == "lm_head.weight" and args.tie_embeddings):
            continue  # HF itself ignores lm_head when the config ties it
        if m := _EXPERT.fullmatch(key):
            target = f"layers.{m[1]}.feed_forward.experts.{m[3]}"
            if target in shapes and int(m[2]) < shapes[target][0]:
                entries.append(Entry(target, src, shapes[target][1:], slot=int(m[2])))
                continue
        elif m := _FUSED.fullmatch(key):
            prefix = f"layers.{m[1]}.feed_forward.experts"
            if f"{prefix}.w1" in shapes:
                E, F, D = shapes[f"{prefix}.w1"]
                if m[2] == "down_proj":
                    entries.append(Entry(f"{prefix}.w2", src, (E, D, F)))
                else:  # gate rows first, then up
                    entries.append(Entry(f"{prefix}.w1", src, (E, 2 * F, D), transform=lambda t, F=F: t[:, :F]))
                    entries.append(Entry(f"{prefix}.w3", src, (E, 2 * F, D), transform=lambda t, F=F: t[:, F:]))
                continue
        elif key.endswith(".weight") and (meta := hf_module_to_meta(key[:-len(".weight")])):
            target = meta + ".weight"
            if target in shapes:
                entries.append(Entry(target, src, shapes[target], transform=_qk_transform(target, args, permute_to_meta)))
                continue
        unknown.append(key)
    raise_unknown(sorted(unknown), source, _arch(args))
    return entries


def _qk_transform(meta_key: str, args: ModelArgs, permute) -> Optional[Callable]:
    if meta_key.endswith("attention.wq.weight"):
        return lambda t: permute(t, args.n_heads, args.head_dim)
    if meta_key.endswith("attention.wk.weight"):
        return lambda t: permute(t, args.n_kv_heads, args.head_dim)
    return None


def _arch(args: ModelArgs) -> str:
    return "Mixtral" if args.n_experts else ("Mistral" if args.family == "mistral" else "Llama")


# ---- writing ----

def hf_tensors(state: dict[str, torch.Tensor], args: ModelArgs) -> Iterator[Pending]:
    """Our state dict -> HF tensors in file order; each is made (permuted, sliced) only when written."""
    for key, t in state.items():
        if key == "output.weight" and args.tie_embeddings:
            continue
        m = re.fullmatch(r"layers\.(\d+)\.feed_forward\.experts\.(w[123])", key)
        if m:
            for e in range(t.shape[0]):
                name = f"model.layers.{m[1]}.block_sparse_moe.experts.{e}.{m[2]}.weight"
                yield Pending(name, tuple(t.shape[1:]), t.dtype, lambda t=t, e=e: t[e])
            continue
        hf = meta_module_to_hf(key[:-len(".weight")]) if key.endswith(".weight") else None
        if hf is None:
            raise ValueError(f"save_hf: parameter {key} has no Hugging Face name")
        qk = _qk_transform(key, args, permute_to_hf)
        yield Pending(hf + ".weight", tuple(t.shape), t.dtype, (lambda t=t, qk=qk: qk(t)) if qk else (lambda t=t: t))


def parse_size(size) -> int:
    """'5GB' / '500MB' / '2GiB' / 12345 -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '5GB', '500MB', '2GiB'")
    unit = (m[2] or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m[1]) * scale)


def write_hf_weights(state: dict[str, torch.Tensor], args: ModelArgs, out: Path, max_shard_size,
                     log=lambda s: None) -> list[str]:
    """Write safetensors shards (and the index when more than one), streaming one tensor at a time."""
    return write_sharded(list(hf_tensors(state, args)), out, max_shard_size, log)


def write_sharded(tensors: list[Pending], out: Path, max_shard_size, log=lambda s: None,
                  prefix: str = "model") -> list[str]:
    """Tensors into model.safetensors, or model-0000i-of-0000n.safetensors shards of at most max_shard_size plus
    model.safetensors.index.json ("model" being `prefix`); each tensor is made only when its turn comes."""
    limit = parse_size(max_shard_size)
    shards, current, size = [], [], 0
    for p in tensors:
        if current and size + p.nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(p)
        size += p.nbytes
    shards.append(current)
    n = len(shards)
    names = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        total += write_safetensors(out / fname, shard, metadata={"format": "pt"})
        weight_map.update({p.name: fname for p in shard})
        log(f"wrote {fname} ({len(shard)} tensors)")
    if n > 1:
        write_json(out / f"{prefix}.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names
