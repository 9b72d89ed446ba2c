"""Rejection sampling (Llama 2/3's post-training): for each prompt, N completions sampled by generate() (the prompt
repeated N times, seeded), each scored by the reward functions; the best one is kept as SFT data, with every
sample's score beside it so the choice can be checked. train/rejection.py runs rounds of it, each followed by
train/sft.py on the kept answers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..inference.engine import EngineConfig
from ..inference.generate import generate
from ..inference.sampling import SamplingParams
from ..util.files import atomic_write
from .grpo import Prompt
from .rewards import Rewards


@dataclass(frozen=True)
class RejectionConfig:
    n: int = 8  # samples per prompt
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0


@torch.no_grad()
def best_of_n(model, tok, prompts: list[Prompt], rewards: Rewards, cfg: RejectionConfig) -> list[dict]:
    """One SFT record per prompt: its dialog with the best-scoring of cfg.n sampled answers (the first of equals),
    "reward" the best total, "rewards" all n totals (sample order), "scores" the best one's per-function scores."""
    ids = [p.ids for p in prompts for _ in range(cfg.n)]
    new = generate(model, ids, cfg.max_new_tokens, SamplingParams(cfg.temperature, cfg.top_p),
                   stop_ids=tok.stop_ids, config=EngineConfig(seed=cfg.seed))
    model.clear_cache()
    size = tok.vocab_size  # ids past the tokenizer (a padded vocab) have no text
    out = []
    for i, p in enumerate(prompts):
        texts = [tok.decode([t for t in c if t < size]) for c in new[i * cfg.n:(i + 1) * cfg.n]]
        scores = rewards.scores_many([(p.text, t, p.reference, p.fields) for t in texts])
        totals = [rewards.total(s) for s in scores]
        best = max(range(cfg.n), key=lambda j: (totals[j], -j))  # ties: the first sample
        out.append({"messages": p.messages + [{"role": "assistant", "content": texts[best]}], "reward": totals[best],
                    "rewards": totals, "scores": dict(zip(rewards.names, scores[best])), "line": p.line})
    return out


def write_records(path: Path, records: list[dict]) -> Path:
    """JSONL, atomically (train/sft.py reads the "messages" of each line and ignores the rest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
