"""The decode step the engine runs: one cached forward of a single new token per row, eager or compiled, and the
rules for how big the KV cache is and how many of its slots a forward reads."""

from __future__ import annotations

import torch

from ..attention import CacheStep

CACHE_ROUND = 256  # reserve() grows the cache by whole multiples of this many slots
KEY_BUCKET = 256  # compiled steps attend over 256, 512, 1024, ... slots: a few static shapes, cost follows the context


def decode_step(model, tokens: torch.Tensor, step: CacheStep) -> torch.Tensor:
    """One cached forward of a single new token per row. tokens (B, 1) -> float32 logits (B, V)."""
    return model(tokens, start_pos=step)[:, -1]


_compiled_decode_step = None


def compiled_decode_step():
    """decode_step under torch.compile(mode="reduce-overhead") (CUDA graphs on GPU), built once per process.

    dynamic=True: batch size and key length are symbolic, so one compile serves every size above one row (a single
    row is specialised by torch: a second compile); CUDA graphs are still recorded per concrete shape, and the key
    length is bucketed (key_slots) so there are few of them.
    """
    global _compiled_decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(decode_step, mode="reduce-overhead", dynamic=True)
    return _compiled_decode_step


def key_slots(n: int, cache_len: int, bucketed: bool) -> int:
    """How many cache slots a forward reading n live ones attends over: n (eager), or the next power-of-two bucket
    from KEY_BUCKET up (compiled), never more than the cache."""
    if not bucketed:
        return n
    b = KEY_BUCKET
    while b < n:
        b *= 2
    return min(b, cache_len)


def ensure_cache(model, batch: int, seq_len: int) -> None:
    """The one cache-sizing rule: reuse the model's KV cache when it holds batch x seq_len (in the model's dtype, on
    its device), else allocate exactly that. Reads follow the live context (key_slots), so a larger cache costs
    memory, not time; reserve() grows it in CACHE_ROUND steps."""
    cache, weight = model.layers[0].attention.cache, model.tok_embeddings.weight
    dtype = weight.dtype if weight.is_floating_point() else torch.bfloat16
    if (cache is None or cache.k.shape[0] < batch or cache.k.shape[2] < seq_len or cache.k.dtype != dtype
            or cache.k.device != weight.device):
        model.setup_cache(batch, seq_len)
