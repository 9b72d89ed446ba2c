"""Memory-bounded attention in plain PyTorch for masks no fused kernel takes: sliding windows over packed documents,
and queries that hold only part of a row (context parallelism). FlashAttention's algorithm: an online softmax over
key blocks in forward, the scores recomputed block by block in backward from the saved log-sum-exp, so memory is
O(T x block) instead of O(T x S) however long the row. Blocks that no query may see are skipped.

Which keys a query sees is given in row positions: query i sees key j iff k_pos[j] <= q_pos[i], both are in the same
document, and q_pos[i] - k_pos[j] < window. Shape letters: B batch, H query heads, K kv heads, R = H / K, T queries,
S keys, D head dim.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional

import torch

BLOCK = 512


@dataclass
class KeyPlan:
    """What every query may see, and the (query block, key blocks) pairs worth computing; shared by all layers."""

    q_pos: torch.Tensor  # (T,) long: each query's position in the row, increasing
    k_pos: torch.Tensor  # (S,) long: each key's position in the row, increasing
    q_doc: Optional[torch.Tensor]  # (B, T) document ids, None = one document per row
    k_doc: Optional[torch.Tensor]  # (B, S)
    window: Optional[int]
    blocks: list  # [(q start, q end, [(k start, k end), ...])], host ints

    def visible(self, qs: int, qe: int, ks: int, ke: int) -> torch.Tensor:
        """(B|1, 1, 1, tq, tk) bool: which keys of block [ks, ke) the queries of block [qs, qe) see."""
        qp, kp = self.q_pos[qs:qe, None], self.k_pos[None, ks:ke]
        ok = (kp <= qp)[None]  # (1, tq, tk)
        if self.window is not None:
            ok = ok & (qp - kp < self.window)[None]
        if self.q_doc is not None:
            ok = ok & (self.q_doc[:, qs:qe, None] == self.k_doc[:, None, ks:ke])
        return ok[:, None, None]


def plan_keys(q_pos: list[int], k_pos: list[int], q_first: list[int], device, q_doc=None, k_doc=None,
              window: Optional[int] = None, block: int = BLOCK) -> KeyPlan:
    """Plan the blocks. q_pos/k_pos: increasing row positions (host lists); q_first: the smallest key position any
    row's query i may see (its document's start, or the window's), non-decreasing; every query must see itself."""
    blocks = []
    for qs in range(0, len(q_pos), block):
        qe = min(qs + block, len(q_pos))
        lo, hi = q_first[qs], q_pos[qe - 1]
        ka, kb = bisect.bisect_left(k_pos, lo), bisect.bisect_right(k_pos, hi)
        blocks.append((qs, qe, [(ks, min(ks + block, kb)) for ks in range(ka, kb, block)]))
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return KeyPlan(as_tensor(q_pos), as_tensor(k_pos), q_doc, k_doc, window, blocks)


def _scores(qb: torch.Tensor, kb: torch.Tensor, plan: KeyPlan, qs, qe, ks, ke, scale: float) -> torch.Tensor:
    """Masked float32 scores of one block pair. qb (B, K, R, tq, D), kb (B, K, 1, tk, D) -> (B, K, R, tq, tk)."""
    s = (qb.float() @ kb.float().transpose(-1, -2)) * scale
    return s.masked_fill(~plan.visible(qs, qe, ks, ke), float("-inf"))


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: KeyPlan):
        B, H, T, D = q.shape
        K = k.shape[1]
        scale = D ** -0.5
        q5, k5, v5 = q.view(B, K, H // K, T, D), k[:, :, None], v[:, :, None]  # (B, K, R|1, T|S, D)
        out = torch.zeros(q5.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((*q5.shape[:-1], 1), float("-inf"), device=q.device)  # (B, K, R, T, 1)
        for qs, qe, kblocks in plan.blocks:
            qb = q5[..., qs:qe, :]
            m = torch.full((*qb.shape[:-1], 1), float("-inf"), device=q.device)
            total = torch.zeros_like(m)
            acc = torch.zeros(qb.shape, dtype=torch.float32, device=q.device)
            for ks, ke in kblocks:
                s = _scores(qb, k5[..., ks:ke, :], plan, qs, qe, ks, ke, scale)
                m_new = torch.maximum(m, s.amax(-1, keepdim=True))
                shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with nothing yet
                p = torch.exp(s - shift)
                corr = torch.exp(m - shift)
                total = total * corr + p.sum(-1, keepdim=True)
                acc = acc * corr + p @ v5[..., ks:ke, :].float()
                m = m_new
            out[..., qs:qe, :] = acc / total
            lse[..., qs:qe, :] = m + torch.log(total)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out.to(q.dtype).view(B, H, T, D)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan = ctx.plan
        B, H, T, D = q.shape
        K = k.shape[1]
        scale = D ** -0.5
        q5, k5, v5 = q.view(B, K, H // K, T, D), k[:, :, None], v[:, :, None]
        do = dout.reshape(q5.shape).float()
        delta = (do * out).sum(-1, keepdim=True)  # (B, K, R, T, 1): rowsum(dO * O)
        dq = torch.zeros(q5.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)  # (B, K, S, D)
        dv = torch.zeros_like(dk)
        for qs, qe, kblocks in plan.blocks:
            qb, dob = q5[..., qs:qe, :], do[..., qs:qe, :]
            for ks, ke in kblocks:
                kb, vb = k5[..., ks:ke, :].float(), v5[..., ks:ke, :].float()
                p = torch.exp(_scores(qb, kb, plan, qs, qe, ks, ke, scale) - lse[..., qs:qe, :])  # (B,K,R,tq,tk)
                dv[:, :, ks:ke] += (p.transpose(-1, -2) @ dob).sum(2)
                ds = p * (dob @ vb.transpose(-1, -2) - delta[..., qs:qe, :])
                dq[..., qs:qe, :] += (ds @ kb) * scale
                dk[:, :, ks:ke] += (ds.transpose(-1, -2) @ qb.float()).sum(2) * scale
        return dq.to(q.dtype).view(B, H, T, D), dk.to(k.dtype), dv.to(v.dtype), None


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: KeyPlan) -> torch.Tensor:
    """Attention with GQA over what plan allows. q (B, H, T, D), k/v (B, K, S, D) -> (B, H, T, D)."""
    return _BlockedAttention.apply(q, k, v, plan)
