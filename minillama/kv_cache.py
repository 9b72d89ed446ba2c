"""Static (preallocated) KV cache: fixed-shape buffers written in place, friendly to torch.compile and CUDA graphs."""

from __future__ import annotations

import torch

from .attention import CacheStep


class KVCache:
    """One layer's keys and values for up to max_batch_size rows of max_seq_len slots.

    A plain object, not an nn.Module: torch.compile keeps module buffers at static shapes (a new batch size or cache
    length would recompile the whole decode step), while plain tensors marked as static addresses get one graph for
    every size and are still written in place inside the CUDA graph (HF's StaticCache does the same).
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, K, S, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        for t in (self.k, self.v):
            # unguarded: a new cache (another size) re-records the CUDA graph instead of recompiling
            torch._dynamo.mark_static_address(t, guard=False)

    def update(self, step: CacheStep, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, K, T, D) at the step's (row, slot) pairs; return the keys/values to attend over (B, K, S, D).

        One write path for every mode (one indexed assignment per buffer). The read is a view of rows 0..B-1, or a gathered
        copy when step.rows picks other rows; S is step.key_len (the whole cache for fixed-shape steps). A packed step
        (step.spans) returns the whole buffers: each span's attention reads its own row's slots, no copy.
        """
        B, _, T, _ = k.shape
        if step.spans is not None:  # packed rows: every token to its own (row, slot); attention slices the rows
            B_cache = self.k.shape[0]
            if max(s + n for _, s, n in step.spans) > self.k.shape[2] or max(r for r, _, _ in step.spans) >= B_cache:
                raise ValueError(f"packed spans {step.spans} do not fit the KV cache {tuple(self.k.shape)}")
            rows, slots = step.span_rows.to(k.device), step.span_slots.to(k.device)  # (N,), (N,)
            self.k[rows, :, slots] = k[0].transpose(0, 1)  # (N, K, D)
            self.v[rows, :, slots] = v[0].transpose(0, 1)
            return self.k, self.v
        if step.rows is None and B > self.k.shape[0]:
            raise ValueError(f"KV cache holds {self.k.shape[0]} rows; asked for {B}")
        S = step.key_len(T, self.k.shape[2])
        if S > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; asked for position {S}")
        rows = step.rows if step.rows is not None else torch.arange(B, device=k.device)
        slots = step.slots(B, T, k.device)  # (B, T)
        # an index_put_ through two index tensors around a slice: the indexed view is (B, T, K, D)
        self.k[rows[:, None], :, slots] = k.transpose(1, 2)
        self.v[rows[:, None], :, slots] = v.transpose(1, 2)
        if step.rows is None:
            return self.k[:B, :, :S], self.v[:B, :, :S]
        return self.k[step.rows, :, :S], self.v[step.rows, :, :S]

    def resized(self, max_seq_len: int) -> "KVCache":
        """A cache of max_seq_len slots per row holding this one's first slots (a chat that outgrew its cache)."""
        B, K, S, D = self.k.shape
        new = KVCache(B, max_seq_len, K, D, self.k.dtype, self.k.device)
        n = min(S, max_seq_len)
        new.k[:, :, :n], new.v[:, :, :n] = self.k[:, :, :n], self.v[:, :, :n]
        return new
