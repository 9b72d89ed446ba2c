"""The one decode loop: a fixed set of KV-cache rows, each answering one request at a time, that new requests join
between decode steps. generate() (every row admitted at once), generate_continuous, the chat REPL, generate/batch.py
and the HTTP server are thin users of it.

    engine = Engine(model, EngineConfig(batch_size=8, cache_len=2048))
    engine.submit(Request(prompt_ids, max_new_tokens=64, sampling=SamplingParams(0.7), stop_ids={2}, key="a"))
    while engine.busy:
        for ev in engine.step():      # Event(request, token | None, finish | None)
            ...

One step: free rows take waiting requests in order, the lowest free row first so a decode forward runs only rows
0..last busy; the decode forward of the tokens earlier steps returned (each row's new token fed back, together,
attending over only the slots the rows hold); prompts are prefilled together in one forward (packed back to back
without padding, up to prefill_rows at once, one adapter per forward), a long one in chunks between decode steps so
running rows keep their pace; every decoding row picks its next token (_pick: the one place tokens are chosen) and
the step returns them;
rows that end (a stop token, max_new_tokens, or cancel()) are freed. Returning a token before its decode forward
takes one forward off every token's latency, the first included. Which rows finish is a host decision, so a step
syncs once; step(max_steps) may run several decode steps on the device alone while nothing waits (generate() does:
one sync per 16 tokens). While prompts wait, a step may prefill before feeding the due tokens back, and returns
the first tokens of the prompts it completed; a running row waits for at most prefill_chunk prompt tokens between
two of its tokens. With prefill_step < prefill_chunk a burst of prompts is prefilled over several steps, and the
first ones answer before the last ones are in.

Prefix reuse (reuse_prefix): a request whose prompt starts with tokens some row's cache holds (its own row's earlier
turn, or a shared system prompt in another row) copies those keys/values instead of recomputing them.
Speculative decoding (speculate="ngram": prompt lookup; "draft": config.draft_model drafts greedily): see
speculate.py; one verification path for both. Seeds: a request with a seed draws from its own generator
(its answer does not depend on the batch); the others share the engine's, which draws for every cache row at each
step, so a row's draws depend on its row and step only. Per-row adapters: row_adapters(model, names) is called
before every forward with one adapter name (or None, the base model) per row of that forward.
Logprobs (Request.logprobs, .prompt_logprobs): log_softmax of the float32 logits of the same forward the token was
picked from, before any processor (the model's own distribution: what evaluation scores); a row that asks for them
is not run ahead or drafted for. n samples of one prompt: Requests with fork_of set to the first one's key; they wait
while it prefills and then copy its keys/values and logits (the prompt is prefilled once).
Tensor parallel: every rank runs the same engine on the same requests; rank 0's choices are broadcast (_agree), so
all ranks make the same finish / refill decisions.
Shape letters: B cache rows, T tokens per row in a forward, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..attention import CacheStep
from .constraints import GrammarVocab, RowState, advance, mask_logits, new_row_state
from .decode_step import CACHE_ROUND, compiled_decode_step, decode_step, ensure_cache, key_slots
from .request import Event, Request, TokenLogprob
from .sampling import process_logits, race_noise, sample_from_logits, seen_mask, token_logprobs
from .speculate import DraftModel, NgramDrafter, accepted_drafts, common_prefix

SPECULATE = ("ngram", "draft")


@dataclass
class EngineConfig:
    """How the engine runs (what it answers is in each Request)."""

    batch_size: Optional[int] = None  # cache rows (generate(): one per prompt when None)
    cache_len: Optional[int] = None  # slots per row (generate(): sized for its prompts when None)
    seed: Optional[int] = None  # the shared generator's seed (None: random)
    compile: bool = False  # torch.compile the one-token decode step (CUDA graphs on GPU)
    process_group: object = None  # tensor parallel: rank 0 of this group decides every token
    pad_id: int = 0
    fixed_batch: bool = True  # decode every cache row each step (one shape); False: rows up to the last busy one
    reuse_prefix: bool = False  # copy cached keys/values of a prompt's prefix held by any row
    mix_adapters: bool = True  # False: a request waits until the busy rows use its adapter
    prefill_chunk: int = 512  # prompt tokens a running row waits for at most between two of its tokens
    prefill_step: Optional[int] = None  # prompt tokens per step (None: prefill_chunk): a step returns the first tokens
    # of the prompts it completed, so under a burst of prompts the first ones answer before the last are prefilled
    prefill_rows: int = 16  # prompts prefilled together in one forward
    sync_every: int = 16  # generate(): decode steps between host syncs
    speculate: Optional[str] = None  # "ngram": prompt-lookup drafts; "draft": draft_model's; verified in one forward
    draft_tokens: int = 4  # drafts per row and step
    draft_model: object = None  # speculate="draft": a small Transformer of the target's vocabulary (own KV cache)

    def __post_init__(self):
        for name in ("batch_size", "cache_len", "prefill_step"):  # None: chosen elsewhere
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("prefill_chunk", "prefill_rows", "sync_every", "draft_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.speculate not in (None, *SPECULATE):
            raise ValueError(f"speculate must be one of {', '.join(SPECULATE)} (or None), got {self.speculate!r}")
        if (self.speculate == "draft") != (self.draft_model is not None):
            raise ValueError(f"speculate='draft' needs a draft_model, and a draft_model needs speculate='draft' "
                             f"(got speculate={self.speculate!r})")


@dataclass
class Row:
    """One cache row: the request it answers, what its cache holds, and that request's decoding state."""

    request: Optional[Request] = None
    held: list[int] = field(default_factory=list)  # tokens whose keys/values fill slots [0, len(held))
    adapter: Optional[str] = None  # the adapter those keys/values were computed with
    todo: list[int] = field(default_factory=list)  # prompt tokens not prefilled yet
    generator: Optional[torch.Generator] = None  # the request's own, when it has a seed
    banned: int = -1  # a rejected draft, left out of the next draw (speculative sampling's residual)
    grammar: Optional[RowState] = None  # the request's constraint matcher: where its answer is in the grammar
    order: int = 0  # admission order: prompts are prefilled first come, first served
    picked_logprob: Optional[TokenLogprob] = None  # the last pick's, when the request asked for logprobs

    @property
    def pos(self) -> int:
        return len(self.held)

    @property
    def decoding(self) -> bool:
        return self.request is not None and not self.todo


