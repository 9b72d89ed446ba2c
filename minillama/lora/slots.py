"""Several named adapters per LoRA module ("slots") and which of them a forward uses.

Slot 0 of a LoRA module holds its trainable Parameters; each further adapter loaded under another name is a `Slot`
whose frozen factors are non-persistent buffers (so state dicts and training checkpoints only ever see slot 0).
The selection is by name, the same on every module:
    set_adapter(model, "a")                  every row uses adapter a
    set_adapter(model, None)                 the base model
    set_adapter(model, {"a": 0.5, "b": 0.5})  the weighted sum of a's and b's updates (what PEFT's
                                             add_weighted_adapter(..., combination_type="cat") builds)
    set_row_adapters(model, ["a", None, "b"]) batch row 0 uses a, row 1 the base model, row 2 b
A module without an adapter of the selected name adds nothing for it (that adapter does not touch it).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

_LOAD_ORDER = itertools.count()  # adapter_names() lists adapters in the order they were first loaded


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _check_hparams(rank: int, alpha: float, dropout: float, where: str):
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{where}: LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"{where}: LoRA alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}: LoRA dropout must be in [0, 1), got {dropout!r}")


def _new_factors(n: tuple, rank: int, in_f: int, out_f: int, device, dtype) -> tuple[nn.Parameter, nn.Parameter]:
    """A (*n, r, in) kaiming-uniform like PEFT / nn.Linear's default, B (*n, out, r) zero."""
    a = torch.empty(*n, rank, in_f, device=device, dtype=dtype)
    for m in a.view(-1, rank, in_f):
        nn.init.kaiming_uniform_(m, a=math.sqrt(5))
    return nn.Parameter(a), nn.Parameter(torch.zeros(*n, out_f, rank, device=device, dtype=dtype))


def _copy(t: torch.Tensor, device, dtype) -> torch.Tensor:
    return t.detach().to(device=device, dtype=dtype, copy=True).contiguous()


def _frozen(w):
    if isinstance(w, nn.Parameter):
        w.requires_grad_(False)
    return w


class Slot(nn.Module):
    """A further named adapter of one module: frozen factors as non-persistent buffers named like slot 0's
    parameters (lora_a/lora_b/lora_magnitude, or lora_{w}_a/lora_{w}_b for experts), with its rank and scaling."""

    def __init__(self, tensors: dict[str, Optional[torch.Tensor]], rank, scaling, use_rslora: bool,
                 targets: tuple = ()):
        super().__init__()
        for key, t in tensors.items():
            self.register_buffer(key, t, persistent=False)
        self.rank, self.scaling, self.use_rslora, self.targets = rank, scaling, use_rslora, targets


class AdapterSlots(nn.Module):
    """What LoRALinear and LoRAExperts share: named slots and the selection a forward uses."""

    def _init_slots(self, name: str = "default"):
        self.adapter_names = [name]  # slot order; slot 0 is this module's own parameters
        self.loaded_at = [next(_LOAD_ORDER)]
        self.extra = nn.ModuleList()  # slots 1.. (Slot)
        self.enabled, self.merged, self._fix = True, False, None
        self.selection: object = {name: 1.0}  # by name: {name: weight} for every row, or [name | None] per row
        self._active: list[tuple[int, float]] = [(0, 1.0)]  # (slot, weight) summed for every row
        self._rows: Optional[torch.Tensor] = None  # (B,) slot per batch row, -1 = the base model
        self._cache: dict = {}  # derived tensors (DoRA norms, per-row stacks), keyed by what they depend on

    def owner(self, slot: int) -> nn.Module:
        """The module holding slot's factors: self for slot 0, else its Slot."""
        return self if slot == 0 else self.extra[slot - 1]

    def slot_of(self, name: str) -> Optional[int]:
        return self.adapter_names.index(name) if name in self.adapter_names else None

    def select(self, selection, rows: Optional[torch.Tensor] = None):
        """Use {name: weight} for every row, or (with `rows`, the per-row slot indices) one slot per row."""
        self.selection = selection
        if rows is not None:
            self._active, self._rows = [], rows
        else:
            self._active = [(self.slot_of(n), w) for n, w in selection.items() if n in self.adapter_names]
            self._rows = None

    def _reselect(self):
        if isinstance(self.selection, dict):
            self.select(self.selection)
        else:  # per-row names: slot indices change when a slot is added
            rows = [-1 if n is None or n not in self.adapter_names else self.adapter_names.index(n)
                    for n in self.selection]
            self.select(self.selection, torch.tensor(rows, device=self._device()))

    def _new_slot(self, name: str, tensors: dict, rank, scaling, use_rslora: bool, targets: tuple = ()) -> int:
        self.extra.append(Slot(tensors, rank, scaling, use_rslora, targets))
        self.adapter_names.append(name)
        self.loaded_at.append(next(_LOAD_ORDER))
        self._cache.clear()
        self._reselect()
        return len(self.adapter_names) - 1

    def _check_unmerged(self, what: str):
        if self.merged:
            raise ValueError(f"{what}: the adapter is merged into the base weight; call unmerge_lora first")

    def _cached(self, name: tuple, deps: tuple, make: Callable[[], object]):
        """make() memoized under `name` while deps (tensors, compared by identity and in-place version) hold."""
        sig = tuple((id(d), d._version) if isinstance(d, torch.Tensor) else d for d in deps)
        hit = self._cache.get(name)
        if hit is not None and hit[0] == sig:
            return hit[1]
        value = make()
        self._cache[name] = (sig, value)
        return value


