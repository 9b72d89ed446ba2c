"""Attention kernels and masks: SDPA by default, flash-attn's varlen kernel for packed rows when installed on a GPU.

Shape letters: B batch, T query length, S key length, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

try:  # optional: pip install minillama[flash]
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # type: ignore
except Exception:  # ImportError, or a broken CUDA build on a CPU machine
    flash_attn_func = flash_attn_varlen_func = None


@dataclass
class AttnMask:
    """What a forward's attention may see; built once per forward and shared by all layers."""

    causal_only: bool = True  # plain causal over the row: use the kernels' is_causal fast path
    mask: Optional[torch.Tensor] = None  # (B, 1, T, S) bool, True = may attend
    cu_seqlens: Optional[torch.Tensor] = None  # packed rows as varlen: (n_docs + 1,) int32 offsets (B == 1)
    max_seqlen: int = 0


def doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document, restarting at 0 where doc_ids changes. (B, T) -> (B, T)"""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def packed_mask(doc_ids: torch.Tensor, sliding_window: Optional[int] = None) -> AttnMask:
    """Causal attention within each document of a packed row. doc_ids (B, T)."""
    B, T = doc_ids.shape
    q = torch.arange(T, device=doc_ids.device)
    allowed = (q[None, :] <= q[:, None])[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T)
    if sliding_window is not None:
        allowed &= (q[:, None] - q[None, :] < sliding_window)[None]
    out = AttnMask(causal_only=False, mask=allowed[:, None])
    if flash_attn_varlen_func is not None and doc_ids.is_cuda and B == 1 and sliding_window is None:
        # documents are contiguous runs; varlen attention skips the masked blocks entirely
        starts = torch.nonzero(torch.diff(doc_ids[0], prepend=doc_ids[0, :1] - 1)).flatten()
        out.cu_seqlens = torch.cat([starts, starts.new_tensor([T])]).to(torch.int32)
        out.max_seqlen = int(torch.diff(out.cu_seqlens).max())
    return out


def cache_mask(start_pos: int, T: int, S: int, pad_lens: Optional[torch.Tensor], device,
               sliding_window: Optional[int] = None) -> AttnMask:
    """Queries at cache slots [start_pos, start_pos+T) over keys [0, S): causal, minus each row's left padding."""
    if pad_lens is None and sliding_window is None and start_pos + T == S and (T == S or T == 1):
        return AttnMask(causal_only=True)  # a full prefill, or one new token that sees every cached key
    q = torch.arange(start_pos, start_pos + T, device=device)[:, None]  # (T, 1)
    k = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = (k <= q)[None]  # (1, T, S)
    if sliding_window is not None:
        allowed = allowed & (q - k < sliding_window)[None]
    if pad_lens is not None:
        not_pad = k[None] >= pad_lens.to(device)[:, None, None]  # (B, 1, S)
        # a query on a pad slot still sees itself: a fully masked row would give NaN that leaks through V
        allowed = (allowed & not_pad) | (k == q)[None]
    return AttnMask(causal_only=False, mask=allowed[:, None])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttnMask) -> torch.Tensor:
    """Scaled dot-product attention with GQA. q (B, H, T, D), k/v (B, K, S, D) -> (B, H, T, D)."""
    n_rep = q.shape[1] // k.shape[1]
    if attn.cu_seqlens is not None and q.dtype in (torch.float16, torch.bfloat16):
        # flash-attn varlen wants (tokens, heads, D) and handles GQA itself
        out = flash_attn_varlen_func(
            q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), attn.cu_seqlens, attn.cu_seqlens,
            attn.max_seqlen, attn.max_seqlen, causal=True)
        return out.transpose(0, 1)[None]
    if (attn.causal_only and flash_attn_func is not None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[2] == k.shape[2]):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(n_rep, dim=1)
    if attn.causal_only:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask)
