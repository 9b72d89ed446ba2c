"""LoRA: a trainable low-rank update B @ A on frozen base weights (float or NF4), swapped in after the model is built.

y = W x + scaling * B A dropout(x), scaling = alpha / r (or alpha / sqrt(r) with rsLoRA). B starts at zero, so a
fresh adapter changes nothing. The base keeps its `weight` key (torchtune habit): base state_dict keys are unchanged.
LoRA factors are plain nn.Parameters (float32 by default, like PEFT's autocast_adapter_dtype), so FSDP2's
fully_shard shards them like any other parameter.

Mixtral experts get per-expert stacked factors on w1/w2/w3 (A (E, r, in), B (E, out, r)); in PEFT files they are the
hub's per-expert modules `block_sparse_moe.experts.E.w1` (see minillama/adapter.py).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints.hf_keys import HF_TARGET_TO_META as LINEAR_TARGETS  # PEFT names -> our linear leaf names
from .moe import Experts, dispatch, grouped_linear, grouped_mm_ok
from .quant import NF4Experts, NF4Linear, NF4Weight, nf4_grouped_linear, nf4_linear

EXPERT_TARGETS = {"experts": ("w1", "w2", "w3"), "w1": ("w1",), "w2": ("w2",), "w3": ("w3",)}
ROUTER_TARGETS = ("router", "gate")
VALID_TARGETS = tuple(LINEAR_TARGETS) + tuple(EXPERT_TARGETS) + ROUTER_TARGETS + ("all-linear",)


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


def _merge_exact(w: torch.Tensor, delta: torch.Tensor):
    """w <- round(w + delta) in place (float32 math); returns what unmerge needs to restore w bit-for-bit.

    Unmerging subtracts delta again and fixes the entries where rounding lost information, so the model keeps
    no second copy of its weights, only those entries' positions and original values (measured: 0.6-1.4% of
    entries for deltas ~5% of |w|; never more bytes than a copy, which is kept instead when it would be smaller).
    """
    merged = (w.float() + delta).to(w.dtype)
    back = (merged.float() - delta).to(w.dtype)
    wrong = (back != w).view(-1).nonzero().squeeze(1)
    idx_bytes = 4 if w.numel() < 2**31 else 8
    if wrong.numel() * (idx_bytes + w.element_size()) >= w.numel() * w.element_size():
        fix = (None, w.clone())  # delta large next to w (rare for LoRA): a plain copy is smaller
    else:  # typical LoRA deltas: ~1% of entries
        fix = (wrong.to(torch.int32) if idx_bytes == 4 else wrong, w.reshape(-1)[wrong].clone())
    w.copy_(merged)
    return fix


def _unmerge_exact(w: torch.Tensor, delta: torch.Tensor, fix):
    idx, vals = fix
    if idx is None:
        w.copy_(vals)
        return
    w.copy_((w.float() - delta).to(w.dtype))
    w.view(-1)[idx.long()] = vals


class LoRALinear(nn.Module):
    """A bias-free linear with a frozen base `weight` (Parameter or NF4Weight) plus lora_a (r, in), lora_b (out, r)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 lora_dtype: torch.dtype = torch.float32, name: str = "LoRALinear"):
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
        self.enabled, self.merged, self._fix = True, False, None

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, NF4Weight):
            return nf4_linear(x, self.weight)
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        if self.merged or not self.enabled:
            return out
        h = F.linear(self.dropout(x).to(self.lora_a.dtype), self.lora_a)  # (..., r)
        return out + (F.linear(h, self.lora_b) * self.scaling).to(out.dtype)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """scaling * B @ A in float32. (out, in)"""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling

    def set_factors(self, a: torch.Tensor, b: torch.Tensor, scaling: float, name: str):
        """Load A (r, in), B (out, r) (rank may differ from the current one); shapes are checked against the base."""
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != self.in_features or b.shape != (self.out_features, r):
            raise ValueError(f"{name}: adapter lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                             f"weight (out={self.out_features}, in={self.in_features}): expected lora_A (r, "
                             f"{self.in_features}) and lora_B ({self.out_features}, r); adapter for another model?")
        dtype, device = self.lora_a.dtype, self.lora_a.device
        self.lora_a = nn.Parameter(_copy(a, device, dtype), requires_grad=self.lora_a.requires_grad)
        self.lora_b = nn.Parameter(_copy(b, device, dtype), requires_grad=self.lora_b.requires_grad)
        self.rank, self.scaling = r, scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


class LoRAExperts(nn.Module):
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
        self.enabled, self.merged, self._fix = True, False, None

    def _adapted(self, w: str) -> bool:
        return w in self.targets and not self.merged and self.enabled

    def _linear(self, w: str, e: int, x: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, w)
        out = nf4_linear(x, weight, e) if isinstance(weight, NF4Weight) else F.linear(x, weight[e])
        if not self._adapted(w):
            return out
        a, b = getattr(self, f"lora_{w}_a")[e], getattr(self, f"lora_{w}_b")[e]
        h = F.linear(self.dropout(x).to(a.dtype), a)  # (n, r)
        return out + (F.linear(h, b) * self.scaling[w]).to(out.dtype)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its routed tokens. (n, D) -> (n, D)"""
        return self._linear("w2", e, F.silu(self._linear("w1", e, x)) * self._linear("w3", e, x))

    def _grouped(self, w: str, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, w)
        out = (nf4_grouped_linear(xs, weight, offsets) if isinstance(weight, NF4Weight)
               else grouped_linear(xs, weight, offsets))  # (M, out)
        if not self._adapted(w):
            return out
        a, b = getattr(self, f"lora_{w}_a"), getattr(self, f"lora_{w}_b")
        h = grouped_linear(self.dropout(xs).to(a.dtype), a, offsets)  # (M, r)
        return out + (grouped_linear(h, b, offsets) * self.scaling[w]).to(out.dtype)

    def grouped_ok(self, x: torch.Tensor) -> bool:
        factors = [getattr(self, f"lora_{w}_{ab}") for w in self.targets for ab in "ab"]
        return (grouped_mm_ok(x.device, x.dtype, self.w1, self.w2, self.w3)
                and (not factors or grouped_mm_ok(x.device, factors[0].dtype, *factors)))

    def grouped_forward(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Every expert on its slots at once. xs (M, D) sorted by expert -> (M, D)"""
        h = F.silu(self._grouped("w1", xs, offsets)) * self._grouped("w3", xs, offsets)  # (M, F)
        return self._grouped("w2", h, offsets)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        return dispatch(self, x, weights, expert_idx)

    @torch.no_grad()
    def delta(self, w: str, e: int) -> torch.Tensor:
        """scaling * B[e] @ A[e] in float32 for target weight w. (out, in)"""
        a, b = getattr(self, f"lora_{w}_a")[e], getattr(self, f"lora_{w}_b")[e]
        return (b.float() @ a.float()) * self.scaling[w]

    def set_factors(self, a: torch.Tensor, b: torch.Tensor, scaling: float, name: str, w: str):
        """Load A (E, r, in), B (E, out, r) for target weight w; shapes are checked against the base stack."""
        if w not in self.targets:
            raise ValueError(f"{name}.{w}: the adapter has factors for {w} but LoRA targets only {self.targets}")
        E, out_f, in_f = getattr(self, w).shape
        r = a.shape[1] if a.dim() == 3 else -1
        if a.dim() != 3 or a.shape[0] != E or a.shape[2] != in_f or b.shape != (E, out_f, r):
            raise ValueError(f"{name}.{w}: adapter factors A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the "
                             f"base experts ({E}, {out_f}, {in_f}): expected A ({E}, r, {in_f}), B ({E}, {out_f}, r); "
                             "adapter for another model?")
        old = getattr(self, f"lora_{w}_a")
        setattr(self, f"lora_{w}_a", nn.Parameter(_copy(a, old.device, old.dtype), requires_grad=old.requires_grad))
        setattr(self, f"lora_{w}_b", nn.Parameter(_copy(b, old.device, old.dtype), requires_grad=old.requires_grad))
        self.rank[w], self.scaling[w] = r, scaling

    def extra_repr(self) -> str:
        return f"experts={self.w1.shape[0]}, targets={self.targets}, rank={self.rank}"


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


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: Iterable[str] | str = ("q_proj", "v_proj"), use_rslora: bool = False,
               lora_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Swap the targeted linears (and Mixtral experts/router) for LoRA modules; freeze every other parameter."""
    _check_hparams(rank, alpha, dropout, "apply_lora")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    is_moe = any(isinstance(m, (Experts, NF4Experts, LoRAExperts)) for m in model.modules())
    linears, expert_ws, router = _resolve_targets(targets, is_moe)
    for p in model.parameters():
        p.requires_grad_(False)
    found = set()
    for path, module in list(model.named_modules()):
        parent_path, _, leaf = path.rpartition(".")
        kw = dict(rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, lora_dtype=lora_dtype, name=path)
        in_ffn_or_attn = ".attention." in f".{path}" or ".feed_forward." in f".{path}"
        if isinstance(module, LoRALinear):  # already adapted (apply_lora twice): counts as found, left as is
            found.add("router" if leaf == "gate" else leaf)
            continue
        if isinstance(module, LoRAExperts):
            found |= {f"experts.{w}" for w in module.targets}
            continue
        if isinstance(module, (nn.Linear, NF4Linear)) and (
                (leaf in linears and (in_ffn_or_attn or path == "output"))
                or (router and leaf == "gate" and path.endswith("feed_forward.gate"))):
            new = LoRALinear(module, **kw)
            found.add("router" if leaf == "gate" else leaf)
        elif isinstance(module, (Experts, NF4Experts)) and expert_ws:
            new = LoRAExperts(module, weights=expert_ws, **kw)
            found |= {f"experts.{w}" for w in expert_ws}
        else:
            continue
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, new)
    missing = [w for w in sorted(linears) if w not in found] + [f"experts.{w}" for w in sorted(expert_ws)
                                                                 if f"experts.{w}" not in found]
    missing += ["router"] if router and "router" not in found else []
    if missing and "all-linear" not in targets:
        raise ValueError(f"apply_lora: targets {list(targets)} found no module for {missing} in this "
                         f"{'MoE' if is_moe else 'dense'} model (Mixtral FFNs are 'experts'/'w1'/'w2'/'w3', 'router')")
    return model


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA factors, for the optimizer."""
    return [p for n, p in model.named_parameters() if n.rpartition(".")[2].startswith("lora_")]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA factors, under our module names (e.g. 'layers.0.attention.wq.lora_a')."""
    return {k: v for k, v in model.state_dict().items() if k.rpartition(".")[2].startswith("lora_")}


def set_lora_enabled(model: nn.Module, enabled: bool):
    """Switch the LoRA path off (base-model outputs) or back on, without touching weights."""
    for name, m in lora_modules(model):
        if m.merged and not enabled:
            raise ValueError(f"set_lora_enabled: {name} is merged into its base weight; call unmerge_lora first")
        m.enabled = enabled


def _check_mergeable(model: nn.Module, name: str, weight):
    if isinstance(weight, NF4Weight):
        raise ValueError(f"merge_lora: {name} has an NF4 base; merging would re-quantize it. Merge into the float "
                         "checkpoint instead: python -m minillama.merge --base ... --adapter ...")
    emb = getattr(model, "tok_embeddings", None)
    if emb is not None and weight is emb.weight:
        raise ValueError(f"merge_lora: {name} shares its weight with tok_embeddings (tied); merging would change "
                         "the embeddings too")


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight in the base dtype (float32 math, rounded once); exact to undo."""
    for name, m in lora_modules(model):
        if m.merged:
            continue
        if isinstance(m, LoRALinear):
            _check_mergeable(model, name, m.weight)
            m._fix = _merge_exact(m.weight.data, m.delta())
        else:
            for w in m.targets:
                _check_mergeable(model, f"{name}.{w}", getattr(m, w))
            m._fix = {(w, e): _merge_exact(getattr(m, w).data[e], m.delta(w, e))
                      for w in m.targets for e in range(m.w1.shape[0])}
        m.merged = True
    return model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora: base weights come back bit-for-bit (the LoRA factors must not have changed in between)."""
    for name, m in lora_modules(model):
        if not m.merged:
            continue
        if isinstance(m, LoRALinear):
            _unmerge_exact(m.weight.data, m.delta(), m._fix)
        else:
            for (w, e), fix in m._fix.items():
                _unmerge_exact(getattr(m, w).data[e], m.delta(w, e), fix)
        m.merged, m._fix = False, None
    return model


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
