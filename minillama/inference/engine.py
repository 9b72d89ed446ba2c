"""Continuous batching as a small engine: a fixed set of KV-cache rows, each answering one request at a time, that
new requests join between decode steps.

    engine = Engine(model, batch_size=8, cache_len=2048)
    engine.submit(Request(prompt_ids, max_new_tokens=64, sampling=SamplingParams(0.7), stop_ids={2}, key="a"))
    while engine.busy:
        for ev in engine.step():      # Event(request, token | None, finish | None)
            ...

One step: free rows take waiting requests in order (each prefilled alone into its own cache row), every busy row
picks its next token with its own sampling settings and generator, rows that end (a stop token, max_new_tokens, or
cancel()) are freed, and one decode step feeds the rest together. The engine syncs with the host once per step:
which rows finish is a host decision. generate_continuous (generation.py), generate/batch.py, the chat REPL and
the HTTP server all run on it.

Prefix reuse (reuse_prefix=True): a free row keeps the tokens its cache holds, so a request whose prompt starts with
them (the next turn of a chat) is prefilled only after that prefix. Per-row adapters: row_adapters(model, names) is
called before every forward with one adapter name (or None, the base model) per row of that forward.
Tensor parallel: every rank runs the same engine on the same requests; rank 0's sampled tokens are broadcast, so all
ranks make the same finish / refill decisions.
Shape letters: B cache rows, P prompt tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..attention import CacheStep
from .constraints import advance, mask_logits
from .sampling import SamplingParams, next_token, seen_mask


@dataclass(eq=False)
class Request:
    """One prompt to answer. output, finish and prompt_tokens are filled in by the engine."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset = frozenset()
    generator: Optional[torch.Generator] = None  # None: the engine's shared generator
    adapter: Optional[str] = None  # which adapter this row runs (None: the base model)
    key: object = None  # the caller's handle (a prompt index, a request id)
    output: list[int] = field(default_factory=list)  # the answer so far, stop token excluded
    finish: Optional[str] = None  # "stop" | "length" | "cancelled" once it ended
    cached_tokens: int = 0  # prompt tokens whose keys/values were reused from the row's previous request
    constraint: Optional[object] = None  # constraints.RowState: the grammar this row's answer must match (None: free)


