"""Evaluation by generation during training (--eval_generate N): greedy answers to the first N held-out prompts,
generated with minillama.inference's generate() on the model as it is (LoRA adapters live, the run's chat format),
scored, written to OUT/samples/step_N.jsonl and logged to metrics.jsonl as gen/* (plotted beside the loss).

Prompts and references come from --eval_data: a chat record's last assistant message is the reference and the turns
before it the prompt; a preference pair's prompt and chosen answer; a KTO line's prompt (and its completion when
labelled desirable). Scores, each a mean over the N answers: gen/exact (the answer equals the reference, ignoring
surrounding whitespace), gen/regex (--eval_regex matches the answer), gen/reward (--reward pkg.module:function,
called as function(prompt=..., completion=..., reference=..., **the line's other fields) -> float, or a reward
model's directory: train/dpo.py --loss reward's final/).

Under FSDP every rank generates the same N answers (the sharded blocks gather their weights in lockstep; greedy
decoding gives every rank the same tokens); rank 0 writes them.
"""

from __future__ import annotations

import importlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..inference.generate import generate
from ..util.files import atomic_write
from .config import GenerationEvalConfig
from .reward_model import RewardModel
from .data import DataStats, check_data_file, jsonl_records, to_messages

SAMPLES_DIR = "samples"


@dataclass
class EvalPrompt:
    messages: list[dict]  # the dialog the answer continues
    reference: Optional[str]  # the expected answer, when the line has one
    fields: dict = field(default_factory=dict)  # the line's other keys, passed to the reward function
    line: int = 0


def load_reward(spec: str) -> Callable:
    """--reward pkg.module:function -> the function (a missing module or name is one line naming the flag); a
    directory -> the reward model trained there (train/dpo.py --loss reward's final/: reward_model.RewardModel)."""
    if Path(spec).is_dir():
        return RewardModel(spec)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--reward {spec!r}: expected pkg.module:function or a reward model's directory")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ValueError(f"--reward {spec}: cannot import {module} ({e})") from None
    except AttributeError:
        raise ValueError(f"--reward {spec}: {module} has no {name}") from None
    if not callable(fn):
        raise ValueError(f"--reward {spec}: {module}.{name} is not callable")
    return fn


def _prompt_of(record) -> EvalPrompt:
    """The prompt and reference of one held-out line (chat, preference pair or KTO shape)."""
    from .preference_data import _answer, _messages, to_pair

    if isinstance(record, dict) and "chosen" in record and "rejected" in record:
        _, prompt, chosen, _ = to_pair(record)
        rest = {k: v for k, v in record.items() if k not in ("prompt", "messages", "chosen", "rejected")}
        return EvalPrompt(prompt, chosen["content"], rest)
    if isinstance(record, dict) and "completion" in record:
        key = "prompt" if "prompt" in record else "messages"
        prompt = _messages(record.get(key), key)
        good = record.get("label", True) is True
        rest = {k: v for k, v in record.items() if k not in (key, "completion", "label")}
        return EvalPrompt(prompt, _answer(record["completion"], "completion")["content"] if good else None, rest)
    shape, msgs = to_messages(record)
    if shape == "text" or not isinstance(msgs, list):
        raise ValueError("a text line has no prompt to answer")
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        return EvalPrompt(msgs, None, {})
    rest = {k: v for k, v in record.items() if k not in ("messages", "conversations", "conversation")}
    return EvalPrompt(msgs[:last], msgs[last]["content"], rest)


def load_eval_prompts(path: str, n: int, flag: str = "--eval_data") -> list[EvalPrompt]:
    """The first n usable held-out lines as prompts (a line without a prompt to answer is skipped)."""
    path = check_data_file(path, flag)
    out, stats = [], DataStats(path=str(path))
    for lineno, record in jsonl_records(path, stats):
        try:
            p = _prompt_of(record)
        except (ValueError, KeyError, TypeError):
            continue
        if p.messages:
            p.line = lineno
            out.append(p)
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"--eval_generate: {flag} {path} has no line with a prompt to answer")
    return out


@dataclass
class GenerationEval:
    """What an eval by generation needs, built once per run."""

    cfg: GenerationEvalConfig
    prompts: list[EvalPrompt]
    tok: object
    reward: Optional[Callable] = None

    @classmethod
    def build(cls, cfg: GenerationEvalConfig, eval_data: Optional[str], tok) -> Optional["GenerationEval"]:
        if not cfg.n:
            return None
        if not eval_data:
            raise ValueError("--eval_generate answers held-out prompts: give --eval_data")
        if cfg.regex is not None:
            try:
                re.compile(cfg.regex)
            except re.error as e:
                raise ValueError(f"--eval_regex {cfg.regex!r}: not a valid regular expression ({e})") from None
        reward = load_reward(cfg.reward) if cfg.reward else None
        return cls(cfg, load_eval_prompts(eval_data, cfg.n), tok, reward)

    def score(self, p: EvalPrompt, answer: str) -> dict[str, float]:
        scores = {}
        if p.reference is not None:
            scores["exact"] = float(answer.strip() == p.reference.strip())
        if self.cfg.regex is not None:
            scores["regex"] = float(re.search(self.cfg.regex, answer) is not None)
        if self.reward is not None:
            prompt = p.messages[-1]["content"] if p.messages else ""
            scores["reward"] = float(self.reward(prompt=prompt, completion=answer, reference=p.reference, **p.fields))
        return scores

    @torch.no_grad()
    def run(self, root, model) -> list[dict]:
        """Greedy answers from the model as it is now, scored -> one record per prompt (a collective under FSDP)."""
        with generating(root, model):
            ids = [self.tok.encode_dialog(p.messages) for p in self.prompts]
            new = generate(model, ids, self.cfg.max_new_tokens, stop_ids=self.tok.stop_ids)
        samples = []
        for p, tokens in zip(self.prompts, new):
            answer = self.tok.decode(tokens)
            samples.append({"line": p.line, "prompt": p.messages, "completion": answer, "reference": p.reference,
                            "scores": self.score(p, answer)})
        return samples


@contextmanager
def generating(root, model):
    """Generation from the weights as they are mid-training: eval mode, the FSDP root's own parameters (embeddings,
    norm, output) gathered for the whole generation, and afterwards the KV cache dropped and training mode back."""
    was_training = root.training
    root.eval()
    unshard = getattr(root, "unshard", None)
    if unshard is not None:
        unshard()
    try:
        yield
    finally:
        model.clear_cache()
        if unshard is not None:
            root.reshard()
        root.train(was_training)


def summarize_samples(samples: list[dict]) -> dict[str, float]:
    """gen/<score>: each score's mean over the samples that have it."""
    names = sorted({k for s in samples for k in s["scores"]})
    out = {}
    for k in names:
        values = [s["scores"][k] for s in samples if k in s["scores"]]
        out[f"gen/{k}"] = sum(values) / len(values)
    return out


def write_samples(out: Path, step: int, samples: list[dict]) -> Path:
    """OUT/samples/step_N.jsonl, atomically."""
    path = Path(out) / SAMPLES_DIR / f"step_{step}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
