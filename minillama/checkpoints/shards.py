"""Reading checkpoint files lazily (.safetensors memory-mapped, .pth/.bin mmap'd) and the plan that maps their
tensors onto the model's parameters. Shared by the Hugging Face and Meta/Mistral readers."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..util.files import disk_full_names, read_json


def first_line(e: BaseException) -> str:
    """An exception's message up to its first line break (torch.load explains itself in paragraphs)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


@dataclass
class Source:
    """One tensor in one file."""

    file: Path
    key: str


@dataclass
class Entry:
    """How one model tensor (or one expert's slice of a stacked tensor) is read from the checkpoint."""

    target: str  # model state-dict key, e.g. 'layers.0.attention.wq.weight'
    sources: list[Source]  # more than one: model-parallel shards, concatenated along cat_dim
    expected: tuple  # shape on disk after concatenation, before transform
    cat_dim: int = 0
    slot: Optional[int] = None  # expert index into a stacked (E, ...) parameter; None = the whole tensor
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # q/k permutation, slice, transpose


class TensorFiles:
    """Opens each checkpoint file once; reads headers (keys, shapes) without touching the tensor data."""

    def __init__(self):
        self._open: dict[Path, object] = {}

    def _handle(self, file: Path):
        if file not in self._open:
            if not file.is_file():
                raise FileNotFoundError(f"checkpoint file {file} does not exist")
            try:
                if file.suffix == ".safetensors":
                    from safetensors import safe_open
                    self._open[file] = safe_open(str(file), framework="pt", device="cpu")
                else:
                    self._open[file] = _torch_load(file)
            except (FileNotFoundError, KeyboardInterrupt):
                raise
            except Exception as e:  # safetensors and torch raise many types for a corrupt file
                raise ValueError(f"could not read checkpoint file {file} (truncated or corrupt?): "
                                 f"{type(e).__name__}: {first_line(e)}") from e
        return self._open[file]

    def keys(self, file: Path) -> list[str]:
        h = self._handle(file)
        return list(h.keys())

    def shape(self, file: Path, key: str) -> tuple:
        h = self._handle(file)
        if isinstance(h, dict):
            return tuple(h[key].shape)
        return tuple(h.get_slice(key).get_shape())

    def dtype(self, file: Path, key: str) -> str:
        """The tensor's dtype name as stored ('BF16', 'I32' in safetensors; 'torch.int32' in .pth)."""
        h = self._handle(file)
        return str(h[key].dtype) if isinstance(h, dict) else h.get_slice(key).get_dtype()

    def get(self, file: Path, key: str) -> torch.Tensor:
        h = self._handle(file)
        try:
            return h[key] if isinstance(h, dict) else h.get_tensor(key)
        except Exception as e:
            raise ValueError(f"could not read tensor {key} from {file} (truncated or corrupt?): "
                             f"{type(e).__name__}: {first_line(e)}") from e

    def close(self, file: Path):
        self._open.pop(file, None)


def _torch_load(file: Path) -> dict:
    try:
        sd = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # only the legacy (pre-zip) format cannot be mmap'd; anything else is corrupt
            raise
        sd = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"expected a dict of tensors, found {type(sd).__name__}")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def disk_shape(files: TensorFiles, entry: Entry) -> tuple:
    """The entry's shape on disk: model-parallel pieces concatenated along cat_dim; errors name the files."""
    shapes = [files.shape(s.file, s.key) for s in entry.sources]
    if len(shapes) == 1:
        return shapes[0]
    d = entry.cat_dim
    first = shapes[0]
    for s, shape in zip(entry.sources, shapes):
        if len(shape) != len(first) or any(a != b for i, (a, b) in enumerate(zip(shape, first)) if i != d):
            raise ValueError(f"model-parallel shards disagree on {entry.sources[0].key}: {s.file.name} has {shape}, "
                             f"{entry.sources[0].file.name} has {first} (only dim {d} may differ)")
    return tuple(sum(s[d] for s in shapes) if i == d else n for i, n in enumerate(first))


