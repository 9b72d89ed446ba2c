"""LoRA and DoRA: trainable low-rank updates on frozen base weights (float, NF4, or weight_only's int8/int4 for
inference), swapped in after the model is built. The layers for linears live here; Mixtral's expert stacks in
experts.py; several named adapters per module and choosing between them in slots.py; merging in merge.py; PEFT's
adapter files in peft.py.

LoRA: y = W x + scaling * B A dropout(x), scaling = alpha / r (or alpha / sqrt(r) with rsLoRA). B starts at zero,
so a fresh adapter changes nothing. The base keeps its `weight` key (torchtune habit): base state_dict keys are
unchanged. LoRA factors are plain nn.Parameters (float32 by default, like PEFT's autocast_adapter_dtype), so FSDP2's
fully_shard shards them like any other parameter.

DoRA (weight-decomposed LoRA, PEFT's use_dora): the adapted weight g * (W + scaling B A) with g = m / ||W + scaling
B A|| per output row; the magnitude m (out,) is a trainable parameter (lora_magnitude, PEFT's
lora_magnitude_vector) starting at the rows' norms of W, so a fresh adapter again changes nothing, and the norm is
detached from the gradient (DoRA paper 4.3, as PEFT does). PEFT's forward, which we follow term for term:
y = W x + (g - 1) W dropout(x) + g scaling B A dropout(x). DoRA is not offered for Mixtral's experts: PEFT 0.21
cannot put DoRA on transformers 5's fused expert parameters, so such an adapter could not be used anywhere else.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..hf_names import HF_TARGET_TO_META as LINEAR_TARGETS  # PEFT names -> our linear leaf names
from .experts import LoRAExperts
from .slots import (AdapterSlots, _check_hparams, _copy, _frozen, _new_factors, adapter_names, lora_modules, lora_scaling,
                    set_adapter)
from ..linear import linear
from ..moe import Experts, QuantizedExperts
from ..quant import NF4Linear, NF4Weight, nf4_linear
from ..weight_only import Int4Weight, Int8Weight, QuantLinear

EXPERT_TARGETS = {"experts": ("w1", "w2", "w3"), "w1": ("w1",), "w2": ("w2",), "w3": ("w3",)}
ROUTER_TARGETS = ("router", "gate")
VALID_TARGETS = tuple(LINEAR_TARGETS) + tuple(EXPERT_TARGETS) + ROUTER_TARGETS + ("all-linear",)
NORM_ROWS = 1024  # rows of W + scaling B A formed at a time for DoRA's norm (bounds the float32 temporary)
DORA_ON_EXPERTS = ("DoRA on Mixtral experts is not supported (PEFT 0.21 has no DoRA for transformers 5's fused "
                   "experts, so the adapter could not be loaded there); give DoRA targets without experts/all-linear, "
                   "e.g. q_proj k_proj v_proj o_proj router")


class LoRALinear(AdapterSlots):
    """A bias-free linear with a frozen base `weight` (Parameter, NF4Weight, Int8Weight or Int4Weight) plus lora_a
    (r, in), lora_b (out, r) and, for DoRA, lora_magnitude (out,); further named adapters in `extra`."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 lora_dtype: torch.dtype = torch.float32, name: str = "LoRALinear", use_dora: bool = False):
        super().__init__()
        _check_hparams(rank, alpha, dropout, name)
        if getattr(base, "bias", None) is not None:
            raise ValueError(f"{name}: LoRA on a linear with bias is not supported")
        self.weight = _frozen(base.weight)
        self.out_features, self.in_features = self.weight.shape
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = lora_scaling(rank, alpha, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = self.weight.device
        self.lora_a, self.lora_b = _new_factors((), rank, self.in_features, self.out_features, device, lora_dtype)
        self.register_parameter("lora_magnitude", None)
        self._init_slots()
        if use_dora:  # m = ||W + scaling B A|| with B = 0: the rows' norms of W, so g = 1 exactly
            self.lora_magnitude = nn.Parameter(self._row_norms(self).to(lora_dtype))

    def _device(self):
        return self.lora_a.device

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, NF4Weight):
            return nf4_linear(x, self.weight)
        if isinstance(self.weight, (Int8Weight, Int4Weight)):  # weight-only int8/int4 (inference)
            return self.weight.linear(x)
        return linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        if self.merged or not self.enabled:
            return out
        if self._rows is not None:
            return self._per_row(x, out)
        for slot, weight in self._active:
            out = out + self._slot_term(slot, x, out, weight).to(out.dtype)
        return out

    def _slot_term(self, slot: int, x: torch.Tensor, base_out: torch.Tensor, weight: float) -> torch.Tensor:
        """What one adapter adds to the base output: weight * scaling * B A x, or DoRA's two terms. float32"""
        o = self.owner(slot)
        xd = self.dropout(x)
        h = F.linear(xd.to(o.lora_a.dtype), o.lora_a)  # (..., r)
        y = F.linear(h * (o.scaling * weight), o.lora_b)  # (..., out); scaled at rank r, not at out: less to touch
        if o.lora_magnitude is None:
            return y
        g = o.lora_magnitude / self.dora_norm(slot)  # (out,); the norm carries no gradient
        # PEFT: the base term is W x when dropout is off (eval, or p = 0), W dropout(x) when it is on
        base_d = base_out if xd is x or not self.training else self.base_forward(xd)
        return (g - 1) * base_d.float() + g * y

    @torch.no_grad()
    def delta(self, slot: int = 0) -> torch.Tensor:
        """scaling * B @ A of a slot in float32. (out, in)"""
        o = self.owner(slot)
        return (o.lora_b.float() @ o.lora_a.float()) * o.scaling

    @torch.no_grad()
    def dora_norm(self, slot: int) -> torch.Tensor:
        """||W + scaling B A|| of each output row for slot's factors, in float32, detached. (out,)

        Recomputed on every call, as PEFT does by default (under FSDP the gathered factors are new each forward);
        per-row serving caches it with the stacked factors, and merging folds it into the weight."""
        o = self.owner(slot)
        if o.lora_magnitude is None:
            raise ValueError(f"slot {slot} ({self.adapter_names[slot]}) is not a DoRA adapter")
        return self._row_norms(o)

    def _row_norms(self, o) -> torch.Tensor:
        w = self.weight.dequantize(dtype=torch.float32) if isinstance(self.weight, nn.Module) else self.weight
        a = o.lora_a.detach().float()
        norms = torch.empty(self.out_features, dtype=torch.float32, device=a.device)
        for r in range(0, self.out_features, NORM_ROWS):  # never the whole float32 W + scaling B A at once
            rows = w[r:r + NORM_ROWS].detach().float() + o.scaling * (o.lora_b[r:r + NORM_ROWS].detach().float() @ a)
            norms[r:r + NORM_ROWS] = torch.linalg.norm(rows, dim=1)
        return norms

    def _per_row(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each batch row through its own slot: the slots' factors stacked, zero-padded to the largest rank, and
        gathered per row (a padded rank adds exact zeros; the extra last slot is all zero: the base model)."""
        rows = self._rows
        B = rows.shape[0]
        if (x.dim() == 3 and x.shape[0] != B) or x.numel() % (B * self.in_features):
            raise ValueError(f"set_row_adapters named {B} rows but this forward has input {tuple(x.shape)}")
        a, b, scale, g = self._row_stack()  # (S+1, r, in), (S+1, out, r), (S+1,), (S+1, out) or None
        idx = torch.where(rows < 0, a.shape[0] - 1, rows)  # (B,)
        xr = self.dropout(x).reshape(B, -1, self.in_features).to(a.dtype)  # (B, T, in)
        h = torch.bmm(xr, a[idx].transpose(1, 2))  # (B, T, r)
        y = torch.bmm(h, b[idx].transpose(1, 2)) * scale[idx, None, None]  # (B, T, out)
        if g is not None:  # DoRA slots: (g - 1) W x + g y; plain LoRA slots and the base row have g = 1
            gr = g[idx][:, None, :]  # (B, 1, out)
            y = (gr - 1) * out.reshape(B, -1, self.out_features).float() + gr * y
        return out + y.reshape(out.shape).to(out.dtype)

    @torch.no_grad()
    def _row_stack(self):
        owners = [self.owner(i) for i in range(len(self.adapter_names))]
        base = self.weight.packed if isinstance(self.weight, nn.Module) else self.weight  # a quantized weight's codes
        deps = (base,) + tuple(t for o in owners for t in (o.lora_a, o.lora_b, o.lora_magnitude, o.scaling)
                               if t is not None)

        def make():
            S, r = len(owners), max(o.rank for o in owners)
            dev, dt = self.lora_a.device, self.lora_a.dtype
            a = torch.zeros(S + 1, r, self.in_features, device=dev, dtype=dt)
            b = torch.zeros(S + 1, self.out_features, r, device=dev, dtype=dt)
            scale = torch.zeros(S + 1, device=dev, dtype=torch.float32)
            dora = any(o.lora_magnitude is not None for o in owners)
            g = torch.ones(S + 1, self.out_features, device=dev) if dora else None
            for i, o in enumerate(owners):
                a[i, :o.rank], b[i, :, :o.rank], scale[i] = o.lora_a, o.lora_b, o.scaling
                if o.lora_magnitude is not None:
                    g[i] = o.lora_magnitude.float() / self.dora_norm(i)
            return a, b, scale, g

        return self._cached(("rows",), deps, make)

    @torch.no_grad()
    def merge_target(self, g: Optional[torch.Tensor] = None) -> tuple[Callable, Callable, Optional[torch.Tensor]]:
        """(merged weight from the float32 base, base from the float32 merged weight, DoRA's g (out, 1) or None) for
        the current selection. g must be the one of the merge when unmerging (the norm is of the unmerged W)."""
        terms = [(s, self.owner(s), w) for s, w in self._active]
        if any(o.lora_magnitude is not None for _, o, _ in terms):  # set_adapter allows DoRA only alone, weight 1
            (slot, o, _), = terms
            if g is None:
                g = (o.lora_magnitude.float() / self.dora_norm(slot))[:, None]  # (out, 1)
            delta = (o.lora_b.float() @ o.lora_a.float()) * o.scaling
            return (lambda w: g * (w + delta)), (lambda m: m / g - delta), g
        delta = sum(((o.lora_b.float() @ o.lora_a.float()) * (o.scaling * w) for _, o, w in terms),
                    torch.zeros(self.weight.shape, device=self.lora_a.device))
        return (lambda w: w + delta), (lambda m: m - delta), None

    def set_factors(self, a: torch.Tensor, b: torch.Tensor, scaling: float, name: str,
                    magnitude: Optional[torch.Tensor] = None, adapter: Optional[str] = None,
                    use_rslora: Optional[bool] = None):
        """Load A (r, in), B (out, r) and optionally DoRA's magnitude (out,) into slot `adapter` (default: slot 0; a
        new name adds a slot). The rank may differ from the current one; shapes are checked against the base.
        use_rslora only records how the file spelled its scaling (for saving it again)."""
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != self.in_features or b.shape != (self.out_features, r):
            raise ValueError(f"{name}: adapter lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                             f"weight (out={self.out_features}, in={self.in_features}): expected lora_A (r, "
                             f"{self.in_features}) and lora_B ({self.out_features}, r); adapter for another model?")
        if magnitude is not None and tuple(magnitude.shape) != (self.out_features,):
            raise ValueError(f"{name}: adapter lora_magnitude_vector {tuple(magnitude.shape)} does not fit the base "
                             f"weight's {self.out_features} rows")
        self._check_unmerged(name)
        dtype, device = self.lora_a.dtype, self.lora_a.device
        slot = 0 if adapter is None else self.slot_of(adapter)
        tensors = {"lora_a": _copy(a, device, dtype), "lora_b": _copy(b, device, dtype),
                   "lora_magnitude": None if magnitude is None else _copy(magnitude, device, dtype)}
        rslora = self.use_rslora if use_rslora is None else use_rslora
        if slot is None:
            self._new_slot(adapter, tensors, r, scaling, rslora)
            return
        o = self.owner(slot)
        for key, t in tensors.items():
            if slot == 0:
                grad = self.lora_a.requires_grad
                setattr(self, key, None if t is None else nn.Parameter(t, requires_grad=grad))
            else:
                setattr(o, key, t)
        o.rank, o.scaling, o.use_rslora = r, scaling, rslora
        self._cache.clear()

    def combine(self, weights: dict[str, float], adapter: str, path: str):
        """Slot `adapter` = the concatenation of the weighted slots (lora_slots.combine_adapters)."""
        parts = [(self.owner(s), w) for n, w in weights.items() if (s := self.slot_of(n)) is not None]
        if parts:
            a = torch.cat([o.lora_a.detach() * (w * o.scaling) for o, w in parts])  # (sum r, in)
            b = torch.cat([o.lora_b.detach() for o, _ in parts], dim=1)  # (out, sum r)
            self.set_factors(a, b, 1.0, name=path, adapter=adapter, use_rslora=False)

    def clear_slot(self, adapter: str):
        """Make `adapter` add nothing here (an adapter replaced by one that does not touch this module)."""
        slot = self.slot_of(adapter)
        if slot is not None:
            o = self.owner(slot)
            with torch.no_grad():
                o.lora_b.zero_()
            o.lora_magnitude = None
            self._cache.clear()

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude is not None else ""
        more = f", adapters={self.adapter_names}" if len(self.adapter_names) > 1 else ""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}{dora}{more}"

def _resolve_targets(targets: tuple, is_moe: bool) -> tuple[set, set, bool]:
    """Target names -> (linear leaf names, expert weight names, router?)."""
    unknown = [t for t in targets if t not in VALID_TARGETS]
    if unknown:
        raise ValueError(f"apply_lora: unknown LoRA targets {unknown}; valid targets: {', '.join(VALID_TARGETS)}")
    linears, experts, router = set(), set(), False
    for t in targets:
        if t == "all-linear":  # PEFT's meaning: every linear except the output head (Mixtral: experts and router too)
            linears |= {"wq", "wk", "wv", "wo"} | (set() if is_moe else {"w1", "w2", "w3"})
            if is_moe:
                experts |= {"w1", "w2", "w3"}
                router = True
        elif t in LINEAR_TARGETS:
            linears.add(LINEAR_TARGETS[t])
        elif t in EXPERT_TARGETS:
            experts |= set(EXPERT_TARGETS[t])
        else:
            router = True
    return linears, experts, router


@dataclass(frozen=True)
class LoRAHParams:
    """One adapter's hyperparameters (PEFT's LoraConfig: r, lora_alpha, lora_dropout, use_rslora, use_dora)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    lora_dtype: torch.dtype = torch.float32
    use_dora: bool = False