class Engine:
    """The continuous-batching scheduler over the model's KV cache (batch_size rows x cache_len slots)."""

    def __init__(self, model, config: EngineConfig, row_adapters: Optional[Callable] = None,
                 grammar: Optional[Callable[[], GrammarVocab]] = None):
        """grammar: returns the tokenizer's constraints.GrammarVocab (built on first use), for constrained requests."""
        if config.batch_size is None or config.cache_len is None:
            raise ValueError("EngineConfig needs batch_size and cache_len for an Engine")
        self.model, self.config, self.B = model, config, config.batch_size
        self.device = model.tok_embeddings.weight.device
        ensure_cache(model, self.B, config.cache_len)
        self.cache_len = model.cache_len
        self.generator = torch.Generator(device=self.device)
        self.generator.seed() if config.seed is None else self.generator.manual_seed(config.seed)
        self.step_fn = compiled_decode_step() if config.compile else decode_step
        self.group = config.process_group
        self.src = None if self.group is None else dist.get_global_rank(self.group, 0)
        self.row_adapters, self.grammar = row_adapters, grammar
        self.vocab = model.args.vocab_size
        self.waiting: deque[Request] = deque()
        self.slots = [Row() for _ in range(self.B)]
        self.admitted = 0
        self.logits = torch.zeros(self.B, self.vocab, device=self.device)  # (B, V): what each row samples next
        self.seen: Optional[torch.Tensor] = None  # (B, V) bool, made when a request needs a repetition penalty
        self.counts: Optional[torch.Tensor] = None  # (B, V) answer token counts, made for frequency/presence penalties
        self.stats = {"prefilled": 0, "copied": 0, "drafted": 0, "accepted": 0, "decode_steps": 0}
        self.failed: list[Event] = []  # requests whose own prefill raised: reported by the next step()
        self.due: list[tuple[int, Request, int]] = []  # (row, request, token) picked and returned, not fed yet
        self.waited = 0  # prompt tokens prefilled since the oldest due token was picked: what its row waited
        self.drafter = self._drafter()

    def _drafter(self):
        """The config's speculative drafter (None: no speculation)."""
        c = self.config
        if c.speculate == "ngram":
            return NgramDrafter()
        if c.speculate == "draft":
            if c.process_group is not None:
                raise ValueError("a draft model cannot be combined with tensor parallelism (run a single process)")
            return DraftModel(c.draft_model, self.model, self.B, self.cache_len, c.prefill_chunk)
        return None

    # ---- the caller's side ----
    @property
    def rows(self) -> list[Optional[Request]]:
        """The request each cache row answers (None: free)."""
        return [r.request for r in self.slots]

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r.request is not None for r in self.slots)

    @property
    def n_running(self) -> int:
        return sum(r.request is not None for r in self.slots)

    def submit(self, req: Request) -> Request:
        """Queue a request; it joins the batch at the next step with a free row. Its prompt must fit the cache."""
        if not req.prompt or len(req.prompt) + req.max_new_tokens > self.cache_len:
            raise ValueError(f"prompt of {len(req.prompt)} tokens + max_new_tokens {req.max_new_tokens} does not fit "
                             f"the cache of {self.cache_len} slots")
        if min(req.prompt) < 0 or max(req.prompt) >= self.vocab:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab})")
        if req.seed is not None and not -2**63 <= req.seed < 2**64:
            raise ValueError(f"seed {req.seed} is outside [-2**63, 2**64)")
        if req.constraint is not None and (self.grammar is None or self.config.speculate):
            raise ValueError("a constrained request needs an Engine built with grammar= and without speculation")
        bad = [t for t, _ in req.sampling.logit_bias if t >= self.vocab]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is not in the vocabulary (ids 0..{self.vocab - 1})")
        self.waiting.append(req)
        return req

    def reserve(self, n_slots: int) -> None:
        """Grow every row's cache to at least n_slots (in CACHE_ROUND steps), keeping what it holds: a chat whose
        history outgrows the cache keeps its prefix instead of starting again."""
        if n_slots <= self.cache_len:
            return
        n = -(-n_slots // CACHE_ROUND) * CACHE_ROUND
        for layer in self.model.layers:
            layer.attention.cache = layer.attention.cache.resized(n)
        self.cache_len = n
        if self.drafter is not None:
            self.drafter.reserve(n)

    def cancel(self, key) -> Optional[Request]:
        """Stop the request with this key (waiting or running) and free its row; returns it, or None if not found."""
        for req in list(self.waiting):
            if req.key == key:
                self.waiting.remove(req)
                req.finish = "cancelled"
                return req
        for b, row in enumerate(self.slots):
            if row.request is not None and row.request.key == key:
                req = row.request
                self._free(b, "cancelled")
                return req
        return None

    def cancel_all(self) -> None:
        for req in list(self.waiting) + [r for r in self.rows if r is not None]:
            self.cancel(req.key)

    # ---- one step ----
    @torch.no_grad()
    def step(self, max_steps: int = 1) -> list[Event]:
        """Admit; feed back the tokens earlier steps returned (unless prompts wait and the running rows may wait for
        them: then prefill first); prefill; pick one token for every decoding row whose token is not waiting (the
        events returned); free finished rows. The picks are fed at a later step (with speculation: in this one).

        max_steps > 1: while nothing waits to be admitted or prefilled, run up to that many decode steps on the
        device before the one host sync (rows that end meanwhile decode a pad until then)."""
        self._admit()
        c = self.config
        if not self._prefill_first():
            self._decode_due()  # its rows pick after this step's prefill, which so counts toward their wait
        self.waited += self._prefill_some(min(c.prefill_step or c.prefill_chunk, c.prefill_chunk - self.waited))
        failed, self.failed = self.failed, []
        waits = self._due_rows()  # their logits are from before their due token
        if not waits:
            self.waited = 0  # the tokens picked now start the clock
        busy = [b for b, r in enumerate(self.slots) if r.decoding and b not in waits]
        if not busy:
            return failed
        ahead = not self.waiting and not waits and not c.speculate and all(
            r.request is None or (r.decoding and r.request.logprobs is None) for r in self.slots) \
            and all(self.slots[b].grammar is None for b in busy)  # a grammar needs the host after every token
        n = min(max_steps, max(self.slots[b].request.max_new_tokens - len(self.slots[b].request.output)
                               for b in busy)) if ahead else 1
        picks = self._run_ahead(busy, n)  # (B, n) on the host: the one sync of this step
        events, feed = failed, []
        for b in busy:
            req, fed = self.slots[b].request, []
            for i, t in enumerate(picks[b]):
                if self.slots[b].grammar is not None and t not in req.stop_ids:
                    advance(self.slots[b].grammar, t)
                ended = self._take(req, t, events, self.slots[b].picked_logprob if i == 0 else None)
                if ended:
                    self._free(b, ended)
                    break
                if i < n - 1:
                    fed.append(t)  # fed on the device already
                else:
                    feed.append(b)
            self.slots[b].held += fed
        if feed:
            last = [row[-1] for row in picks]
            if not self.config.speculate:  # decoded at the start of a later step: these tokens go out first
                self.due += [(b, self.slots[b].request, last[b]) for b in feed]
                return events
            for b, kept in self._speculate(feed, last).items():
                for t in kept:  # verified drafts are answer tokens like any other
                    ended = self._take(self.slots[b].request, t, events)
                    if ended:
                        self._free(b, ended)
                        break
        return events

    def _take(self, req: Request, t: int, events: list, lp: Optional[TokenLogprob] = None) -> Optional[str]:
        """Record token t of req (with its logprob lp when asked for); returns its finish reason if it ended."""
        if t in req.stop_ids:
            events.append(Event(req, None, "stop"))
            return "stop"
        req.output.append(t)
        if len(req.output) >= req.max_new_tokens:
            events.append(Event(req, t, "length", lp))
            return "length"
        events.append(Event(req, t, None, lp))
        return None

    # ---- admission and prefill ----
    def _admit(self) -> None:
        """Each free row takes the next waiting request, with whatever prefix of its prompt the cache holds."""
        while self.waiting:
            free = [b for b, r in enumerate(self.slots) if r.request is None]
            if not free:
                return
            req = self.waiting[0]
            running = {r.request.adapter for r in self.slots if r.request is not None}
            if not self.config.mix_adapters and running and running != {req.adapter}:
                return  # the batch drains first; the head of the queue keeps its place
            self.waiting.popleft()
            self._place(req, free)

    def _reusable(self, b: int, req: Request) -> int:
        """How many prompt tokens row b's cache holds (at least one token is always prefilled, for its logits)."""
        row = self.slots[b]
        sibling = req.fork_of is not None and row.request is not None and row.request.key == req.fork_of
        if not (self.config.reuse_prefix or sibling) or row.adapter != req.adapter or req.prompt_logprobs:
            return 0
        return min(common_prefix(row.held, req.prompt), len(req.prompt) - 1)

    def _place(self, req: Request, free: list[int]) -> None:
        """Put req in the lowest free row (a decode forward runs rows 0..last busy, so busy rows stay packed at the
        front), copying the longest cached prefix of its prompt from whichever row holds it (free rows at the back
        keep what they held longest: they are the prefix store)."""
        b = min(free)
        own = self._reusable(b, req)
        src = max(range(self.B), key=lambda i: (self._reusable(i, req), i == b))
        k = self._reusable(src, req)
        row = self.slots[b]
        if src != b and k > own:
            rows, n = torch.tensor([b], device=self.device), torch.tensor([src], device=self.device)
            for layer in self.model.layers:  # the same weights saw the same tokens: the keys/values are equal
                cache = layer.attention.cache
                cache.k[rows, :, own:k] = cache.k[n, :, own:k]
                cache.v[rows, :, own:k] = cache.v[n, :, own:k]
            self.stats["copied"] += k - own
            row.held = self.slots[src].held[:k]
        else:
            k = own
            row.held = row.held[:k]
        row.request, row.adapter, row.todo = req, req.adapter, list(req.prompt[k:])
        row.generator = None
        if req.seed is not None:
            row.generator = torch.Generator(device=self.device)
            row.generator.manual_seed(req.seed)
        row.banned, row.order = -1, self.admitted
        row.grammar = None if req.constraint is None else new_row_state(self.grammar(), req.constraint)
        self.admitted += 1
        req.cached_tokens = k

    def _prefill_first(self) -> bool:
        """Whether this step prefills before feeding the due tokens back: prompts wait to be prefilled, and the rows
        with due tokens have waited for fewer than prefill_chunk prompt tokens since their last token (a row so waits
        at most prefill_chunk prompt tokens between two tokens). Not with speculation, which feeds its rows within
        the step."""
        if self.config.speculate or self.waited >= self.config.prefill_chunk or not self._due_rows():
            return False
        return any(self._pending(b) for b in range(self.B))

    def _due_rows(self) -> set[int]:
        """Rows whose picked token waits for its decode forward (a row cancelled since is no longer one)."""
        return {b for b, req, _ in self.due if self.slots[b].request is req}

    def _pending(self, b: int) -> bool:
        """Row b has prompt tokens to prefill now (a fork waits for the row whose prompt it shares)."""
        return self.slots[b].request is not None and bool(self.slots[b].todo) and not self._awaits_fork(b)

    def _prefill_some(self, budget: int) -> int:
        """Prefill up to budget prompt tokens, first come first served, in packed forwards of up to prefill_rows
        rows of one adapter. -> the tokens prefilled."""
        total = budget
        pending = sorted(filter(self._pending, range(self.B)), key=lambda b: self.slots[b].order)
        while pending and budget > 0:
            adapter = self.slots[pending[0]].request.adapter  # a packed forward is one row: one adapter
            batch = []
            for b in pending:
                if len(batch) == self.config.prefill_rows or budget == 0:
                    break
                if self.slots[b].request.adapter == adapter:
                    take = min(len(self.slots[b].todo), budget)
                    batch.append((b, take))
                    budget -= take
            self._prefill_isolated(batch)
            pending = [b for b in pending if self.slots[b].request is not None and self.slots[b].todo]
        return total - budget

    def _prefill_isolated(self, batch: list[tuple[int, int]]) -> None:
        """_prefill; when it raises, each row again alone, so a request whose own prefill fails (a broken adapter)
        ends with "error" by itself and the others go on. (A row's cache and tokens change only after its forward.)"""
        try:
            self._prefill(batch)
        except Exception as e:
            if len(batch) > 1:
                for b, take in batch:
                    self._prefill_isolated([(b, take)])
                return
            req = self.slots[batch[0][0]].request
            print(f"[request {req.key}: prefill failed: {type(e).__name__}: {e}]", file=sys.stderr, flush=True)
            self._free(batch[0][0], "error")
            self.failed.append(Event(req, None, "error"))

    def _prefill(self, batch: list[tuple[int, int]]) -> None:
        """Run each row's next `take` prompt tokens into its cache row, all packed into one row of the forward
        (no padding: attention.CacheStep.packed); a row whose prompt is now all in gets its last position's
        logits."""
        starts = [self.slots[b].pos for b, _ in batch]
        tokens = torch.tensor([[t for b, take in batch for t in self.slots[b].todo[:take]]])  # (1, N)
        step = CacheStep.packed([(b, start, take) for (b, take), start in zip(batch, starts)], self.device)
        self._set_adapters([self.slots[batch[0][0]].request.adapter])
        hidden = self.model(tokens.to(self.device), start_pos=step, return_hidden=True)[0]  # (N, D)
        ends = list(itertools.accumulate(take for _, take in batch))  # each row's end in hidden
        done = []
        for i, (b, take) in enumerate(batch):
            row = self.slots[b]
            row.held += row.todo[:take]
            row.todo = row.todo[take:]
            if not row.todo:
                done.append((b, ends[i] - 1))
        self.stats["prefilled"] += ends[-1]
        for i, (b, take) in enumerate(batch):
            if self.slots[b].request.prompt_logprobs:
                self._prompt_logprobs(b, hidden[ends[i] - take:ends[i]], starts[i])
        if done:
            last = hidden[[i for _, i in done]]  # (d, D)
            self.logits[[b for b, _ in done]] = self.model.output(last).float()
        for b, _ in done:
            self._start_decoding(b)
            self._fork(b)

    def _start_decoding(self, b: int) -> None:
        """Row b's prompt is in: set up the penalties' token state from its prompt."""
        req = self.slots[b].request
        if req.sampling.repetition_penalty != 1.0 and self.seen is None:
            self.seen = torch.zeros(self.B, self.vocab, dtype=torch.bool, device=self.device)
        if self.seen is not None:
            self.seen[b] = seen_mask(torch.tensor([req.prompt], device=self.device), self.vocab)[0]
        if req.sampling.counts_output and self.counts is None:
            self.counts = torch.zeros(self.B, self.vocab, device=self.device)
        if self.counts is not None:
            self.counts[b] = 0

    def _prompt_logprobs(self, b: int, hidden: torch.Tensor, start: int) -> None:
        """Append the logprobs of the prompt tokens after slots [start, start + T) (hidden (T, D)) to row b's
        request; the prompt's first token has none (None)."""
        req = self.slots[b].request
        if start == 0:
            req.prompt_token_logprobs = [None]
        targets = req.prompt[start + 1:start + 1 + hidden.shape[0]]  # the token each position predicts
        if targets:
            logits = self.model.output(hidden[:len(targets)]).float()  # (t, V)
            chosen = torch.tensor(targets, device=self.device)
            for t, (lp, top) in zip(targets, token_logprobs(logits, chosen, req.logprobs or 0)):
                req.prompt_token_logprobs.append(TokenLogprob(t, lp, top))

    def _awaits_fork(self, b: int) -> bool:
        """Row b is another sample of a prompt that a row is prefilling now: it copies that row's cache when done."""
        parent = self.slots[b].request.fork_of
        return parent is not None and any(r.request is not None and r.request.key == parent and r.todo
                                          for r in self.slots)

    def _fork(self, b: int) -> None:
        """Rows waiting on row b's prompt (its request's other samples) copy its keys/values and next-token logits."""
        req, n = self.slots[b].request, len(self.slots[b].request.prompt)
        forks = [c for c, r in enumerate(self.slots)
                 if r.request is not None and r.request.fork_of is not None and r.request.fork_of == req.key and r.todo]
        if not forks:
            return
        rows, src = torch.tensor(forks, device=self.device), torch.tensor([b], device=self.device)
        for layer in self.model.layers:  # (c, n_kv, n, hd) <- the prompt's slots of row b
            cache = layer.attention.cache
            cache.k[rows, :, :n] = cache.k[src, :, :n]
            cache.v[rows, :, :n] = cache.v[src, :, :n]
        self.logits[rows] = self.logits[b].clone()
        for c in forks:
            row = self.slots[c]
            row.held, row.todo, row.request.cached_tokens = list(req.prompt), [], n
            self.stats["copied"] += n
            self._start_decoding(c)

    # ---- choosing tokens: the one place ----
    def _processed(self, rows: list[int], logits: torch.Tensor, seen: Optional[torch.Tensor]) -> torch.Tensor:
        """The sampler's logits for these rows (logits (n, V), one per row; seen (n, V) or None), each row with its
        request's processors, and a banned draft at -inf. A constrained row's disallowed tokens go to -inf first, so
        top-p / top-k choose among what the grammar allows."""
        logits = mask_logits(logits, [self.slots[b].grammar for b in rows])  # free rows untouched
        out = torch.empty_like(logits)
        groups: dict[tuple, list[int]] = {}
        for i, b in enumerate(rows):
            groups.setdefault(dataclasses.astuple(self.slots[b].request.sampling), []).append(i)
        for members in groups.values():
            params = self.slots[rows[members[0]]].request.sampling
            idx = torch.tensor(members, device=self.device) if len(members) < len(rows) else None
            part = logits if idx is None else logits[idx]
            s = None if seen is None else (seen if idx is None else seen[idx])
            c = None if self.counts is None else self.counts[[rows[i] for i in members]]
            part = process_logits(part, params, s, c)
            out = part if idx is None else out.index_copy_(0, idx, part)
        banned = [(i, self.slots[b].banned) for i, b in enumerate(rows) if self.slots[b].banned >= 0]
        if banned:
            out[[i for i, _ in banned], [t for _, t in banned]] = float("-inf")
        return out

    def _pick(self, busy: list[int]) -> torch.Tensor:
        """Each row's next token (B,) on the device: argmax when greedy, else a draw from the row's own generator or
        the shared one (which draws for all B rows at once); rank 0's choice wins."""
        x = self._processed(busy, self.logits[busy], None if self.seen is None else self.seen[busy])  # (n, V)
        nxt = torch.zeros(self.B, dtype=torch.long, device=self.device)
        sampled = [i for i, b in enumerate(busy) if not self.slots[b].request.sampling.greedy]
        if not sampled:
            nxt[busy] = x.argmax(-1)
        else:
            shared = None
            if any(self.slots[busy[i]].generator is None for i in sampled):
                shared = race_noise((self.B, self.vocab), self.generator, self.device)  # (B, V)
            noise = torch.stack([self._noise(b, shared) for b in busy])  # (n, V)
            picked = sample_from_logits(x, noise=noise)
            if len(sampled) < len(busy):
                greedy = [i for i in range(len(busy)) if i not in set(sampled)]
                picked[greedy] = x[greedy].argmax(-1)
            nxt[busy] = picked
        for b in busy:
            self.slots[b].banned = -1
        nxt = self._agree(nxt)
        rows = torch.tensor(busy, device=self.device)
        if self.seen is not None:  # only the rows that picked: a row whose due token waits keeps its state
            self.seen[rows, nxt[rows]] = True
        if self.counts is not None:
            self.counts.index_put_((rows, nxt[rows]), torch.ones(len(busy), device=self.device), accumulate=True)
        want = [b for b in busy if self.slots[b].request.logprobs is not None]
        if want:  # the raw distribution the token was drawn from (rows asking for logprobs are never run ahead)
            k = torch.tensor(want, device=self.device)
            for b, (lp, top) in zip(want, token_logprobs(self.logits[k], nxt[k], max(
                    self.slots[b].request.logprobs for b in want))):
                n = self.slots[b].request.logprobs
                self.slots[b].picked_logprob = TokenLogprob(int(nxt[b]), lp, top[:n])
        return nxt

    def _noise(self, b: int, shared: Optional[torch.Tensor]) -> torch.Tensor:
        """Row b's race noise (V,): its own generator's draw, the shared draw's row b, or ones for a greedy row."""
        row = self.slots[b]
        if row.request.sampling.greedy:
            return torch.ones(self.vocab, device=self.device)
        return shared[b] if row.generator is None else race_noise((self.vocab,), row.generator, self.device)

    def _agree(self, t: torch.Tensor) -> torch.Tensor:
        """Tensor parallel: every rank takes rank 0's t (sampled tokens, accepted drafts)."""
        if self.src is not None:
            dist.broadcast(t, src=self.src, group=self.group)
        return t

    # ---- decoding ----
    def _run_ahead(self, busy: list[int], n: int) -> list[list[int]]:
        """n picks with n - 1 decode steps between them, all on the device; a row that ends (a stop token or its
        last token) decodes pads at a standing slot from then on. -> each row's n tokens (one host sync)."""
        picks = [self._pick(busy)]
        if n > 1:
            stops = [sorted(self.slots[b].request.stop_ids) if b in busy else [] for b in range(self.B)]
            width = max(1, max(len(s) for s in stops))
            stop = torch.tensor([s + [-1] * (width - len(s)) for s in stops], device=self.device)  # (B, width)
            left = torch.tensor([self.slots[b].request.max_new_tokens - len(self.slots[b].request.output)
                                 if b in busy else 0 for b in range(self.B)], device=self.device)  # (B,)
            pos = torch.tensor([r.pos for r in self.slots], device=self.device)
            done = left <= 0
            top = max(self.slots[b].pos for b in busy)
            for i in range(n - 1):
                nxt = picks[-1]
                left = left - 1
                done = done | (nxt[:, None] == stop).any(1) | (left <= 0)
                tokens = torch.where(done, torch.full_like(nxt, self.config.pad_id), nxt)
                self._forward_decode(tokens, pos, top + i + 1)
                pos = pos + (~done).long()
                picks.append(self._pick(busy))
        return torch.stack(picks, dim=1).tolist()

    def _decode_due(self) -> None:
        """The decode forward of the tokens earlier steps picked and returned (step() hands a token out before
        feeding it back, so it reaches the client one forward sooner); rows cancelled since then are left out."""
        live, self.due = [(b, t) for b, req, t in self.due if self.slots[b].request is req], []
        if live:
            nxt = [self.config.pad_id] * self.B
            for b, t in live:
                nxt[b] = t
            self._decode([b for b, _ in live], nxt)

    def _decode(self, feed: list[int], nxt: list[int]) -> None:
        """One token for every row in feed; other rows decode a pad at their current slot, which a later prefill
        overwrites or their causal mask hides, and their logits are ignored."""
        tokens = [self.config.pad_id] * self.B
        for b in feed:
            tokens[b] = nxt[b]
        pos = torch.tensor([r.pos for r in self.slots], device=self.device)
        self._forward_decode(torch.tensor(tokens, device=self.device), pos, max(self.slots[b].pos for b in feed) + 1)
        for b in feed:
            self.slots[b].held.append(nxt[b])

    def _forward_decode(self, tokens: torch.Tensor, pos: torch.Tensor, live: int) -> None:
        """The decode forward: tokens (B,) at slots pos (B,), attending over key_slots(live) slots; logits kept."""
        busy = [b for b, r in enumerate(self.slots) if r.request is not None]
        n = self.B if self.config.fixed_batch else max(busy) + 1
        keys = key_slots(live, self.cache_len, self.config.compile)
        step = CacheStep(pos[:n], keys=keys)  # (n,): each row at its own slot
        self._set_adapters([r.request.adapter if r.request is not None else None for r in self.slots[:n]])
        if self.config.compile:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are consumed
        self.logits[:n] = self.step_fn(self.model, tokens[:n, None], step)  # (n, V), copied out of the graph
        self.stats["decode_steps"] += 1

    def _speculate(self, feed: list[int], nxt: list[int]) -> dict[int, list[int]]:
        """Feed each row its token plus up to draft_tokens drafts (the config's drafter's) in one forward; returns
        each row's drafts that verified (its cache then holds them, and its logits predict the token after them)."""
        room = {}
        for b in feed:
            row, req = self.slots[b], self.slots[b].request
            n = min(self.config.draft_tokens, req.max_new_tokens - len(req.output), self.cache_len - row.pos - 1)
            plain = req.sampling.repetition_penalty == 1.0 and not req.sampling.counts_output and req.logprobs is None
            if n > 0 and plain:  # a penalty's token state would move per draft; logprobs are per picked token
                room[b] = n
        texts = {b: self.slots[b].request.prompt + self.slots[b].request.output for b in room}  # each ends in nxt[b]
        drafts = self.drafter.draft(texts, room) if room else {}
        if not drafts:
            self._decode(feed, nxt)
            return {}
        K = max(len(d) for d in drafts.values())
        tokens = torch.full((len(feed), 1 + K), self.config.pad_id, dtype=torch.long)  # (n, 1 + K)
        for i, b in enumerate(feed):
            d = drafts.get(b, [])
            tokens[i, :1 + len(d)] = torch.tensor([nxt[b]] + d)
        starts = [self.slots[b].pos for b in feed]
        every = feed == list(range(len(feed)))  # rows 0..n-1: the cache's view, not a gathered copy of its rows
        step = CacheStep(torch.tensor(starts, device=self.device),
                         rows=None if every else torch.tensor(feed, device=self.device), keys=max(starts) + 1 + K)
        self._set_adapters([self.slots[b].request.adapter for b in feed])
        logits = self.model(tokens.to(self.device), start_pos=step)  # (n, 1 + K, V)
        self.stats["decode_steps"] += 1
        rows = [i for i, b in enumerate(feed) if b in drafts]  # verified rows, as indices into feed
        vb = [feed[i] for i in rows]
        draft_t = torch.full((len(rows), K), -1, dtype=torch.long)
        for j, b in enumerate(vb):
            draft_t[j, :len(drafts[b])] = torch.tensor(drafts[b])
        x = self._processed([b for b in vb for _ in range(K)], logits[rows, :K].reshape(-1, self.vocab), None)
        greedy = torch.tensor([self.slots[b].request.sampling.greedy for b in vb], device=self.device)
        uniform = torch.stack([torch.rand(K, generator=self.slots[b].generator or self.generator, device=self.device)
                               for b in vb])  # (n, K)
        kept = self._agree(accepted_drafts(x.view(len(vb), K, -1), draft_t.to(self.device), greedy, uniform))
        at = torch.zeros(len(feed), dtype=torch.long, device=self.device)
        at[rows] = kept
        self.logits[feed] = logits[torch.arange(len(feed), device=self.device), at]  # (n, V)
        kept = dict(zip(vb, kept.tolist()))
        out = {}
        for b in feed:
            row, d, j = self.slots[b], drafts.get(b, []), kept.get(b, 0)
            row.held += [nxt[b]] + d[:j]
            row.banned = d[j] if j < len(d) and not row.request.sampling.greedy else -1
            self.stats["drafted"] += len(d)
            self.stats["accepted"] += j
            out[b] = d[:j]
        return out

    def _free(self, b: int, finish: str) -> None:
        row = self.slots[b]
        row.request.finish = finish
        row.request, row.todo, row.generator, row.banned, row.grammar, row.picked_logprob = None, [], None, -1, None, None

    def _set_adapters(self, names: list) -> None:
        if self.row_adapters is not None:
            self.row_adapters(self.model, names)
