"""Static (preallocated) KV cache: fixed-shape buffers written in place, friendly to torch.compile and CUDA graphs."""

from __future__ import annotations

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

    def update(self, start_pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, K, T, D) at slots [start_pos, start_pos+T) and return the keys/values to attend over.

        An int start_pos returns the slots up to start_pos+T (shapes grow: eager decoding). A tensor start_pos
        returns the whole cache (fixed shapes: one compiled graph serves every step; the mask hides the rest).
        """
        B, _, T, _ = k.shape
        if B > self.k.shape[0]:
            raise ValueError(f"KV cache holds {self.k.shape[0]} rows; asked for {B}")
        if isinstance(start_pos, torch.Tensor):
            slots = start_pos + torch.arange(T, device=k.device)  # (T,)
            self.k[:B].index_copy_(2, slots, k)
            self.v[:B].index_copy_(2, slots, v)
            return self.k[:B], self.v[:B]
        end = start_pos + T
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; asked for position {end}")
        self.k[:B, :, start_pos:end] = k
        self.v[:B, :, start_pos:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]