def wrap_module(model: nn.Module, path: str, hp: LoRAHParams,
                expert_weights: Iterable[str] = ("w1", "w2", "w3")) -> nn.Module:
    """Swap the linear (or expert stack) at `path` for its LoRA twin and return it."""
    parent_path, _, leaf = path.rpartition(".")
    module = model.get_submodule(path)
    kw = dict(rank=hp.rank, alpha=hp.alpha, dropout=hp.dropout, use_rslora=hp.use_rslora, lora_dtype=hp.lora_dtype,
              name=path)
    if isinstance(module, (nn.Linear, NF4Linear, QuantLinear)):
        new = LoRALinear(module, use_dora=hp.use_dora, **kw)
    elif isinstance(module, (Experts, QuantizedExperts)):
        if hp.use_dora:
            raise ValueError(f"{path}: {DORA_ON_EXPERTS}")
        new = LoRAExperts(module, weights=expert_weights, **kw)
    else:
        raise ValueError(f"{path}: {type(module).__name__} cannot take a LoRA adapter")
    setattr(model.get_submodule(parent_path) if parent_path else model, leaf, new)
    return new


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: Iterable[str] | str = ("q_proj", "v_proj"), use_rslora: bool = False,
               lora_dtype: torch.dtype = torch.float32, use_dora: bool = False) -> nn.Module:
    """Swap the targeted linears (and Mixtral experts/router) for LoRA (or DoRA) modules; freeze every other
    parameter. Modules already adapted are left as they are."""
    _check_hparams(rank, alpha, dropout, "apply_lora")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    is_moe = any(isinstance(m, (Experts, QuantizedExperts, LoRAExperts)) for m in model.modules())
    linears, expert_ws, router = _resolve_targets(targets, is_moe)
    if use_dora and expert_ws:
        raise ValueError(f"apply_lora: {DORA_ON_EXPERTS}")
    for p in model.parameters():
        p.requires_grad_(False)
    found = set()
    hp = LoRAHParams(rank, alpha, dropout, use_rslora, lora_dtype, use_dora)
    for path, module in list(model.named_modules()):
        leaf = path.rpartition(".")[2]
        in_ffn_or_attn = ".attention." in f".{path}" or ".feed_forward." in f".{path}"
        if isinstance(module, LoRALinear):  # already adapted (apply_lora twice): counts as found, left as is
            found.add("router" if leaf == "gate" else leaf)
        elif isinstance(module, LoRAExperts):
            found |= {f"experts.{w}" for w in module.targets}
        elif isinstance(module, (nn.Linear, NF4Linear, QuantLinear)) and (
                (leaf in linears and (in_ffn_or_attn or path == "output"))
                or (router and leaf == "gate" and path.endswith("feed_forward.gate"))):
            wrap_module(model, path, hp)
            found.add("router" if leaf == "gate" else leaf)
        elif isinstance(module, (Experts, QuantizedExperts)) and expert_ws:
            wrap_module(model, path, replace(hp, use_dora=False), expert_weights=expert_ws)
            found |= {f"experts.{w}" for w in expert_ws}
    missing = [w for w in sorted(linears) if w not in found] + [f"experts.{w}" for w in sorted(expert_ws)
                                                                 if f"experts.{w}" not in found]
    missing += ["router"] if router and "router" not in found else []
    if missing and "all-linear" not in targets:
        raise ValueError(f"apply_lora: targets {list(targets)} found no module for {missing} in this "
                         f"{'MoE' if is_moe else 'dense'} model (Mixtral FFNs are 'experts'/'w1'/'w2'/'w3', 'router')")
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA factors (and DoRA magnitudes), for the optimizer."""
    return [p for n, p in model.named_parameters() if n.rpartition(".")[2].startswith("lora_")]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA factors, under our module names (e.g. 'layers.0.attention.wq.lora_a')."""
    return {k: v for k, v in model.state_dict().items() if k.rpartition(".")[2].startswith("lora_")}


