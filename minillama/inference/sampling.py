"""Logits processors and sampling: logit bias, repetition penalty, frequency/presence penalties, then (sampling only)
temperature, top-k, top-p, min-p (Hugging Face's order for the ones it has; OpenAI's definitions for bias and the
frequency/presence penalties).

Everything stays on the logits' device (no host sync), so a decode step can run without waiting on the CPU.
Shape letters: B rows, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingParams:
    """How the next token is chosen. temperature 0 = greedy (argmax); the filters then do not matter."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the row (prompt included)
    frequency_penalty: float = 0.0  # OpenAI: logit -= count of the token in the answer so far * this (-2..2)
    presence_penalty: float = 0.0  # OpenAI: logit -= this once the token occurs in the answer (-2..2)
    logit_bias: tuple = ()  # OpenAI: ((token id, bias in -100..100), ...) added to the logits; a dict is accepted
    min_p: float = 0.0  # drop tokens whose probability is below min_p * the top one's (after temperature); 0 = off

    def __post_init__(self):
        check_sampling_args(self.temperature, self.top_p, self.top_k, self.repetition_penalty)
        if isinstance(self.logit_bias, dict):
            self.logit_bias = tuple(sorted(self.logit_bias.items()))
        check_openai_args(self.frequency_penalty, self.presence_penalty, self.logit_bias, self.min_p)

    @property
    def counts_output(self) -> bool:
        """Whether the answer's token counts are needed (the frequency / presence penalties)."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_sampling_args(temperature: float, top_p: float, top_k: int, repetition_penalty: float) -> None:
    """Raise ValueError naming the bad argument and its valid range."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(repetition_penalty, (int, float)) and math.isfinite(repetition_penalty)
            and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {repetition_penalty!r}")


def check_openai_args(frequency_penalty: float, presence_penalty: float, logit_bias: tuple, min_p: float) -> None:
    """Raise ValueError naming the bad argument and its valid range (OpenAI's ranges for the first three)."""
    for name, v in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2 <= v <= 2:
            raise ValueError(f"{name} must be a number in [-2, 2] (0 = off), got {v!r}")
    for pair in logit_bias:
        ok = isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], int) and pair[0] >= 0
        if not ok or isinstance(pair[1], bool) or not isinstance(pair[1], (int, float)) or not -100 <= pair[1] <= 100:
            raise ValueError(f"logit_bias must map token ids >= 0 to numbers in [-100, 100], got {pair!r}")
    if isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be a number in [0, 1] (0 = off), got {min_p!r}")


def seen_mask(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Which vocabulary entries occur in each row. token_ids (B, T) long -> (B, V) bool."""
    mask = torch.zeros(token_ids.shape[0], vocab_size, dtype=torch.bool, device=token_ids.device)
    return mask.scatter_(1, token_ids, True)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as HF applies it: positive logits of seen tokens / penalty, negative ones * penalty.

    logits (B, V) float, seen (B, V) bool. A token counts once however often it occurred.
    """
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits per row (and any tied with the k-th), -inf elsewhere. (B, V) -> (B, V)"""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filter with HF's rule: drop the least likely tokens whose cumulative probability is <= 1 - p.

    The most likely min_tokens_to_keep tokens always stay. (B, V) -> (B, V)
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # ascending: the tail comes first
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - p)
    drop_sorted[..., -min_tokens_to_keep:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """HF's min-p filter: -inf where a token's probability is below min_p times the most likely one's. (B, V)"""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def apply_logit_bias(logits: torch.Tensor, bias: tuple) -> torch.Tensor:
    """OpenAI's logit_bias: each (token id, bias) added to that token's logit in every row. (B, V)"""
    ids = torch.tensor([t for t, _ in bias], device=logits.device)
    values = torch.tensor([float(b) for _, b in bias], device=logits.device)
    return logits.index_add(1, ids, values.expand(logits.shape[0], -1))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor] = None,
                   counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logit bias, repetition penalty, frequency/presence penalties, temperature, top-k, top-p, min-p on float32
    logits (B, V); seen (B, V) bool: tokens in the row (prompt included); counts (B, V): each token's count in the
    answer so far. Greedy skips the warpers (temperature and the filters)."""
    logits = logits.float()
    if params.logit_bias:
        logits = apply_logit_bias(logits, params.logit_bias)
    if params.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty != 1 needs the seen-token mask (B, V)")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.counts_output:
        if counts is None:
            raise ValueError("frequency_penalty / presence_penalty need the answer's token counts (B, V)")
        logits = logits - counts * params.frequency_penalty - (counts > 0).float() * params.presence_penalty
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = apply_top_p(logits, params.top_p)
    if params.min_p > 0.0:
        logits = apply_min_p(logits, params.min_p)
    return logits


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[tuple[float, list]]:
    """log_softmax of float32 logits (n, V) at the chosen tokens (n,), and the k most likely (id, logprob) pairs of
    each row, most likely first -> n pairs (logprob, [(id, logprob), ...]) on the host."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    picked = lp.gather(1, chosen[:, None].to(lp.device))[:, 0].tolist()
    if k == 0:
        return [(p, []) for p in picked]
    top = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return [(p, list(zip(ids, vals))) for p, ids, vals in zip(picked, top.indices.tolist(), top.values.tolist())]


def race_noise(shape, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Exp(1) draws for sample_from_logits, e.g. drawn once for a whole batch so a row's draws do not depend on which
    other rows are sampled."""
    race = torch.empty(shape, dtype=torch.float32, device=device).exponential_(1.0, generator=generator)
    return race.clamp_(min=torch.finfo(race.dtype).tiny)  # an exact 0 would turn a filtered token's 0/0 into NaN


def sample_from_logits(logits: torch.Tensor, generator: Optional[torch.Generator] = None,
                       noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Draw one token per row from softmax(logits) without a host sync. (B, V) -> (B,) long

    Uses the exponential-race trick: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i
    (torch.multinomial would wait on the device to validate the distribution). noise: the E (B, V) to use.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    race = race_noise(probs.shape, generator, probs.device) if noise is None else noise
    return torch.argmax(probs / race, dim=-1)


def next_token(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Process the logits (B, V) and pick each row's next token (B,): argmax when greedy, else a sample."""
    logits = process_logits(logits, params, seen)
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    return sample_from_logits(logits, generator)
