"""Folding the selected adapter(s) into the base weights and back, exactly: merge_lora / unmerge_lora."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .experts import LoRAExperts
from .slots import lora_modules
from ..quant import NF4Weight


def _merge_exact(w: torch.Tensor, merged_f32: torch.Tensor, undo: Callable[[torch.Tensor], torch.Tensor]):
    """w <- round(merged_f32) in place; returns what unmerge needs to restore w bit-for-bit.

    undo(merged float32) is how unmerge estimates w from the merged weight (minus the LoRA delta; DoRA also divides
    by g). Unmerging applies it and fixes the entries where rounding lost information, so the model keeps no second
    copy of its weights, only those entries' positions and original values (measured: 0.6-1.4% of entries for
    LoRA deltas ~5% of |w|; never more bytes than a copy, which is kept instead when it would be smaller).
    """
    merged = merged_f32.to(w.dtype)
    back = undo(merged.float()).to(w.dtype)
    wrong = (back != w).view(-1).nonzero().squeeze(1)
    idx_bytes = 4 if w.numel() < 2**31 else 8
    if wrong.numel() * (idx_bytes + w.element_size()) >= w.numel() * w.element_size():
        fix = (None, w.clone())  # delta large next to w (rare for LoRA): a plain copy is smaller
    else:  # typical LoRA deltas: ~1% of entries
        fix = (wrong.to(torch.int32) if idx_bytes == 4 else wrong, w.reshape(-1)[wrong].clone())
    w.copy_(merged)
    return fix


def _unmerge_exact(w: torch.Tensor, undo: Callable[[torch.Tensor], torch.Tensor], fix):
    idx, vals = fix
    if idx is None:
        w.copy_(vals)
        return
    w.copy_(undo(w.float()).to(w.dtype))
    w.view(-1)[idx.long()] = vals


def _check_mergeable(model: nn.Module, name: str, weight):
    if isinstance(weight, nn.Module):  # NF4Weight, weight_only.Int8Weight / Int4Weight
        kind = "an NF4" if isinstance(weight, NF4Weight) else "a quantized"
        raise ValueError(f"merge_lora: {name} has {kind} base; merging would re-quantize it. Merge into the float "
                         "checkpoint instead: minillama-merge --base ... --adapter ...")
    emb = getattr(model, "tok_embeddings", None)
    if emb is not None and weight is emb.weight:
        raise ValueError(f"merge_lora: {name} shares its weight with tok_embeddings (tied); merging would change "
                         "the embeddings too")


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the selected adapter(s) into each base weight in the base dtype (float32 math, rounded once); exact to
    undo with unmerge_lora. DoRA: W <- g (W + scaling B A)."""
    for name, m in lora_modules(model):
        if m.merged:
            continue
        if m._rows is not None:
            raise ValueError(f"merge_lora: {name} has per-row adapters (set_row_adapters); set one adapter first")
        if not isinstance(m, LoRAExperts):
            _check_mergeable(model, name, m.weight)
            target, undo, g = m.merge_target()
            m._fix, m._merged_g = _merge_exact(m.weight.data, target(m.weight.data.float()), undo), g
        else:
            fixes = {}
            for w in ("w1", "w2", "w3"):
                if not m._terms(w):
                    continue
                _check_mergeable(model, f"{name}.{w}", getattr(m, w))
                for e in range(m.n_experts):
                    target, undo = m.merge_target(w, e)
                    we = getattr(m, w).data[e]
                    fixes[(w, e)] = _merge_exact(we, target(we.float()), undo)
            m._fix = fixes
        m.merged = True
    return model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora: base weights come back bit-for-bit (factors and selection must not have changed since)."""
    for name, m in lora_modules(model):
        if not m.merged:
            continue
        m.merged = False  # merge_target reads the selection as of the merge
        if not isinstance(m, LoRAExperts):
            _unmerge_exact(m.weight.data, m.merge_target(m._merged_g)[1], m._fix)
        else:
            for (w, e), fix in m._fix.items():
                _unmerge_exact(getattr(m, w).data[e], m.merge_target(w, e)[1], fix)
        m._fix = None
        m._cache.clear()
    return model