def set_lora_enabled(model: nn.Module, enabled: bool):
    """Switch the LoRA path off (base-model outputs) or back on, without touching weights or the selection."""
    for name, m in lora_modules(model):
        if m.merged and not enabled:
            raise ValueError(f"set_lora_enabled: {name} is merged into its base weight; call unmerge_lora first")
        m.enabled = enabled


REFERENCE_ADAPTER = "reference"  # a run's frozen starting adapter (--init_adapter): the reference policy


@contextmanager
def reference_policy(model: nn.Module):
    """The model as DPO/KTO/GRPO's reference policy while inside: its frozen REFERENCE_ADAPTER when the run started
    from an adapter (the starting policy, as TRL's ref_adapter_name), else the base with LoRA off; no second copy."""
    if REFERENCE_ADAPTER not in adapter_names(model):
        set_lora_enabled(model, False)
        try:
            yield model
        finally:
            set_lora_enabled(model, True)
        return
    before = [(m, m.selection) for _, m in lora_modules(model)]
    set_adapter(model, REFERENCE_ADAPTER)
    try:
        yield model
    finally:
        for m, selection in before:
            m.select(selection)


# ---- whole modules trained beside LoRA (saved as PEFT modules_to_save) ----
TRAINABLE_MODULES = ("embed", "norm", "head")


