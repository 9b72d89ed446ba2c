"""Training losses: chunked cross-entropy (never the full (N, V) logits) and the MoE router loss, in one module.

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


def _chunk_loss(project: Callable, h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = project(h).float()  # (n, V): the only logits alive at any time
    return (F.cross_entropy(logits, targets, reduction="none") * weight).sum()


def chunked_cross_entropy(hidden: torch.Tensor, project: Callable, targets: torch.Tensor,
                          chunk_size: int = 1024) -> torch.Tensor:
    """Sum of next-token cross-entropies over positions whose target is not IGNORE, in float32.

    hidden (..., D) final-normed states, project: hidden -> logits (the output layer), targets (...) aligned with
    hidden. Only learned positions are projected, chunk_size at a time; each chunk is checkpointed, so its logits
    are recomputed in backward instead of being kept: peak logits memory is chunk_size * V floats.
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
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, len(keep), chunk_size):
        c = slice(i, i + chunk_size)
        total = total + checkpoint(_chunk_loss, project, h[c], t[c], weight[c], use_reentrant=False)
    return total


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
        aux = ce_sum.new_zeros(())
        if self.moe_layers:
            args = self.model.args
            logits = [m.router_logits for m in self.moe_layers]
            mask = None if real is None else real.reshape(-1)
            if mask is not None and not mask.any():
                # only filler rows (an epoch's topped-up last batch): no token to balance; the masked mean would
                # be 0/0 = NaN. A zero that still depends on the router keeps backward the same on every rank.
                aux = sum(r.sum() for r in logits).float() * 0.0
            else:
                aux = load_balancing_loss(logits, args.n_experts, args.n_experts_per_tok, token_mask=mask)
        return ce_sum, aux
