"""Context parallelism: every row's sequence is split over the C processes of a context group, so a row may be
longer than one device holds. Hooked in from outside the model: each shard is fed with its own positions and an
attention kernel (AttnMask.kernel) that sees the whole row.

Layout: world = dp x C processes; rank = dp_rank * C + cp_rank, so a context group is C consecutive ranks (one node's
GPUs, the fastest links). FSDP2 shards parameters over all ranks: the ranks of a context group hold the same
parameters, and their gradients (each from its part of the rows) sum exactly as data-parallel ranks' do, so one
flat mesh is both the simplest layout and the one that spreads parameters and optimizer state thinnest.

Split with causal load balancing: a row (padded to a multiple of 2C) is cut into 2C chunks, rank r holds chunks r
and 2C-1-r (an early chunk sees few keys, its mirror many), with the positions and doc ids of exactly those tokens.
Attention: each layer all-gathers the group's K/V (one collective; its backward reduce-scatters the K/V gradients
back), and each rank attends its queries over the whole row with blocked_attention, which applies the document
mask, GQA and causality by row position without a (T, T) mask. This is Llama 3's all-gather context parallelism:
K/V are small under GQA, and document masks cost nothing extra. The loss is a sum over each rank's own targets,
normalized by the global count of learned tokens, as without context parallelism.
Shape letters: B rows, L padded row length, C context-group size, K kv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..attention import AttnMask, doc_positions
from ..blocked_attention import KeyPlan, blocked_attention, plan_keys
from .data import IGNORE
from .packing import MicroBatch


@dataclass
class ContextGroup:
    """This process's place in the dp x C layout."""

    size: int  # C
    rank: int  # cp rank inside the group
    group: object  # the context group's ProcessGroup
    dp_size: int
    dp_rank: int


def context_group(c: int) -> Optional[ContextGroup]:
    """Split the (initialized) world into groups of c consecutive ranks; None for c == 1."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % c:
        raise ValueError(f"--context_parallel {c} must divide the {world} processes (world = data x context)")
    if c == 1:
        return None
    group, _ = dist.new_subgroups(c)  # every rank creates every group, in the same order
    return ContextGroup(c, rank % c, group, world // c, rank // c)


def shard_indices(length: int, c: int, r: int) -> list[int]:
    """Row positions rank r of a c-group holds: chunks r and 2c-1-r of 2c equal chunks."""
    n = length // (2 * c)
    return list(range(r * n, (r + 1) * n)) + list(range((2 * c - 1 - r) * n, (2 * c - r) * n))


class _GatherRow(torch.autograd.Function):
    """(2, B, K, L/C, D) this rank's K/V chunks -> (2, B, K, L, D) the whole row's, in row order. Backward:
    every rank's gradient for a chunk is summed onto the rank that holds it (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, kv: torch.Tensor, cg: ContextGroup):
        ctx.cg = cg
        parts = [torch.empty_like(kv) for _ in range(cg.size)]
        dist.all_gather(parts, kv.contiguous(), group=cg.group)
        chunks = [None] * (2 * cg.size)
        for j, part in enumerate(parts):  # rank j holds chunks j and 2C-1-j
            chunks[j], chunks[2 * cg.size - 1 - j] = part.chunk(2, dim=3)
        return torch.cat(chunks, dim=3)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cg = ctx.cg
        c2 = 2 * cg.size
        chunks = grad.chunk(c2, dim=3)
        per_rank = torch.stack([torch.cat([chunks[j], chunks[c2 - 1 - j]], dim=3) for j in range(cg.size)])
        if per_rank.is_cuda:
            out = torch.empty_like(per_rank[0])
            dist.reduce_scatter_tensor(out, per_rank.contiguous(), group=cg.group)
            return out, None
        dist.all_reduce(per_rank, group=cg.group)  # gloo has no reduce-scatter: sum everywhere, keep ours
        return per_rank[cg.rank].clone(), None


def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: KeyPlan, cg: ContextGroup) -> torch.Tensor:
    """This rank's queries over the whole row. q (B, H, L/C, D), k/v (B, K, L/C, D) -> (B, H, L/C, D)."""
    kv = _GatherRow.apply(torch.stack([k, v]), cg)  # (2, B, K, L, D)
    return blocked_attention(q, kv[0], kv[1], plan)


def _pad_to(x: torch.Tensor, length: int, value) -> torch.Tensor:
    return torch.cat([x, x.new_full((x.shape[0], length - x.shape[1]), value)], dim=1) if length > x.shape[1] else x


def shard_batch(mb: MicroBatch, cg: ContextGroup, pad_id: int, device, window: Optional[int] = None) -> dict:
    """CausalLMLoss keyword arguments for this rank's part of a micro-batch's rows (window: sliding window)."""
    B, L = mb.tokens.shape
    c2 = 2 * cg.size
    Lp = -(-L // c2) * c2  # padding at the end: a document of its own (packed) or masked out causally (not packed)
    tokens, targets = _pad_to(mb.tokens, Lp, pad_id), _pad_to(mb.targets, Lp, IGNORE)
    real = _pad_to(mb.real, Lp, False)
    if mb.doc_ids is not None:
        doc_ids = _pad_to(mb.doc_ids, Lp, int(mb.doc_ids.max()) + 1)
        positions = doc_positions(doc_ids)
        k_doc = doc_ids.to(device)
    else:
        doc_ids, positions, k_doc = None, torch.arange(Lp).expand(B, Lp), None
    first = torch.arange(Lp) - positions  # each token's document start: the earliest key it may see
    if window is not None:
        first = torch.maximum(first, torch.arange(Lp) - window + 1)
    first = first.min(dim=0).values.tolist()  # over the rows: non-decreasing, as plan_keys needs
    idx = shard_indices(Lp, cg.size, cg.rank)
    q_doc = k_doc[:, idx] if k_doc is not None else None
    plan = plan_keys(idx, list(range(Lp)), [first[i] for i in idx], device, q_doc, k_doc, window)
    attn = AttnMask(causal_only=False, kernel=lambda q, k, v: cp_attention(q, k, v, plan, cg))
    return dict(tokens=tokens[:, idx].to(device), targets=targets[:, idx].to(device), real=real[:, idx].to(device),
                positions=positions[:, idx].to(device), attn=attn)


def check_supported(model_args, router_aux_loss_coef: float) -> None:
    """What context parallelism cannot do yet, before any work."""
    scaling = model_args.rope_scaling
    if scaling and scaling["rope_type"] == "dynamic":
        raise ValueError("--context_parallel: dynamic NTK RoPE rescales by the longest position each process sees, "
                         "which differs between the processes of a row; use yarn/linear/llama3 or a --rope_theta")
    if model_args.n_experts and router_aux_loss_coef:
        raise ValueError("--context_parallel: the Mixtral router loss would be computed per piece of a row; give "
                         "--router_aux_loss_coef 0")


__all__ = ["ContextGroup", "context_group", "shard_indices", "shard_batch", "cp_attention", "check_supported"]