def lora_modules(model: nn.Module) -> list[tuple[str, AdapterSlots]]:
    """Every LoRA module (LoRALinear, LoRAExperts) with its path."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterSlots)]


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters loaded into the model, in the order they were first loaded."""
    first: dict[str, int] = {}
    for _, m in lora_modules(model):
        for name, order in zip(m.adapter_names, m.loaded_at):
            first[name] = min(first.get(name, order), order)
    return sorted(first, key=first.get)


def dora_adapters(model: nn.Module) -> set[str]:
    """Names of the adapters that are DoRA on some module."""
    return {m.adapter_names[s] for _, m in lora_modules(model) for s in range(len(m.adapter_names))
            if getattr(m.owner(s), "lora_magnitude", None) is not None}


def _check_names(model: nn.Module, names, what: str) -> list[str]:
    loaded = adapter_names(model)
    if not loaded:
        raise ValueError(f"{what}: the model has no adapters; load one with minillama.lora.peft.load_adapter first")
    unknown = sorted({n for n in names if n is not None and n not in loaded})
    if unknown:
        raise ValueError(f"{what}: no adapter named {', '.join(map(repr, unknown))}; loaded: {', '.join(loaded)}")
    merged = [n for n, m in lora_modules(model) if m.merged]
    if merged:
        raise ValueError(f"{what}: {merged[0]} has its adapter merged into the base weight; call unmerge_lora first")
    return loaded


def set_adapter(model: nn.Module, which) -> None:
    """Every row uses adapter `which` (a name), the base model (None), or the weighted sum of several adapters'
    updates ({name: weight}). DoRA adapters can only be used alone at weight 1 (their magnitude rescales W)."""
    if which is None:
        selection = {}
    elif isinstance(which, str):
        selection = {which: 1.0}
    elif isinstance(which, dict) and all(isinstance(k, str) for k in which):
        selection = {k: float(v) for k, v in which.items()}
        bad = [k for k, v in selection.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"set_adapter: weight of {bad[0]!r} is not a finite number")
    else:
        raise ValueError(f"set_adapter: expected an adapter name, None or {{name: weight}}, got {which!r}")
    _check_names(model, selection, "set_adapter")
    dora = dora_adapters(model) & set(selection)
    if dora and (len(selection) > 1 or selection[next(iter(dora))] != 1.0):
        raise ValueError(f"set_adapter: DoRA adapter {sorted(dora)[0]!r} can only be used alone at weight 1.0: its "
                         "magnitude vector rescales the whole weight, so it does not add to other updates")
    for _, m in lora_modules(model):
        m.select(selection)


def set_row_adapters(model: nn.Module, names: Sequence[Optional[str]]) -> None:
    """For the following forwards, batch row i uses adapter names[i] (None: the base model). Rows are gathered
    inside each layer, so one batch can mix adapters (a continuous-batching server); for inference: the stacked
    factors are copies, no gradient reaches them."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"set_row_adapters: expected a non-empty list of adapter names (or None), got {names!r}")
    _check_names(model, names, "set_row_adapters")
    names = list(names)
    made: dict = {}  # modules with the same slot names and device share one index tensor
    for _, m in lora_modules(model):
        key = (tuple(m.adapter_names), str(m._device()))
        if key not in made:
            made[key] = torch.tensor([m.adapter_names.index(n) if n in m.adapter_names else -1 for n in names],
                                     device=m._device())
        m.select(names, made[key])


def combine_adapters(model: nn.Module, weights: dict[str, float], name: str) -> None:
    """A new adapter `name` whose update is sum_i weights[i] * (adapter i's update), built as PEFT's
    add_weighted_adapter(..., combination_type="cat") does: factors concatenated along the rank, each A_i times
    weight_i * scaling_i, scaling 1. Exact (rank = the sum of ranks); it can be saved, selected per row, merged."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"combine_adapters: the new adapter's name must be a non-empty string, got {name!r}")
    if not isinstance(weights, dict) or not weights:
        raise ValueError("combine_adapters: give the adapters to combine as {name: weight}")
    loaded = _check_names(model, weights, "combine_adapters")
    if name in loaded:
        raise ValueError(f"combine_adapters: an adapter named {name!r} is already loaded")
    dora = dora_adapters(model) & set(weights)
    if dora:
        raise ValueError(f"combine_adapters: {sorted(dora)[0]!r} is a DoRA adapter; its magnitude vector rescales "
                         "the whole weight, so it cannot be summed with other updates")
    for path, m in lora_modules(model):
        m.combine({k: float(v) for k, v in weights.items()}, name, path)
