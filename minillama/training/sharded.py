"""Sharded training state without pickle: each rank writes its part of every tensor to its own safetensors file, rank
0 writes a JSON index; loading copies whatever part of each saved piece overlaps this rank's part, so a run saved on
N processes resumes on any number of processes.

A state is a nested dict (the model and optimizer state dicts of torch.distributed.checkpoint.state_dict) whose
leaves are tensors (plain or DTensor) or JSON values (the optimizer's param_groups). Flat keys join the path with
"/", e.g. "optim/state/model.norm.weight/exp_avg".

    DIR/rank{r}.safetensors   rank r's pieces; a replicated tensor (the optimizer's step count) only on one rank
    DIR/index.json            {"format", "world_size", "tensors": {key: {"shape", "dtype"}},
                               "files": {file: {key: offset}}, "values": {key: JSON}}
A piece is a box of the global tensor: its offset (per dim) is in the index, its shape in the safetensors header.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..checkpoints.shards import Pending, write_safetensors
from ..util.dtypes import dtype_name
from ..util.files import file_digest, read_json, write_json

FORMAT = "minillama-sharded-state/1"
INDEX = "index.json"


def leaves(state: dict, prefix: str = "") -> Iterator[tuple[str, dict, str]]:
    """(flat key, parent dict, key in parent) for every leaf of a nested dict; a non-empty dict is not a leaf."""
    for k, v in state.items():
        if not isinstance(k, str) or "/" in k:
            raise ValueError(f"state key {k!r} under {prefix or '/'}: expected a string without '/'")
        if isinstance(v, dict) and v:
            yield from leaves(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", state, k


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_box(t: torch.Tensor) -> tuple[list[int], list[int], bool]:
    """(offset, shape, owner): where this rank's part of t sits in the global tensor, and whether this rank is the
    one that writes it (a replicated part is written once). Shard follows torch.chunk, as DTensor does."""
    offset, shape = [0] * t.dim(), list(t.shape)
    if not isinstance(t, DTensor):
        return offset, shape, _rank() == 0
    owner, coord = True, t.device_mesh.get_coordinate()
    for mesh_dim, p in enumerate(t.placements):
        if type(p) is Shard:
            n, full = t.device_mesh.size(mesh_dim), shape[p.dim]
            chunk = -(-full // n)
            start = min(coord[mesh_dim] * chunk, full)
            offset[p.dim] += start
            shape[p.dim] = min(start + chunk, full) - start
        elif isinstance(p, Replicate):
            owner = owner and coord[mesh_dim] == 0
        else:
            raise ValueError(f"cannot save a DTensor placed as {p}")
    if list(t.to_local().shape) != shape:
        raise RuntimeError(f"DTensor local shape {list(t.to_local().shape)} is not the expected {shape}")
    return offset, shape, owner


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _json_value(v):
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(f"cannot save a {type(v).__name__} in a training checkpoint (tensors and JSON values only)")


def _like(saved, current):
    """A JSON value back in the container types of the current one (the optimizer's betas are a tuple)."""
    if isinstance(current, tuple) and isinstance(saved, list):
        return tuple(_like(s, c) for s, c in zip(saved, current)) if len(saved) == len(current) else tuple(saved)
    if isinstance(current, list) and isinstance(saved, list) and len(saved) == len(current):
        return [_like(s, c) for s, c in zip(saved, current)]
    if isinstance(current, dict) and isinstance(saved, dict):
        return {k: _like(v, current.get(k)) for k, v in saved.items()}
    return saved


def save_sharded(state: dict, directory: Path) -> dict[str, dict]:
    """Write this rank's pieces (and on rank 0 the index) into directory; a collective on every rank.
    Returns {file name: file_digest} for the files this rank wrote."""
    rank, world = _rank(), dist.get_world_size() if dist.is_initialized() else 1
    tensors, values, pieces, offsets = {}, {}, [], {}
    for key, parent, k in leaves(state):
        v = parent[k]
        if not isinstance(v, torch.Tensor):
            values[key] = _json_value(v)
            continue
        tensors[key] = {"shape": list(v.shape), "dtype": dtype_name(v.dtype)}
        offset, shape, owner = local_box(v)
        if owner and math.prod(shape) > 0:
            local = _local(v)
            pieces.append(Pending(key, tuple(shape), local.dtype, lambda local=local: local))
            offsets[key] = offset
    name, hasher = f"rank{rank}.safetensors", hashlib.sha256()
    write_safetensors(directory / name, pieces, metadata={"format": FORMAT}, hasher=hasher)
    written = {name: {"bytes": (directory / name).stat().st_size, "sha256": hasher.hexdigest()}}
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, (name, offsets))  # between this job's own processes, not from a file
    else:
        gathered = [(name, offsets)]
    if rank == 0:
        write_json(directory / INDEX, {"format": FORMAT, "world_size": world, "tensors": tensors,
                                       "files": dict(gathered), "values": values})
        written[INDEX] = file_digest(directory / INDEX)
    return written


def _bad(where, what: str) -> ValueError:
    return ValueError(f"{where}: {what}")


