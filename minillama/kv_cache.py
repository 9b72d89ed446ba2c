"""Static (preallocated) KV cache: fixed-shape buffers written in place, friendly to torch.compile and CUDA graphs."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class KVCache(nn.Module):
    """One layer's keys and values for up to max_batch_size rows of max_seq_len slots."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, K, S, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos, k: torch.Tensor, v: torch.Tensor,
               cache_rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, K, T, D) at slots [start_pos, start_pos+T) and return the keys/values to attend over.

        An int start_pos returns the slots up to start_pos+T (shapes grow: eager decoding). A tensor start_pos,
        0-d (one slot for all rows) or (B,) (each row its own slot), returns the whole cache (fixed shapes: one
        compiled graph serves every step; the mask hides the rest). cache_rows (B,): the cache rows this forward's
        rows read and write (default 0..B-1), so one row can be refilled while the others stay untouched.
        """
        B, _, T, _ = k.shape
        if cache_rows is None and B > self.k.shape[0]:
            raise ValueError(f"KV cache holds {self.k.shape[0]} rows; asked for {B}")
        if isinstance(start_pos, torch.Tensor):
            if start_pos.dim() == 0 and cache_rows is None:
                slots = start_pos + torch.arange(T, device=k.device)  # (T,)
                self.k[:B].index_copy_(2, slots, k)
                self.v[:B].index_copy_(2, slots, v)
                return self.k[:B], self.v[:B]
            rows = torch.arange(B, device=k.device) if cache_rows is None else cache_rows
            slots = start_pos.expand(B)[:, None] + torch.arange(T, device=k.device)  # (B, T)
            # two index tensors around a slice: the indexed view is (B, T, K, D)
            self.k[rows[:, None], :, slots] = k.transpose(1, 2)
            self.v[rows[:, None], :, slots] = v.transpose(1, 2)
            if cache_rows is None:
                return self.k[:B], self.v[:B]
            return self.k[cache_rows], self.v[cache_rows]  # (B, K, S, D): a gathered copy
        end = start_pos + T
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; asked for position {end}")
        if cache_rows is not None:
            self.k[cache_rows, :, start_pos:end] = k
            self.v[cache_rows, :, start_pos:end] = v
            return self.k[cache_rows, :, :end], self.v[cache_rows, :, :end]
        self.k[:B, :, start_pos:end] = k
        self.v[:B, :, start_pos:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]