@dataclass
class Event:
    """What a step did for one request: a new answer token, and/or its end ("stop", "length", "cancelled")."""

    request: Request
    token: Optional[int] = None
    finish: Optional[str] = None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Engine:
    """The continuous-batching scheduler over the model's KV cache (batch_size rows x cache_len slots)."""

    def __init__(self, model, batch_size: int, cache_len: int, *, seed: Optional[int] = None, step_fn=None,
                 compile: bool = False, process_group=None, pad_id: int = 0, fixed_batch: bool = True,
                 reuse_prefix: bool = False, row_adapters: Optional[Callable] = None, mix_adapters: bool = True):
        """fixed_batch: decode every cache row each step (one shape, as compiled decoding needs); False decodes only
        the rows up to the last busy one. mix_adapters False: a request waits until the busy rows use its adapter."""
        from .generate import _compiled_step, _ensure_cache, decode_step
        self.model, self.B = model, batch_size
        self.device = model.tok_embeddings.weight.device
        _ensure_cache(model, batch_size, cache_len)
        self.cache_len = model.cache_len
        self.generator = torch.Generator(device=self.device)
        self.generator.seed() if seed is None else self.generator.manual_seed(seed)
        self.compile = compile
        self.step_fn = step_fn or (_compiled_step() if compile else decode_step)
        self.group = process_group
        self.src = None if process_group is None else dist.get_global_rank(process_group, 0)
        self.pad_id, self.fixed_batch, self.reuse_prefix = pad_id, fixed_batch, reuse_prefix
        self.row_adapters, self.mix_adapters = row_adapters, mix_adapters
        self.vocab = model.args.vocab_size
        self.waiting: deque[Request] = deque()
        self.rows: list[Optional[Request]] = [None] * batch_size  # the request each cache row answers
        self.pos = [0] * batch_size  # each row's next cache slot
        self.held: list[list[int]] = [[] for _ in range(batch_size)]  # tokens whose K/V fill slots [0, pos)
        self.held_adapter: list[Optional[str]] = [None] * batch_size
        self.logits = torch.zeros(batch_size, self.vocab, device=self.device)  # (B, V): what each row samples next
        self.seen: Optional[torch.Tensor] = None  # (B, V) bool, made when a request needs a repetition penalty

    # ---- the caller's side ----
    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    @property
    def n_running(self) -> int:
        return sum(r is not None for r in self.rows)

    def submit(self, req: Request) -> Request:
        """Queue a request; it joins the batch at the next step with a free row. Its prompt must fit the cache."""
        if not req.prompt or len(req.prompt) + req.max_new_tokens > self.cache_len:
            raise ValueError(f"prompt of {len(req.prompt)} tokens + max_new_tokens {req.max_new_tokens} does not fit "
                             f"the cache of {self.cache_len} slots")
        self.waiting.append(req)
        return req

    def reserve(self, n_slots: int, round_to: int = 512) -> None:
        """Grow every row's cache to at least n_slots (rounded up), keeping what it holds: a chat whose history
        outgrows the cache keeps its prefix instead of starting again."""
        if n_slots <= self.cache_len:
            return
        n = -(-n_slots // round_to) * round_to
        for layer in self.model.layers:
            layer.attention.cache = layer.attention.cache.resized(n)
        self.cache_len = n

    def cancel(self, key) -> Optional[Request]:
        """Stop the request with this key (waiting or running) and free its row; returns it, or None if not found."""
        for req in list(self.waiting):
            if req.key == key:
                self.waiting.remove(req)
                req.finish = "cancelled"
                return req
        for b, req in enumerate(self.rows):
            if req is not None and req.key == key:
                self._free(b, "cancelled")
                return req
        return None

    def cancel_all(self) -> None:
        for req in list(self.waiting) + [r for r in self.rows if r is not None]:
            self.cancel(req.key)

    # ---- one step ----
    @torch.no_grad()
    def step(self) -> list[Event]:
        """Admit waiting requests, pick one token for every busy row, free finished rows, decode the rest."""
        self._admit()
        busy = [b for b, r in enumerate(self.rows) if r is not None]
        if not busy:
            return []
        nxt = self._pick(busy).tolist()  # the one host sync per step: finishing is a host decision
        events, feed = [], []
        for b in busy:
            req, t = self.rows[b], nxt[b]
            stopped = t in req.stop_ids
            if req.constraint is not None and not stopped:
                advance(req.constraint, t)
            if not stopped:
                req.output.append(t)
            if stopped or len(req.output) >= req.max_new_tokens:
                events.append(Event(req, None if stopped else t, "stop" if stopped else "length"))
                self._free(b, events[-1].finish)
            else:
                events.append(Event(req, t))
                feed.append(b)
        if feed:
            self._decode(feed, nxt)
        return events

    def _admit(self) -> None:
        """Each free row takes the next waiting request (the one whose prompt it already holds, with reuse)."""
        while self.waiting:
            free = [b for b, r in enumerate(self.rows) if r is None]
            if not free:
                return
            req = self.waiting[0]
            running = {r.adapter for r in self.rows if r is not None}
            if not self.mix_adapters and running and running != {req.adapter}:
                return  # the batch drains first; the head of the queue keeps its place
            self.waiting.popleft()
            self._prefill(self._row_for(req, free), req)

    def _row_for(self, req: Request, free: list[int]) -> int:
        if not self.reuse_prefix:
            return free[0]
        return max(free, key=lambda b: (self._reusable(b, req), -b))

    def _reusable(self, b: int, req: Request) -> int:
        """How many prompt tokens row b's cache already holds (at least one token is always prefilled)."""
        if not self.reuse_prefix or self.held_adapter[b] != req.adapter:
            return 0
        return min(_common_prefix(self.held[b], req.prompt), len(req.prompt) - 1)

    def _prefill(self, b: int, req: Request) -> None:
        """Run the prompt (after any reused prefix) into cache row b; its last position's logits go to row b."""
        k = self._reusable(b, req)
        tokens = torch.tensor([req.prompt[k:]], device=self.device)  # (1, P - k)
        self._set_adapters([req.adapter])
        self.held[b] = self.held[b][:k]  # a forward cut short (Ctrl-C) leaves slots [0, k) intact
        hidden = self.model(tokens, start_pos=CacheStep(k, rows=torch.tensor([b], device=self.device)),
                            return_hidden=True)
        self.logits[b] = self.model.output(hidden[0, -1]).float()  # only the last position's logits are needed
        self.rows[b], self.pos[b] = req, len(req.prompt)
        self.held[b], self.held_adapter[b] = list(req.prompt), req.adapter
        req.cached_tokens = k
        if req.sampling.repetition_penalty != 1.0 and self.seen is None:
            self.seen = torch.zeros(self.B, self.vocab, dtype=torch.bool, device=self.device)
        if self.seen is not None:
            self.seen[b] = seen_mask(torch.tensor([req.prompt], device=self.device), self.vocab)[0]

    def _pick(self, busy: list[int]) -> torch.Tensor:
        """Each row's next token (B,), rows grouped by sampling settings and generator; rank 0's choice wins.
        A constrained row first has the tokens its grammar does not allow masked out."""
        states = [self.rows[b].constraint if b in busy else None for b in range(self.B)]
        if any(s is not None for s in states):
            self.logits = mask_logits(self.logits, states)  # (B, V); free rows untouched
        groups: dict[tuple, list[int]] = {}
        for b in busy:
            req = self.rows[b]
            gen = None if req.sampling.greedy else (req.generator or self.generator)
            groups.setdefault((dataclasses.astuple(req.sampling), id(gen)), []).append(b)
        nxt = torch.zeros(self.B, dtype=torch.long, device=self.device)
        for rows in groups.values():
            req = self.rows[rows[0]]
            gen = req.generator or self.generator
            if len(rows) == self.B:  # the whole batch: no gather
                nxt = next_token(self.logits, req.sampling, self.seen, gen)
                break
            idx = torch.tensor(rows, device=self.device)
            seen = self.seen[idx] if self.seen is not None else None
            nxt[idx] = next_token(self.logits[idx], req.sampling, seen, gen)
        if self.src is not None:
            dist.broadcast(nxt, src=self.src, group=self.group)
        if self.seen is not None:
            self.seen.scatter_(1, nxt[:, None], True)
        return nxt

    def _decode(self, feed: list[int], nxt: list[int]) -> None:
        """One token for every row in feed; other rows decode a pad at their current slot, which a later prefill
        overwrites or their causal mask hides, and their logits are ignored."""
        n = self.B if self.fixed_batch else max(feed) + 1
        tokens = [self.pad_id] * n
        for b in feed:
            tokens[b] = nxt[b]
        tokens = torch.tensor(tokens, device=self.device)[:, None]  # (n, 1)
        step = CacheStep(torch.tensor(self.pos[:n], device=self.device))  # (n,): each row at its own slot
        self._set_adapters([self.rows[b].adapter if self.rows[b] is not None else None for b in range(n)])
        if self.compile:
            torch.compiler.cudagraph_mark_step_begin()
            self.logits[:n] = self.step_fn(self.model, tokens, step)  # copied out: the graph reuses its buffer
        else:
            self.logits[:n] = self.step_fn(self.model, tokens, step)  # (n, V)
        for b in feed:
            self.held[b].append(nxt[b])
            self.pos[b] += 1

    def _free(self, b: int, finish: str) -> None:
        self.rows[b].finish = finish
        self.rows[b] = None

    def _set_adapters(self, names: list) -> None:
        if self.row_adapters is not None:
            self.row_adapters(self.model, names)