def set_trainable(model: nn.Module, kinds: Iterable[str]) -> list[str]:
    """Unfreeze whole modules on top of LoRA: "embed" the token embedding (and a head tied to it), "norm" every
    RMSNorm, "head" the output layer. LongLoRA found embeddings and norms must learn to extend the context.
    Returns the unfrozen parameter names."""
    kinds = set(kinds)
    unknown = sorted(kinds - set(TRAINABLE_MODULES))
    if unknown:
        raise ValueError(f"set_trainable: unknown kinds {unknown}; valid: {', '.join(TRAINABLE_MODULES)}")
    if "head" in kinds and getattr(model.args, "tie_embeddings", False) and "embed" not in kinds:
        raise ValueError("set_trainable: this model ties its output head to the embedding; train 'embed' (both)")
    names = []
    for name, p in model.named_parameters():
        module = name.rpartition(".")[0]
        if (("embed" in kinds and module == "tok_embeddings") or ("head" in kinds and module == "output")
                or ("norm" in kinds and module.rpartition(".")[2].endswith("norm"))):
            if not p.is_floating_point():
                raise ValueError(f"set_trainable: {name} is quantized ({p.dtype}) and cannot be trained")
            p.requires_grad_(True)
            names.append(name)
    found = {"embed": any(n.startswith("tok_embeddings.") for n in names),
             "head": any(n.startswith("output.") for n in names), "norm": any("norm." in n for n in names)}
    missing = sorted(k for k in kinds if not found[k])
    if missing:
        raise ValueError(f"set_trainable: no float parameters for {missing} (an NF4 output head cannot be trained)")
    return names
