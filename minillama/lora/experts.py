"""LoRA on Mixtral's stacked experts: per-expert factors lora_{w}_a (E, r, in), lora_{w}_b (E, out, r) on w1/w2/w3,
through the per-expert loop or grouped GEMMs (moe.ExpertStack), with further named adapters as slots."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .slots import AdapterSlots, _check_hparams, _copy, _frozen, _new_factors, lora_scaling
from ..moe import dispatch, grouped_linear, grouped_mm_ok
from ..swiglu import silu_mul
from ..quant import NF4Weight, nf4_grouped_linear


class LoRAExperts(AdapterSlots):
    """moe.Experts with frozen w1/w2/w3 and per-expert LoRA factors lora_{w}_a (E, r, in), lora_{w}_b (E, out, r).

    Meets moe.ExpertStack: the per-expert loop, or grouped GEMMs for the base stack and for each factor (A then B)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 weights: Iterable[str] = ("w1", "w2", "w3"), lora_dtype: torch.dtype = torch.float32,
                 name: str = "LoRAExperts"):
        super().__init__()
        _check_hparams(rank, alpha, dropout, name)
        self.w1, self.w2, self.w3 = _frozen(base.w1), _frozen(base.w2), _frozen(base.w3)
        self.n_experts = self.w1.shape[0]
        self.targets = tuple(w for w in ("w1", "w2", "w3") if w in tuple(weights))
        self.alpha, self.use_rslora = alpha, use_rslora
        self.rank, self.scaling = {}, {}  # per target weight: the v5 PEFT layout can give w1/w3 another rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for w in self.targets:
            E, out_f, in_f = getattr(self, w).shape
            a, b = _new_factors((E,), rank, in_f, out_f, getattr(self, w).device, lora_dtype)
            setattr(self, f"lora_{w}_a", a)
            setattr(self, f"lora_{w}_b", b)
            self.rank[w], self.scaling[w] = rank, lora_scaling(rank, alpha, use_rslora)
        self._init_slots()

    def _device(self):
        return getattr(self, f"lora_{self.targets[0]}_a").device if self.targets else self.w1.device

    def _terms(self, w: str):
        """(A, B, scaling * weight) of every selected slot that adapts w."""
        if self.merged or not self.enabled:
            return []
        return [(getattr(o, f"lora_{w}_a"), getattr(o, f"lora_{w}_b"), o.scaling[w] * weight)
                for o, weight in ((self.owner(s), wt) for s, wt in self._active) if w in o.targets]

    def _linear(self, w: str, e: int, x: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, w)  # a float stack, or a quantized one (NF4Weight, weight_only.QuantizedStack)
        out = F.linear(x, weight[e]) if isinstance(weight, torch.Tensor) else weight.linear(x, e)
        for a, b, s in self._terms(w):
            h = F.linear(self.dropout(x).to(a.dtype), a[e])  # (n, r)
            out = out + (F.linear(h, b[e]) * s).to(out.dtype)
        return out

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its routed tokens. (n, D) -> (n, D)"""
        return self._linear("w2", e, silu_mul(self._linear("w1", e, x), self._linear("w3", e, x)))

    def _grouped(self, w: str, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, w)
        out = (nf4_grouped_linear(xs, weight, offsets) if isinstance(weight, NF4Weight)
               else grouped_linear(xs, weight, offsets))  # (M, out)
        for a, b, s in self._terms(w):
            h = grouped_linear(self.dropout(xs).to(a.dtype), a, offsets)  # (M, r)
            out = out + (grouped_linear(h, b, offsets) * s).to(out.dtype)
        return out

    def grouped_ok(self, x: torch.Tensor) -> bool:
        factors = [t for w in ("w1", "w2", "w3") for a, b, _ in self._terms(w) for t in (a, b)]
        return (grouped_mm_ok(x.device, x.dtype, self.w1, self.w2, self.w3)
                and (not factors or grouped_mm_ok(x.device, factors[0].dtype, *factors)))

    def grouped_forward(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Every expert on its slots at once. xs (M, D) sorted by expert -> (M, D)"""
        h = silu_mul(self._grouped("w1", xs, offsets), self._grouped("w3", xs, offsets))  # (M, F)
        return self._grouped("w2", h, offsets)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        if self._rows is None or self.merged or not self.enabled:
            return dispatch(self, x, weights, expert_idx)
        # per-row adapters: tokens arrive flattened (B*T, D) and sorted by expert, so run the experts once per
        # distinct slot of the batch and keep each token's own result (the same function as that slot alone)
        rows = self._rows
        if x.shape[0] % rows.shape[0]:
            raise ValueError(f"set_row_adapters named {rows.shape[0]} rows but the experts got {x.shape[0]} tokens")
        token_slot = rows.repeat_interleave(x.shape[0] // rows.shape[0])  # (N,)
        out, saved = None, self._active
        try:
            for u in torch.unique(rows).tolist():
                self._active = [] if u < 0 else [(u, 1.0)]
                y = dispatch(self, x, weights, expert_idx)
                out = y if out is None else torch.where((token_slot == u)[:, None], y, out)
        finally:
            self._active = saved
        return out

    @torch.no_grad()
    def delta(self, w: str, e: int, slot: int = 0) -> torch.Tensor:
        """scaling * B[e] @ A[e] in float32 for target weight w of a slot. (out, in)"""
        o = self.owner(slot)
        a, b = getattr(o, f"lora_{w}_a")[e], getattr(o, f"lora_{w}_b")[e]
        return (b.float() @ a.float()) * o.scaling[w]

    @torch.no_grad()
    def merge_target(self, w: str, e: int) -> tuple[Callable, Callable]:
        """As LoRALinear.merge_target, for expert e of target weight w."""
        delta = sum(((b[e].float() @ a[e].float()) * s for a, b, s in self._terms(w)),
                    torch.zeros(getattr(self, w).shape[1:], device=self._device()))
        return (lambda x: x + delta), (lambda m: m - delta)

    def set_factors(self, a: torch.Tensor, b: torch.Tensor, scaling: float, name: str, w: str,
                    adapter: Optional[str] = None, use_rslora: Optional[bool] = None):
        """Load A (E, r, in), B (E, out, r) for target weight w into slot `adapter` (default slot 0; a new name adds
        a slot); shapes are checked against the base stack."""
        slot = 0 if adapter is None else self.slot_of(adapter)
        if slot == 0 and w not in self.targets:
            raise ValueError(f"{name}.{w}: the adapter has factors for {w} but LoRA targets only {self.targets}")
        E, out_f, in_f = getattr(self, w).shape
        r = a.shape[1] if a.dim() == 3 else -1
        if a.dim() != 3 or a.shape[0] != E or a.shape[2] != in_f or b.shape != (E, out_f, r):
            raise ValueError(f"{name}.{w}: adapter factors A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the "
                             f"base experts ({E}, {out_f}, {in_f}): expected A ({E}, r, {in_f}), B ({E}, {out_f}, r); "
                             "adapter for another model?")
        self._check_unmerged(name)
        old = getattr(self, f"lora_{self.targets[0]}_a") if self.targets else a
        device, dtype = old.device, old.dtype
        ta, tb = _copy(a, device, dtype), _copy(b, device, dtype)
        if slot is None:
            slot = self._new_slot(adapter, {}, {}, {}, self.use_rslora)
        o = self.owner(slot)
        o.use_rslora = self.use_rslora if use_rslora is None else use_rslora
        if slot == 0:
            setattr(self, f"lora_{w}_a", nn.Parameter(ta, requires_grad=old.requires_grad))
            setattr(self, f"lora_{w}_b", nn.Parameter(tb, requires_grad=old.requires_grad))
        else:
            o.register_buffer(f"lora_{w}_a", ta, persistent=False)
            o.register_buffer(f"lora_{w}_b", tb, persistent=False)
            o.targets = tuple(t for t in ("w1", "w2", "w3") if t in o.targets or t == w)
        o.rank[w], o.scaling[w] = r, scaling
        self._reselect()

    def combine(self, weights: dict[str, float], adapter: str, path: str):
        """Slot `adapter` = the concatenation of the weighted slots, per target weight (combine_adapters)."""
        for w in ("w1", "w2", "w3"):
            parts = [(self.owner(s), wt) for n, wt in weights.items()
                     if (s := self.slot_of(n)) is not None and w in self.owner(s).targets]
            if parts:
                a = torch.cat([getattr(o, f"lora_{w}_a").detach() * (wt * o.scaling[w]) for o, wt in parts], dim=1)
                b = torch.cat([getattr(o, f"lora_{w}_b").detach() for o, _ in parts], dim=2)  # (E, out, sum r)
                self.set_factors(a, b, 1.0, name=path, w=w, adapter=adapter, use_rslora=False)

    def clear_slot(self, adapter: str):
        slot = self.slot_of(adapter)
        if slot is not None:
            o = self.owner(slot)
            with torch.no_grad():
                for w in o.targets:
                    getattr(o, f"lora_{w}_b").zero_()

    def extra_repr(self) -> str:
        more = f", adapters={self.adapter_names}" if len(self.adapter_names) > 1 else ""
        return f"experts={self.w1.shape[0]}, targets={self.targets}, rank={self.rank}{more}"

