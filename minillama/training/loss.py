"""Training losses: chunked cross-entropy and per-token log-probs (never the full (N, V) logits) and the MoE router
loss; CausalLMLoss (SFT) and SequenceLogprobs (preference tuning) are the modules FSDP shards as its root.

Shape letters: B rows, L row length, N learned positions, D model dim, V vocabulary.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data import IGNORE
from ..moe import MoEFeedForward, load_balancing_loss


def frozen_head(project: Callable) -> Optional[torch.Tensor]:
    """The output layer's weight when it is a plain bias-free linear that does not train (LoRA's usual case), else
    None (full fine-tuning, a trained embedding tied to it, LoRA on the head: their logits are recomputed instead)."""
    if isinstance(project, nn.Linear) and project.bias is None and not project.weight.requires_grad:
        return project.weight
    return None


def _nll_chunks(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                grad_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """-log p(target) of each row of h (N, D) through the head weight (V, D), float32 (N,); with grad_rows (N, D),
    each row's d nll / d h is written there in the same pass, so no logits outlive their chunk."""
    nll = torch.empty(len(h), dtype=torch.float32, device=h.device)
    for i in range(0, len(h), chunk_size):
        c, t = slice(i, i + chunk_size), targets[i:i + chunk_size]
        logits = F.linear(h[c], weight).float()  # (n, V): the only (n, V) buffer; everything below is in place
        top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
        picked = logits.gather(1, t[:, None])  # (n, 1) the target's logit, before the buffer is overwritten
        e = logits.sub_(top).exp_()  # exp(logit - max)
        total = e.sum(dim=-1, keepdim=True)  # (n, 1)
        nll[c] = (top + total.log() - picked).squeeze(1)  # logsumexp - target logit
        if grad_rows is not None:  # d nll / d logits = softmax - one-hot
            probs = e.div_(total)
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            grad_rows[c] = F.linear(probs.to(h.dtype), weight.t())  # (n, D)
    return nll


class _FrozenHeadNLL(torch.autograd.Function):
    """-log p(target) per row through a frozen head, its gradient with respect to h worked out in forward: backward
    only scales the saved (N, D) rows. Checkpointed chunks would recompute every logit (a third head matmul)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        rows = torch.empty_like(h)
        nll = _nll_chunks(h, weight, targets, chunk_size, rows)
        ctx.save_for_backward(rows)
        return nll

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, = ctx.saved_tensors
        return rows * grad[:, None].to(rows.dtype), None, None, None


def frozen_head_nll(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """-log p(target) of each row of h (N, D) through a frozen head weight, float32 (N,), chunk_size rows at a time."""
    if torch.is_grad_enabled() and h.requires_grad:
        return _FrozenHeadNLL.apply(h, weight, targets, chunk_size)
    return _nll_chunks(h, weight, targets, chunk_size)


def _chunk_loss(project: Callable, h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = project(h).float()  # (n, V): the only logits alive at any time
    return (F.cross_entropy(logits, targets, reduction="none") * weight).sum()


def chunked_cross_entropy(hidden: torch.Tensor, project: Callable, targets: torch.Tensor,
                          chunk_size: int = 1024) -> torch.Tensor:
    """Sum of next-token cross-entropies over positions whose target is not IGNORE, in float32.

    hidden (..., D) final-normed states, project: hidden -> logits (the output layer), targets (...) aligned with
    hidden. Only learned positions are projected, chunk_size at a time, and no chunk's logits are kept for backward:
    a frozen head's gradient is formed in the same pass (frozen_head_nll), a trained one's chunks are checkpointed
    and recomputed in backward. Peak logits memory is about chunk_size * V floats.
    """
    h = hidden.reshape(-1, hidden.shape[-1])  # (B*L, D)
    t = targets.reshape(-1)
    keep = torch.nonzero(t != IGNORE).flatten()  # (N,)
    weight = torch.ones(len(keep), device=h.device)
    if len(keep) == 0:
        # nothing to learn here, but under FSDP every rank must run the same backward (its collectives would
        # hang otherwise): project one position with weight 0
        keep = torch.zeros(1, dtype=torch.long, device=h.device)
        weight = torch.zeros(1, device=h.device)
    h, t = h[keep], t[keep].clamp(min=0)  # (N, D), (N,)
    head = frozen_head(project)
    if head is not None:
        return (frozen_head_nll(h, head, t, chunk_size) * weight).sum()
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, len(keep), chunk_size):
        c = slice(i, i + chunk_size)
        total = total + checkpoint(_chunk_loss, project, h[c], t[c], weight[c], use_reentrant=False)
    return total


def _chunk_logps(project: Callable, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(project(h).float(), targets, reduction="none")  # (n,) log p(target)


def chunked_token_logprobs(hidden: torch.Tensor, project: Callable, targets: torch.Tensor,
                           chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) of every learned position, float32 -> (logps (N,), flat positions into hidden's rows (N,)).

    Projected chunk_size positions at a time, as chunked_cross_entropy. With nothing to learn,
    one position is projected and its log-prob times 0 returned at position -1 (every FSDP rank must run the same
    backward)."""
    h = hidden.reshape(-1, hidden.shape[-1])  # (B*L, D)
    t = targets.reshape(-1)
    keep = torch.nonzero(t != IGNORE).flatten()  # (N,)
    empty = len(keep) == 0
    if empty:
        keep = torch.zeros(1, dtype=torch.long, device=h.device)
    h, t = h[keep], t[keep].clamp(min=0)
    head = frozen_head(project)
    if head is not None:
        logps = -frozen_head_nll(h, head, t, chunk_size)
        return (logps * 0.0, keep - 1) if empty else (logps, keep)
    parts = [checkpoint(_chunk_logps, project, h[i:i + chunk_size], t[i:i + chunk_size], use_reentrant=False)
             for i in range(0, len(keep), chunk_size)]
    logps = torch.cat(parts)
    return (logps * 0.0, keep - 1) if empty else (logps, keep)


