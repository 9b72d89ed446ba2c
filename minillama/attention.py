"""Attention kernels and masks: SDPA by default, flash-attn's varlen kernel for packed rows when installed on a GPU.

A packed row never gets a (T, T) mask: on a GPU in half precision the varlen kernel skips what crosses documents;
elsewhere (CPU, float32) each document is its own causal SDPA call, and a sliding window over long documents goes
through blocked_attention. Either way the memory beyond q/k/v is O(T), however long the row.
Shape letters: B batch, T query length, S key length, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from .blocked_attention import KeyPlan, blocked_attention, plan_keys

try:  # optional: pip install minillama[flash]
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # type: ignore
except Exception:  # ImportError, or a broken CUDA build on a CPU machine
    flash_attn_func = flash_attn_varlen_func = None

_NOT_IMPORTED = object()
# torch >= 2.10: flash-attention's varlen kernel shipped with torch (CUDA only). Imported on first use on a GPU:
# importing it loads torch._dynamo, 1.6 s at every process start (each CLI run, each torchrun rank) on a CPU
torch_varlen_attn = _NOT_IMPORTED


def _torch_varlen():
    """torch's varlen_attn, or None where this torch has none."""
    global torch_varlen_attn
    if torch_varlen_attn is _NOT_IMPORTED:
        try:
            from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
        except Exception:
            torch_varlen_attn = None
    return torch_varlen_attn


@functools.lru_cache(maxsize=None)
def _params(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def varlen_kwargs(fn, n_heads: int, n_kv_heads: int) -> tuple[dict, bool]:
    """(causal keyword arguments, whether k/v must be repeated to n_heads) for torch's varlen_attn as `fn` spells it.

    torch 2.10: is_causal=True, no GQA. torch 2.11: window_size=(-1, 0) means causal, still no GQA. torch 2.13:
    window_size plus enable_gqa (k/v keep their n_kv_heads).
    """
    params = _params(fn)
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    repeat = n_kv_heads != n_heads
    if repeat and "enable_gqa" in params:
        kwargs["enable_gqa"], repeat = True, False
    return kwargs, repeat


def varlen_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int) -> torch.Tensor:
    """Causal attention over concatenated documents. q (N, H, D), k/v (N, K, D) -> (N, H, D)."""
    if flash_attn_varlen_func is not None:
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
    fn = _torch_varlen()
    kwargs, repeat = varlen_kwargs(fn, q.shape[1], k.shape[1])
    if repeat:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (N, H, D)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def has_varlen_kernel(device: torch.device) -> bool:
    return device.type == "cuda" and (flash_attn_varlen_func is not None or _torch_varlen() is not None)


@dataclass
class AttnMask:
    """What a forward's attention may see; built once per forward and shared by all layers."""

    causal_only: bool = True  # plain causal over the row: use the kernels' is_causal fast path
    mask: Optional[torch.Tensor] = None  # (B, 1, T, S) bool, True = may attend: cached forwards (T new of S slots)
    cu_seqlens: Optional[torch.Tensor] = None  # packed rows as varlen: (n_docs + 1,) int32 offsets into B*T
    max_seqlen: int = 0
    docs: Optional[list] = None  # packed rows elsewhere: (row, start, end) of every document, host ints
    plan: Optional[KeyPlan] = None  # a sliding window over documents longer than it: blocked attention
    spans: Optional[list] = None  # a packed cached forward: (cache row, first query, queries, keys, mask) per span,
    # host ints and a (queries, keys) bool mask (None: plain causal, the span starts at slot 0); see CacheStep.spans
    kernel: Optional[Callable] = None  # the caller's own attention (q, k, v) -> out, e.g. context parallelism's


def doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document, restarting at 0 where doc_ids changes. (B, T) -> (B, T)"""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def doc_cu_seqlens(doc_ids: torch.Tensor) -> torch.Tensor:
    """Start offsets of every document in the flattened (B*T) token stream, plus the end. -> (n_docs + 1,) int32"""
    B, T = doc_ids.shape
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)  # every row starts a document
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.nonzero(is_start.flatten()).flatten()
    return torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)


def doc_spans(doc_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document: contiguous runs of equal doc_ids. (B, T) -> host list (one sync)."""
    B, T = doc_ids.shape
    cu = doc_cu_seqlens(doc_ids).tolist()
    return [(s // T, s % T, s % T + (e - s)) for s, e in zip(cu[:-1], cu[1:])]


def window_plan(doc_ids: torch.Tensor, docs: list, window: int) -> KeyPlan:
    """Blocked attention's plan for causal attention inside documents, seeing at most `window` positions back."""
    T = doc_ids.shape[1]
    first = list(range(T))  # the earliest key any row's query i may see: min over rows of its document's start
    for _, s, e in docs:
        for i in range(s, e):
            first[i] = min(first[i], s)
    first = [max(f, i - window + 1) for i, f in enumerate(first)]  # non-decreasing, as plan_keys needs
    return plan_keys(list(range(T)), list(range(T)), first, doc_ids.device, doc_ids, doc_ids, window)


def packed_mask(doc_ids: torch.Tensor, sliding_window: Optional[int] = None, half_precision: bool = False) -> AttnMask:
    """Causal attention within each document of a packed row. doc_ids (B, T)."""
    if half_precision and sliding_window is None and has_varlen_kernel(doc_ids.device):
        # documents are contiguous runs: a varlen kernel skips the masked blocks instead of building a T x T mask
        cu_seqlens = doc_cu_seqlens(doc_ids)
        return AttnMask(causal_only=False, cu_seqlens=cu_seqlens, max_seqlen=int(torch.diff(cu_seqlens).max()))
    docs = doc_spans(doc_ids)
    if sliding_window is not None and max(e - s for _, s, e in docs) > sliding_window:
        return AttnMask(causal_only=False, plan=window_plan(doc_ids, docs, sliding_window))
    return AttnMask(causal_only=False, docs=docs)


def doc_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: list) -> torch.Tensor:
    """Causal SDPA inside each document, one call per document. q/k/v (B, H, T, D) -> (B, H, T, D)."""
    rows: list[list[torch.Tensor]] = [[] for _ in range(q.shape[0])]
    for b, s, e in docs:
        rows[b].append(F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                                      is_causal=e - s > 1))
    return torch.cat([torch.cat(parts, dim=2) for parts in rows])


@dataclass
class CacheStep:
    """Where one cached forward writes and reads the KV cache; built by the caller, shared by all layers.

    start: the first cache slot this forward writes. An int: eager decoding, attention over slots [0, start + T)
    (shapes grow step by step). A 0-d tensor (one slot for every row) or a (B,) tensor (each row its own slot):
    attention over the whole fixed-size cache, a mask hides the rest, so one torch.compile graph (one CUDA graph)
    serves every step. pad_lens (B,): each row's left padding. rows (B,): the cache rows this forward's rows use
    (default 0..B-1), e.g. prefill a new prompt into one row while the other rows keep theirs. keys: attend over
    only the first `keys` slots (they must cover every query's slot): a decode step then reads what the rows hold,
    not the whole cache, and a compiled step keeps one shape per bucket of lengths. spans (CacheStep.packed):
    several rows' tokens packed into one row without padding (prompts prefilled together).
    """

    start: Union[int, torch.Tensor]
    pad_lens: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None
    keys: Optional[int] = None
    spans: Optional[tuple[tuple[int, int, int], ...]] = None
    span_rows: Optional[torch.Tensor] = None  # a packed step's cache row and slot of every token (N,), built once
    span_slots: Optional[torch.Tensor] = None

    @staticmethod
    def packed(spans: list[tuple[int, int, int]], device=None) -> "CacheStep":
        """Several cache rows' next tokens back to back in one row, without padding: tokens (1, N), N the sum of
        the counts; spans[i] = (cache row, first slot, count), host ints. Each span's tokens go to slots
        [first, first + count) of its row and attend causally over that row's slots [0, first + count)."""
        if not spans or any(n < 1 or s < 0 for _, s, n in spans) or len({r for r, _, _ in spans}) != len(spans):
            raise ValueError(f"packed cache spans must be distinct rows with counts >= 1, got {spans!r}")
        spans = tuple((int(r), int(s), int(n)) for r, s, n in spans)
        rows = torch.tensor([r for r, _, n in spans for _ in range(n)], device=device)  # (N,)
        slots = torch.tensor([s + i for _, s, n in spans for i in range(n)], device=device)  # (N,)
        return CacheStep(0, spans=spans, span_rows=rows, span_slots=slots)

    @property
    def fixed_shape(self) -> bool:
        return isinstance(self.start, torch.Tensor)

    def slots(self, B: int, T: int, device) -> torch.Tensor:
        """The cache slot of every token of this forward. -> (B, T)"""
        if self.spans is not None:  # (1, N)
            return self.span_slots.to(device)[None]
        start = self.start.to(device).reshape(-1, 1) if self.fixed_shape else self.start
        return (start + torch.arange(T, device=device)[None]).expand(B, T)

    def key_len(self, T: int, cache_len: int) -> int:
        """How many cache slots the queries attend over: keys if given, else the whole cache for fixed shapes, else
        up to start + T."""
        if self.keys is not None:
            return self.keys
        return cache_len if self.fixed_shape else self.start + T