def read_index(directory: Path) -> dict:
    """index.json, checked against the safetensors headers of the files it names (no tensor data is read)."""
    from safetensors import safe_open

    path = directory / INDEX
    index = read_json(path, "checkpoint index")
    if index.get("format") != FORMAT:
        raise _bad(path, f"format {index.get('format')!r}, expected {FORMAT!r}")
    tensors, files, values = index.get("tensors"), index.get("files"), index.get("values")
    if not (isinstance(tensors, dict) and isinstance(files, dict) and isinstance(values, dict)):
        raise _bad(path, "expected 'tensors', 'files' and 'values' objects")
    covered = {key: 0 for key in tensors}
    for name, offsets in files.items():
        if not (isinstance(name, str) and name.endswith(".safetensors") and "/" not in name and name[0] != "."):
            raise _bad(path, f"bad file name {name!r}")
        file = directory / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing (named by {path})")
        try:
            with safe_open(str(file), framework="pt") as f:
                header = {k: f.get_slice(k).get_shape() for k in f.keys()}
        except Exception as e:  # safetensors raises several types for a damaged file
            raise _bad(file, f"not a readable safetensors file ({type(e).__name__}: {e})") from None
        if not isinstance(offsets, dict) or set(offsets) != set(header):
            raise _bad(path, f"the tensors it lists for {name} are not the ones in that file")
        for key, offset in offsets.items():
            meta = tensors.get(key)
            if not isinstance(meta, dict) or not isinstance(meta.get("shape"), list):
                raise _bad(path, f"{name} holds {key}, which the index does not describe")
            full, shape = meta["shape"], header[key]
            if not (isinstance(offset, list) and len(offset) == len(full) == len(shape)
                    and all(isinstance(o, int) and 0 <= o and o + n <= m for o, n, m in zip(offset, shape, full))):
                raise _bad(path, f"piece of {key} in {name} at {offset} with shape {shape} is outside {full}")
            covered[key] += math.prod(shape)
    for key, meta in tensors.items():
        if covered[key] != math.prod(meta["shape"]):
            raise _bad(path, f"{key}: its pieces hold {covered[key]} of {math.prod(meta['shape'])} values")
    return index


def fill_box(dst: torch.Tensor, dst_offset: list[int], pieces: list[tuple[list[int], list[int], Callable]],
             what: str) -> None:
    """Copy into dst (the box at dst_offset of a global tensor) the overlapping parts of saved pieces
    (offset, shape, read(slices) -> tensor); every value of dst must be covered."""
    covered = 0
    for offset, shape, read in pieces:
        lo = [max(a, b) for a, b in zip(offset, dst_offset)]
        hi = [min(a + n, b + m) for a, n, b, m in zip(offset, shape, dst_offset, dst.shape)]
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        src = tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, offset))
        dst[tuple(slice(l - b, h - b) for l, h, b in zip(lo, hi, dst_offset))].copy_(read(src))
        covered += math.prod(h - l for l, h in zip(lo, hi))
    if covered != dst.numel():
        raise ValueError(f"{what}: the checkpoint's pieces cover {covered} of this rank's {dst.numel()} values")


@torch.no_grad()
def load_sharded(state: dict, directory: Path) -> None:
    """Fill the state's tensors in place (and set its JSON values) from a save_sharded directory."""
    from safetensors import safe_open

    index = read_index(directory)
    found = list(leaves(state))
    saved = set(index["tensors"]) | set(index["values"])
    missing, extra = sorted({k for k, _, _ in found} - saved), sorted(saved - {k for k, _, _ in found})
    if missing or extra:
        raise ValueError(f"{directory / INDEX}: the checkpoint does not fit this run's model and optimizer (missing "
                         f"{missing[:4]}, unexpected {extra[:4]}): resumed with another --model, --lora_rank or "
                         "--lora_targets?")
    handles = {name: safe_open(str(directory / name), framework="pt") for name in index["files"]}
    for key, parent, k in found:
        current = parent[k]
        if not isinstance(current, torch.Tensor):
            if key not in index["values"]:
                raise ValueError(f"{directory / INDEX}: {key} was saved as a tensor, this run has a value")
            parent[k] = _like(index["values"][key], current)
            continue
        if key not in index["tensors"]:
            raise ValueError(f"{directory / INDEX}: {key} was saved as a value, this run has a tensor")
        full = index["tensors"][key]["shape"]
        if list(current.shape) != full:
            raise ValueError(f"{directory / INDEX}: {key} has shape {full}, this run's is {list(current.shape)}")
        pieces = []
        for name, offsets in index["files"].items():
            if key in offsets:
                h = handles[name]
                shape = h.get_slice(key).get_shape()
                whole = lambda sl, h=h, shape=shape: all(s.start == 0 and s.stop == n for s, n in zip(sl, shape))
                read = (lambda sl, h=h, key=key, whole=whole: h.get_tensor(key) if whole(sl) else h.get_slice(key)[sl])
                pieces.append((offsets[key], shape, read))
        offset, _, _ = local_box(current)
        fill_box(_local(current), offset, pieces, f"{directory}: {key}")