def router_aux_loss(moe_layers: list, args, real: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The Mixtral load-balancing loss of the last forward (0 for a dense model), padding excluded."""
    if not moe_layers:
        return like.new_zeros(())
    logits = [m.router_logits for m in moe_layers]
    mask = None if real is None else real.reshape(-1)
    if mask is not None and not mask.any():
        # only filler rows (an epoch's topped-up last batch): no token to balance; the masked mean would be
        # 0/0 = NaN. A zero that still depends on the router keeps backward the same on every rank.
        return sum(r.sum() for r in logits).float() * 0.0
    return load_balancing_loss(logits, args.n_experts, args.n_experts_per_tok, token_mask=mask)


class CausalLMLoss(nn.Module):
    """The trained unit: model forward + chunked loss in one forward, so FSDP's root owns the output layer.

    Sharding this wrapper as the FSDP root keeps tok_embeddings, norm and output (tied or not) in the root unit;
    their weights stay gathered through the loss computation and its checkpointed recomputation in backward.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.moe_layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, doc_ids: Optional[torch.Tensor] = None,
                real: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                attn=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, router load-balancing loss or 0). tokens/targets/doc_ids/real (B, L); positions and
        attn: a context-parallel shard's own (see Transformer.forward)."""
        hidden = self.model(tokens, doc_ids=doc_ids, return_hidden=True, positions=positions, attn=attn)  # (B, L, D)
        ce_sum = chunked_cross_entropy(hidden, self.model.output, targets, self.chunk_size)
        return ce_sum, router_aux_loss(self.moe_layers, self.model.args, real, ce_sum)


class SequenceLogprobs(nn.Module):
    """The trained unit for preference tuning: model forward over doc-masked rows, then the sum of learned-token
    log-probs per document (chunked like the SFT loss), so FSDP's root again owns the output layer."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.moe_layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor, doc_index: torch.Tensor,
                n_docs: int, real: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-prob sum per document (n_docs,), router loss or 0, a zero that depends on the whole graph).

        tokens/targets/doc_ids/real (B, L); doc_index (B, L): the document of each learned target, -1 elsewhere."""
        hidden = self.model(tokens, doc_ids=doc_ids, return_hidden=True)  # (B, L, D)
        logps, pos = chunked_token_logprobs(hidden, self.model.output, targets, self.chunk_size)
        sums = logps.new_zeros(n_docs)
        valid = pos >= 0
        sums = sums.index_add(0, doc_index.reshape(-1)[pos[valid]], logps[valid])
        return sums, router_aux_loss(self.moe_layers, self.model.args, real, logps), logps.sum() * 0.0