def cache_mask(step: CacheStep, T: int, S: int, device, sliding_window: Optional[int] = None) -> AttnMask:
    """Queries at cache slots [start, start+T) over keys [0, S): causal, minus each row's left padding.

    Key j is visible to row b's query at slot q iff pad_lens[b] <= j <= q (and q - j < sliding_window), or j == q.
    """
    pad_lens = step.pad_lens
    if not step.fixed_shape and pad_lens is None and sliding_window is None and step.start + T == S \
            and (T == S or T == 1):
        return AttnMask(causal_only=True)  # a full prefill, or one new token that sees every cached key
    start = step.start.to(device).reshape(-1, 1, 1) if step.fixed_shape else step.start
    q = start + torch.arange(T, device=device)[None, :, None]  # (B|1, T, 1)
    k = torch.arange(S, device=device)[None, None, :]  # (1, 1, S)
    allowed = k <= q  # (B|1, T, S)
    if sliding_window is not None:
        allowed = allowed & (q - k < sliding_window)
    if pad_lens is not None:
        not_pad = k >= pad_lens.to(device)[:, None, None]  # (B, 1, S)
        # a query on a pad slot still sees itself: a fully masked row would give NaN that leaks through V
        allowed = (allowed & not_pad) | (k == q)
    return AttnMask(causal_only=False, mask=allowed[:, None])


def span_mask(spans: tuple, device, sliding_window: Optional[int] = None) -> AttnMask:
    """A packed cached forward's attention (CacheStep.packed): each span's queries at slots [first, first + count)
    of its row over that row's keys [0, first + count), causal; one small (count, first + count) mask per span,
    shared by every layer (none for a span from slot 0 without a window: the kernels' causal path)."""
    out, offset = [], 0
    for row, first, n in spans:
        S, mask = first + n, None
        if first > 0 or (sliding_window is not None and n > sliding_window):
            q = first + torch.arange(n, device=device)[:, None]  # (n, 1)
            k = torch.arange(S, device=device)[None]  # (1, S)
            mask = k <= q
            if sliding_window is not None:
                mask = mask & (q - k < sliding_window)
        out.append((row, offset, n, S, mask))
        offset += n
    return AttnMask(causal_only=False, spans=out)


def span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: list,
                   repeat_kv: Optional[bool] = None) -> torch.Tensor:
    """Each span's queries over its own cache row, one SDPA call per span. q (1, H, N, D), k/v the cache
    (B_cache, K, S_cache, D) -> (1, H, N, D). k/v keep their kv heads (enable_gqa), except a masked span with
    repeat_kv (default: on a GPU), whose row's k/v are repeated to H heads: CUDA's kernels that take a mask do not
    take grouped heads, and the math fallback would hold (H, n, S) attention weights."""
    n_rep = q.shape[1] // k.shape[1]
    repeat_kv = q.is_cuda if repeat_kv is None else repeat_kv
    parts = []
    for r, o, n, S, m in spans:
        ks, vs = k[r:r + 1, :, :S], v[r:r + 1, :, :S]  # (1, K, S, D)
        if n_rep > 1 and m is not None and repeat_kv:
            ks, vs = ks.repeat_interleave(n_rep, dim=1), vs.repeat_interleave(n_rep, dim=1)  # (1, H, S, D)
        parts.append(F.scaled_dot_product_attention(q[:, :, o:o + n], ks, vs, attn_mask=m,
                                                    is_causal=m is None and n > 1, enable_gqa=ks.shape[1] != q.shape[1]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttnMask) -> torch.Tensor:
    """Scaled dot-product attention with GQA. q (B, H, T, D), k/v (B, K, S, D) -> (B, H, T, D)."""
    if attn.mask is None and not attn.causal_only and torch.compiler.is_compiling():
        # packed rows under torch.compile (the trainer's --compile): their documents' spans are host ints that
        # differ from batch to batch, so their attention runs between graphs instead of recompiling one per batch
        return torch.compiler.disable(_attend)(q, k, v, attn)
    return _attend(q, k, v, attn)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttnMask) -> torch.Tensor:
    B, H, T, D = q.shape
    K = k.shape[1]
    n_rep = H // K
    if attn.kernel is not None:
        return attn.kernel(q, k, v)
    if attn.spans is not None:
        return span_attention(q, k, v, attn.spans)
    if attn.plan is not None:
        return blocked_attention(q, k, v, attn.plan)
    if attn.cu_seqlens is not None:
        flat = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], D)  # (B*T, heads, D)
        out = varlen_causal(flat(q), flat(k), flat(v), attn.cu_seqlens, attn.max_seqlen)
        return out.view(B, T, H, D).transpose(1, 2)
    if (attn.causal_only and flash_attn_func is not None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16) and T == k.shape[2]):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    if n_rep > 1 and T == 1:
        # one query per row (decoding): the n_rep query heads sharing a kv head become n_rep queries of that head,
        # so the cache is read once instead of being copied n_rep times; the (B, 1, 1, S) mask broadcasts over them
        out = F.scaled_dot_product_attention(q.reshape(B, K, n_rep, D), k, v, attn_mask=attn.mask)
        return out.view(B, H, 1, D)
    if attn.causal_only:
        # flash (CUDA) reads grouped k/v directly; the math kernel repeats them itself
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=n_rep > 1)
    if n_rep > 1:  # a mask with many queries (padded prefill): the kernels that take masks need equal head counts
        k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(n_rep, dim=1)
    if attn.docs is not None:
        return doc_attention(q, k, v, attn.docs)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask)