def read_entry(files: TensorFiles, entry: Entry) -> torch.Tensor:
    """One entry's tensor in the checkpoint's dtype: its pieces read (memory-mapped), concatenated, transformed
    (before any cast, so a slice of a stacked tensor converts only itself)."""
    pieces = [files.get(s.file, s.key) for s in entry.sources]
    t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=entry.cat_dim)
    return entry.transform(t) if entry.transform is not None else t


def check_finite(t: torch.Tensor, src: Source) -> None:
    """A weight holding NaN or inf makes every output garbage: refuse it on load, naming the tensor and its file
    (one pass over the tensor on its device, cheap beside reading it)."""
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{src.file}: tensor {src.key} holds NaN or infinite values; the checkpoint is damaged "
                         "(a diverged training run or a broken save?)")


def check_plan(files: TensorFiles, entries: list[Entry], shapes: dict[str, tuple], source: str):
    """Every model tensor (and every expert slot) covered exactly once, and every shape as the config says."""
    covered: dict[str, set] = {}
    for e in entries:
        for src in e.sources:
            kind = files.dtype(src.file, src.key)
            if not (kind.startswith(("F", "BF")) or kind in _FLOAT_NAMES):
                raise ValueError(f"{src.file}: tensor {src.key} is {kind}, expected a floating-point weight "
                                 "(an integer tensor would be cast silently into nonsense: a quantized export or a "
                                 "damaged file?)")
        got = disk_shape(files, e)
        if got != tuple(e.expected):
            where = e.sources[0].file if len(e.sources) == 1 else f"{len(e.sources)} shards in {source}"
            raise ValueError(f"{where}: tensor {e.sources[0].key} has shape {list(got)}, expected "
                             f"{list(e.expected)} for {e.target} from the config in {source}")
        covered.setdefault(e.target, set()).add(e.slot)
    missing = []
    for key, shape in shapes.items():
        slots = covered.get(key, set())
        if None in slots:
            continue
        if slots and slots == set(range(shape[0])):
            continue
        missing.append(key if not slots else f"{key} (experts {sorted(set(range(shape[0])) - slots)})")
    if missing:
        raise ValueError(f"{source}: checkpoint is missing {len(missing)} tensor(s) the config needs: "
                         f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")


_FLOAT_NAMES = {str(t) for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def raise_unknown(unknown: list[str], source: str, what: str):
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} tensor(s) are not part of a {what} model: "
                         f"{', '.join(unknown[:20])}{' ...' if len(unknown) > 20 else ''}")


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass
class Pending:
    """A tensor to write: its header facts now, its data (`make()`) only when its turn comes."""

    name: str
    shape: tuple
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(path: Path, tensors: list[Pending], metadata: Optional[dict] = None, hasher=None) -> int:
    """Stream tensors into a .safetensors file one at a time, so a file never needs its tensors all in memory; the
    file is fsync'ed. hasher (e.g. hashlib.sha256()) sees every byte written. Returns the data size in bytes."""
    header, offset = {}, 0
    for p in tensors:
        header[p.name] = {"dtype": _ST_DTYPES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with disk_full_names(path), open(path, "wb") as f:
        def write(data):
            f.write(data)
            if hasher is not None:
                hasher.update(data)

        write(struct.pack("<Q", len(blob)))
        write(blob)
        for p in tensors:
            t = p.make().detach().to("cpu").contiguous()
            if tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype:
                raise RuntimeError(f"{path}: {p.name} came out {tuple(t.shape)} {t.dtype}, announced {p.shape} {p.dtype}")
            write(t.reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    return offset


def index_weight_files(index: Path) -> list[Path]:
    """The shard files a safetensors index (tensor name -> file name) names; every one must exist."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: expected a non-empty 'weight_map' object of tensor name -> file name")
    files = sorted(set(weight_map.values()))
    # an index names files inside its dir; a shard that is a symlink (the HF hub cache's blobs) is the user's choice
    outside = [f for f in files if Path(f).is_absolute() or ".." in Path(f).parts]
    if outside:
        raise ValueError(f"{index}: weight_map names {outside[0]!r}, a file outside the checkpoint dir "
                         f"{index.parent}; the index may name only files beside it")
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names shard file(s) {', '.join(missing)} which are not in {index.parent}")
    return [index.parent / f for f in files]
