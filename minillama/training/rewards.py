"""Reward functions for GRPO and rejection sampling, and how the command line names and weighs them.

A reward is any Python function called as f(prompt=..., completion=..., reference=..., **the line's other fields)
-> float (the shape --eval_generate's --reward already uses), named on the command line as pkg.module:function, or a
reward model's directory (train/dpo.py --loss reward's final/, scored by reward_model.RewardModel); several are
separated by commas and weighted with --reward_weights. Two ship here:

    format_reward   the fraction of the required headings (default: the review format of train/data/reviews.jsonl,
                    ## Summary / ## Strengths / ## Weaknesses / ## Verdict) that appear as lines, in order
    exact_answer    1.0 when the completion (or its last non-empty line) equals the line's "answer" field (else
                    the reference answer), ignoring surrounding whitespace and case; else 0.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

REVIEW_HEADINGS = ("## Summary", "## Strengths", "## Weaknesses", "## Verdict")


def format_reward(prompt: str = "", completion: str = "", headings: Optional[Sequence[str]] = None, **_) -> float:
    """The fraction of `headings` (a line field, else the review format's) found as lines of the completion in order:
    partial credit, so a group of samples differs in reward before any sample has them all."""
    want = list(headings) if headings else list(REVIEW_HEADINGS)
    lines = [line.strip() for line in completion.splitlines()]
    found, at = 0, 0
    for h in want:
        try:
            at = lines.index(h.strip(), at) + 1
        except ValueError:
            continue
        found += 1
    return found / len(want)


def _norm(text: str) -> str:
    return " ".join(str(text).split()).lower()


def exact_answer(prompt: str = "", completion: str = "", reference: Optional[str] = None,
                 answer: Optional[str] = None, **_) -> float:
    """1.0 when the completion, or its last non-empty line, equals the expected answer (the line's "answer" field,
    else its reference), whitespace- and case-insensitively; 0.0 otherwise (also when the line has no answer)."""
    target = answer if answer is not None else reference
    if target is None:
        return 0.0
    lines = [line for line in completion.splitlines() if line.strip()]
    candidates = {_norm(completion)} | ({_norm(lines[-1])} if lines else set())
    return float(_norm(target) in candidates)


def _number(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--reward {name} returned {value!r}, expected a number") from None


@dataclass
class Rewards:
    """Several named reward functions and their weights; calling it gives every function's score and the total."""

    names: list[str]
    fns: list[Callable]
    weights: list[float]

    def scores(self, prompt: str, completion: str, reference: Optional[str], fields: dict) -> list[float]:
        return self.scores_many([(prompt, completion, reference, fields)])[0]

    def scores_many(self, items: Sequence[tuple[str, str, Optional[str], dict]]) -> list[list[float]]:
        """Every function's score of each (prompt, completion, reference, fields): one list per item. A function
        with a `batch` method (a reward model) scores all the items in one call."""
        columns = []
        for name, fn in zip(self.names, self.fns):
            if hasattr(fn, "batch"):
                values = fn.batch([(prompt, completion) for prompt, completion, _, _ in items])
            else:
                values = [fn(prompt=p, completion=c, reference=r, **f) for p, c, r, f in items]
            columns.append([_number(name, v) for v in values])
        return [list(row) for row in zip(*columns)]

    def total(self, scores: Sequence[float]) -> float:
        return sum(w * s for w, s in zip(self.weights, scores))

    def __call__(self, prompt: str = "", completion: str = "", reference: Optional[str] = None, **fields) -> float:
        """The weighted sum: usable wherever one reward function is (evaluation by generation)."""
        return self.total(self.scores(prompt, completion, reference, fields))


def load_rewards(spec: str, weights: Optional[Sequence[float]] = None) -> Rewards:
    """--reward "a.b:f,c.d:g" and --reward_weights 1 0.5 -> Rewards (weights default to 1 each)."""
    from .generation_eval import load_reward

    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    if not names:
        raise ValueError("--reward: name at least one reward function as pkg.module:function")
    weights = [1.0] * len(names) if not weights else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"--reward_weights: {len(weights)} weights for {len(names)} reward functions")
    return Rewards(names=names, fns=[load_reward(n) for n in names], weights=weights)
