"""Speculative decoding: a drafter proposes the next few tokens of each row, the engine verifies them all in one
forward of the target model and keeps the longest prefix the target agrees with. Two drafters, one interface
(draft(texts, room) -> {row: drafts}, reserve(n_slots)):

- NgramDrafter (speculate="ngram"), prompt lookup: the tokens that followed the row's latest n-gram earlier in its
  own text.
- DraftModel (speculate="draft"), a small model of the same vocabulary, as in gpt-fast: it catches up on the row's
  text in its own KV cache, then proposes tokens greedily, one cached single-token step each, all rows together.

Exact: greedy rows keep a draft only where it is the argmax, so they produce the tokens plain greedy decoding would.
Sampled rows use Leviathan et al.'s rejection rule with a draft that proposes d with certainty (q(d) = 1): keep d
with probability min(1, p(d) / q(d)) = p(d); at the first rejection the token is drawn from the residual
max(0, p - q) renormalised, which is p with d removed. Each kept or drawn token is then distributed as p. Both
drafters are deterministic given the row's text (lookup, or the draft model's argmax), so q is that point mass.
Shape letters: n rows, K drafts per row, T tokens per row in a forward, D model dim, V vocabulary.
"""

from __future__ import annotations

import torch

from ..attention import CacheStep
from .decode_step import ensure_cache


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: bisect with slice compares, C speed on long texts
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def ngram_draft(tokens: list[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens (n from max_n down to min_n);
    [] when none occurs."""
    L = len(tokens)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        tail = tokens[L - n:]
        first = tail[0]
        for s in range(L - n - 1, -1, -1):  # the latest match: text being quoted right now continues there
            if tokens[s] == first and tokens[s:s + n] == tail:
                return tokens[s + n:s + n + k]
    return []


class NgramDrafter:
    """Prompt lookup behind the drafter interface; it holds nothing."""

    def draft(self, texts: dict[int, list[int]], room: dict[int, int]) -> dict[int, list[int]]:
        """Up to room[b] lookup drafts continuing each row b's text; rows with none are left out."""
        drafts = {b: ngram_draft(text, room[b]) for b, text in texts.items()}
        return {b: d for b, d in drafts.items() if d}

    def reserve(self, n_slots: int) -> None:
        pass


class DraftModel:
    """A small Transformer that drafts greedily for the target: its own KV cache of the engine's rows, and per row the
    tokens that cache holds (compared with the row's text at every draft, so a rejected draft or a refilled row keeps
    only the common prefix)."""

    def __init__(self, model, target, rows: int, cache_len: int, chunk: int):
        """model: the draft; target: the engine's model (vocabularies must match); chunk: most catch-up tokens per
        row in one forward."""
        if model is target:
            raise ValueError("the draft model must be a separate model from the target (it keeps its own KV cache)")
        if model.args.vocab_size != target.args.vocab_size:
            raise ValueError(f"the draft model's vocabulary has {model.args.vocab_size} tokens, the target's "
                             f"{target.args.vocab_size}: a draft must share the target's tokenizer")
        self.model, self.chunk = model, chunk
        self.device = model.tok_embeddings.weight.device
        ensure_cache(model, rows, cache_len)
        self.cache_len = cache_len  # the engine's: each row's text and drafts fit in it
        self.held: list[list[int]] = [[] for _ in range(rows)]  # row b's draft cache slots [0, len) hold these
        self.forwards = 0

    def reserve(self, n_slots: int) -> None:
        """Grow the draft cache with the engine's (engine.reserve), keeping what it holds."""
        if self.model.cache_len < n_slots:
            for layer in self.model.layers:
                layer.attention.cache = layer.attention.cache.resized(n_slots)
        self.cache_len = n_slots

    def draft(self, texts: dict[int, list[int]], room: dict[int, int]) -> dict[int, list[int]]:
        """room[b] (>= 1) greedy tokens continuing each row b's text: every row catches up on what its draft cache
        lacks, then each draft is one cached single-token step of the rows that want more."""
        last = self._catch_up(texts)
        rows = sorted(texts)
        logits = torch.stack([last[b] for b in rows])  # (n, V)
        drafts: dict[int, list[int]] = {b: [] for b in rows}
        while True:
            for b, t in zip(rows, logits.argmax(-1).tolist()):
                drafts[b].append(t)
            rows = [b for b in rows if len(drafts[b]) < room[b]]
            if not rows:
                return drafts
            logits = self._feed({b: drafts[b][-1:] for b in rows})

    def _catch_up(self, texts: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Feed each row the tokens of its text that its cache does not hold (at least the last one, whose logits
        draft the first token), up to chunk per row and forward. -> each row's logits after its text (V,)"""
        todo = {}
        for b, text in texts.items():
            keep = min(common_prefix(self.held[b], text), len(text) - 1)
            self.held[b] = self.held[b][:keep]
            todo[b] = text[keep:]
        last = {}
        while todo:
            T = min(self.chunk, max(len(t) for t in todo.values()))
            # a row whose right padding would run past the cache waits: the longest row always fits (its text does)
            batch = {b: t[:T] for b, t in todo.items() if len(self.held[b]) + T <= self.cache_len}
            logits = self._feed(batch)
            for i, b in enumerate(sorted(batch)):
                todo[b] = todo[b][len(batch[b]):]
                if not todo[b]:
                    last[b] = logits[i]
                    del todo[b]
        return last

    def _feed(self, tokens: dict[int, list[int]]) -> torch.Tensor:
        """One forward of each row's tokens into its cache row after what it holds, right-padded (pads write past
        the row's tokens, where the causal mask hides them until its own tokens overwrite them). -> the logits
        after each row's last token (n, V), rows in sorted order"""
        rows = sorted(tokens)
        T = max(len(tokens[b]) for b in rows)
        x = torch.zeros((len(rows), T), dtype=torch.long)  # (n, T)
        for i, b in enumerate(rows):
            x[i, :len(tokens[b])] = torch.tensor(tokens[b])
        starts = [len(self.held[b]) for b in rows]
        step = CacheStep(torch.tensor(starts, device=self.device), rows=torch.tensor(rows, device=self.device),
                         keys=max(starts) + T)
        hidden = self.model(x.to(self.device), start_pos=step, return_hidden=True)  # (n, T, D)
        ends = torch.tensor([len(tokens[b]) - 1 for b in rows], device=self.device)
        last = hidden[torch.arange(len(rows), device=self.device), ends]  # (n, D)
        for b in rows:
            self.held[b] += tokens[b]
        self.forwards += 1
        return self.model.output(last).float()


def accepted_drafts(logits: torch.Tensor, drafts: torch.Tensor, greedy: torch.Tensor,
                    uniform: torch.Tensor) -> torch.Tensor:
    """How many leading drafts each row keeps. logits (n, K, V): processed (the sampler's) logits at the positions
    that predict each draft; drafts (n, K) long, -1 where a row has fewer; greedy (n,) bool; uniform (n, K) in
    [0, 1). -> (n,) long"""
    d = drafts.clamp(min=0)[..., None]  # (n, K, 1)
    p_draft = torch.softmax(logits.float(), dim=-1).gather(-1, d)[..., 0]  # (n, K)
    keep_sampled = uniform < p_draft  # kept with probability p(d) = min(1, p(d) / q(d)), q(d) = 1
    keep_greedy = logits.argmax(-1) == drafts
    keep = torch.where(greedy[:, None], keep_greedy, keep_sampled) & (drafts >= 0)
    return keep.long().cumprod(dim=1).sum(dim=1)  # up to the first rejection
