"""Speculative decoding by prompt lookup: draft the tokens that followed the row's latest n-gram earlier in its own
text, verify them all in one forward, keep the longest prefix the model agrees with.

Exact: greedy rows keep a draft only where it is the argmax, so they produce the tokens plain greedy decoding would.
Sampled rows use Leviathan et al.'s rejection rule with the lookup as a draft that proposes d with certainty
(q(d) = 1): keep d with probability min(1, p(d) / q(d)) = p(d); at the first rejection the token is drawn from the
residual max(0, p - q) renormalised, which is p with d removed. Each kept or drawn token is then distributed as p.
Shape letters: n verified rows, K drafts per row, V vocabulary.
"""

from __future__ import annotations

import torch


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
