"""GRPO (Shao et al. 2024, DeepSeekMath), the recipe train/grpo.py plugs into the trainer.

Each step, in `count` (before any forward with gradients): every prompt of this rank's rows gets G completions
sampled from the current policy by minillama's generate() in this process (LoRA adapters live, nothing merged),
each is scored by the reward functions, and the group-normalised advantages are (TRL's GRPOTrainer,
scale_rewards="group"):

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)          std unbiased, over the G completions of a prompt

The loss on completion token t of completion i (TRL's _compute_loss, token-level importance sampling):

    ratio = exp(logp - logp_old),  kl = exp(ref - logp) - (ref - logp) - 1     (k3 estimator)
    l_it  = -min(ratio A_i, clip(ratio, 1 - eps, 1 + eps_high) A_i) + beta kl
    "dapo" (TRL's default): sum over every completion token of the global batch / their number
    "grpo": each completion's mean over its tokens, then the mean over the global batch's completions

logp_old is the policy that sampled (one optimizer step per rollout, so logp_old = logp.detach(): ratio 1, and the
clip fraction is 0, as in TRL with num_iterations=1). The reference: with LoRA the same model with its adapters
switched off; with full fine-tuning a frozen copy of the starting weights. Both normalisers are counted over all
ranks before the first forward, so the loss does not depend on the number of processes or micro-batches.
Shape letters: N completions, T completion tokens (padded), L prompt + completion tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn as nn

from ..inference.engine import EngineConfig
from ..inference.generate import generate
from ..inference.sampling import SamplingParams
from ..lora.layers import reference_policy
from .data import IGNORE
from .generation_eval import generating
from .loss import chunked_token_logprobs
from .rewards import Rewards
from .trainer import Forward

LOSS_TYPES = ("dapo", "grpo")


@dataclass(frozen=True)
class GRPOConfig:
    num_generations: int = 4  # G completions per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.04  # KL weight (TRL's default today is 0.0; the paper's 0.04)
    epsilon: float = 0.2  # lower clip
    epsilon_high: Optional[float] = None  # upper clip (DAPO's clip-higher); None: epsilon
    loss_type: str = "dapo"
    scale_rewards: bool = True  # divide by the group's std (TRL's "group"); False: TRL's "none"
    seed: int = 0


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """(N,) rewards, N = prompts x group in prompt-major order -> (N,) advantages, each relative to its group."""
    grouped = rewards.view(-1, group)  # (P, G)
    mean = grouped.mean(dim=1).repeat_interleave(group)
    adv = rewards - mean
    if scale:
        std = grouped.std(dim=1).repeat_interleave(group) if group > 1 else torch.zeros_like(rewards)
        adv = adv / (std + 1e-4)
    return adv


@dataclass
class LossTerms:
    """Per-token pieces of the GRPO loss (each (N, T), zero off the mask)."""

    loss: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: Optional[torch.Tensor],
                    advantages: torch.Tensor, mask: torch.Tensor, cfg: GRPOConfig) -> LossTerms:
    """The clipped policy-gradient loss plus beta x k3 KL per completion token. logps etc. (N, T), advantages (N,)"""
    adv = advantages.unsqueeze(1)  # (N, 1)
    ratio = torch.exp(logps - old_logps)
    eps_low, eps_high = cfg.epsilon, cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    kl = torch.zeros_like(logps)
    if cfg.beta != 0.0 and ref_logps is not None:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        loss = loss + cfg.beta * kl
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    m = mask.to(logps.dtype)
    return LossTerms(loss=loss * m, kl=kl * m, clipped=clipped.to(logps.dtype) * m)


def reduce_loss(terms: LossTerms, mask: torch.Tensor, loss_type: str, counts: dict) -> torch.Tensor:
    """This micro-batch's share of the global batch's loss (counts: the global completions and their tokens)."""
    if loss_type == "grpo":
        per_completion = terms.loss.sum(-1) / mask.sum(-1).clamp(min=1)  # (N,)
        return per_completion.sum() / max(counts["completions"], 1.0)
    return terms.loss.sum() / max(counts["completion_tokens"], 1.0)


class TokenLogprobs(nn.Module):
    """The model as the FSDP root for GRPO: log p(target) at every position, 0 where the target is IGNORE."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model(tokens, return_hidden=True)  # (B, L, D)
        logps, keep = chunked_token_logprobs(hidden, self.model.output, targets, self.chunk_size)  # (n,), (n,)
        keep = keep.clamp(min=0)  # nothing to learn: logps is 0 x one position
        out = torch.zeros(targets.shape, dtype=logps.dtype, device=logps.device)  # (B, L); not a view (FSDP)
        return out.index_put((keep // targets.shape[1], keep % targets.shape[1]), logps, accumulate=True)


@dataclass
class Prompt:
    """One training prompt: the dialog, its token ids (chat format applied), and what the rewards are given."""

    messages: list[dict]
    ids: list[int]
    reference: Optional[str] = None
    fields: dict = field(default_factory=dict)
    line: int = 0  # in its file

    @property
    def text(self) -> str:
        """What a reward sees as the prompt: the last message's content."""
        return self.messages[-1]["content"] if self.messages else ""


@dataclass
class Rollout:
    """This rank's completions of one step, ready for the loss (every tensor on the device)."""

    tokens: torch.Tensor  # (N, L-1) prompt + completion, right-padded, inputs
    targets: torch.Tensor  # (N, L-1) the next token at completion positions, IGNORE elsewhere
    positions: torch.Tensor  # (N, T) where completion token t of row i is predicted in targets
    mask: torch.Tensor  # (N, T) 1 on real completion tokens
    advantages: torch.Tensor  # (N,)
    ref_logps: Optional[torch.Tensor]  # (N, T) the reference's log-probs, or None when beta = 0
    row_lens: torch.Tensor  # (N,) real tokens of each row (prompt + completion)
    texts: list[str]  # the decoded completions
    rewards: list[float]  # the weighted total per completion
    group: int


def completion_tokens(out: list[int], max_new_tokens: int, stop_ids: list[int], cut: bool) -> list[int]:
    """A sampled completion as the policy produced it: through its stop token when it stopped (generate() drops it;
    under several processes generation runs without stops and cut=True cuts at the first here)."""
    if cut:
        for j, t in enumerate(out):
            if t in stop_ids:
                return out[:j + 1]
        return out
    if len(out) < max_new_tokens and stop_ids:
        return out + [stop_ids[0]]
    return out


def rollout_rows(prompts: list[Prompt], completions: list[list[int]], group: int, pad_id: int):
    """Prompt + completion rows for one forward -> tokens, targets (N, L-1), positions, mask (N, T)."""
    rows = [prompts[i // group].ids + c for i, c in enumerate(completions)]
    width = max(len(r) for r in rows)
    t_max = max(1, max(len(c) for c in completions))
    n = len(rows)
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    targets = torch.full((n, width), IGNORE, dtype=torch.long)
    positions = torch.zeros((n, t_max), dtype=torch.long)
    mask = torch.zeros((n, t_max))
    for i, (r, c) in enumerate(zip(rows, completions)):
        start = len(prompts[i // group].ids)
        tokens[i, :len(r)] = torch.tensor(r)
        targets[i, start - 1:len(r) - 1] = torch.tensor(c, dtype=torch.long) if c else targets[i, :0]
        positions[i, :len(c)] = torch.arange(start - 1, start - 1 + len(c))
        mask[i, :len(c)] = 1.0
    return tokens[:, :-1], targets[:, :-1], positions, mask


@dataclass
class GRPO:
    """What train/grpo.py plugs into the trainer (see trainer.Recipe)."""

    prompts: list[Prompt]
    rewards: Rewards
    cfg: GRPOConfig
    model: nn.Module  # the Transformer inside the root (generation runs on it)
    tok: object
    split: object  # BatchSplit over prompts
    device: torch.device
    pad_id: int
    world_size: int = 1
    rank: int = 0
    ref_root: Optional[nn.Module] = None  # full fine-tuning: TokenLogprobs around a frozen copy of the start
    state: Optional[object] = None  # the run's TrainState (the step seeds the rollouts), set after start_run
    has_eval: bool = False
    aux_coef: float = 0.0
    batch: Optional[Rollout] = None
    samples: list = field(default_factory=list)  # the last step's scored completions (rank 0 may write them)

    @torch.no_grad()
    def first_forward(self, root) -> None:
        """One token through the root: FSDP initialises itself on the root's first forward, and generation (which
        calls the inner model) must come after it."""
        tokens = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        root(tokens, torch.full_like(tokens, IGNORE))

    def step_seed(self) -> int:
        """The sampling seed of the coming step on this rank: a resumed run draws what the uninterrupted one did."""
        step = self.state.step + 1 if self.state is not None else 1
        return (self.cfg.seed * 1_000_003 + step * 1009 + self.rank) % (2**63)

    @torch.no_grad()
    def sample(self, root, prompts: list[Prompt]) -> list[list[int]]:
        """G completions per prompt from the policy as it is now (a collective under FSDP: see train/grpo.py)."""
        g, cfg = self.cfg.num_generations, self.cfg
        ids = [p.ids for p in prompts for _ in range(g)]
        lockstep = self.world_size > 1  # FSDP ranks must run the same forwards: one prefill, max_new_tokens steps
        engine = EngineConfig(seed=self.step_seed(), prefill_chunk=max(512, sum(len(x) for x in ids)),
                              prefill_rows=max(16, len(ids))) if lockstep else EngineConfig(seed=self.step_seed())
        with generating(root, self.model):
            new = generate(self.model, ids, cfg.max_new_tokens, SamplingParams(cfg.temperature, cfg.top_p),
                           stop_ids=() if lockstep else self.tok.stop_ids, config=engine)
        return [completion_tokens(o, cfg.max_new_tokens, list(self.tok.stop_ids), lockstep) for o in new]

    def score(self, prompts: list[Prompt], completions: list[list[int]]) -> tuple[list[str], torch.Tensor]:
        """Decoded completions and each reward function's score -> texts, (N, K) scores."""
        stops, size = set(self.tok.stop_ids), self.tok.vocab_size  # ids past the tokenizer (a padded vocab): no text
        texts = [self.tok.decode([t for t in c if t not in stops and t < size]) for c in completions]
        g = self.cfg.num_generations
        scores = self.rewards.scores_many([(prompts[i // g].text, t, prompts[i // g].reference, prompts[i // g].fields)
                                           for i, t in enumerate(texts)])
        return texts, torch.tensor(scores, dtype=torch.float32).view(len(texts), len(self.rewards.fns))

    @torch.no_grad()
    def reference_logps(self, root, tokens, targets, positions) -> torch.Tensor:
        """The reference's log-probs of the completion tokens (LoRA: the starting adapter, or adapters off; full: the
        frozen copy)."""
        if self.ref_root is not None:
            full = self.ref_root(tokens, targets)
        else:
            with reference_policy(self.model):
                full = root(tokens, targets)
        return full.gather(1, positions)  # (N, T)

    def count(self, root, rows: list) -> dict[str, float]:
        """The step's rollouts (sampled, scored, advantages, reference log-probs) and the global normalisers."""
        prompts = [self.prompts[i] for r in rows for i in r]
        g = self.cfg.num_generations
        completions = self.sample(root, prompts)
        texts, scores = self.score(prompts, completions)
        weights = torch.tensor(self.rewards.weights, dtype=torch.float32)
        total = (scores * weights).sum(dim=1)  # (N,)
        adv = group_advantages(total, g, self.cfg.scale_rewards)
        rows = rollout_rows(prompts, completions, g, self.pad_id)
        tokens, targets, positions, mask = (t.to(self.device) for t in rows)
        ref = self.reference_logps(root, tokens, targets, positions) if self.cfg.beta != 0.0 else None
        row_lens = torch.tensor([len(prompts[i // g].ids) + len(c) for i, c in enumerate(completions)])
        self.batch = Rollout(tokens=tokens, targets=targets, positions=positions, mask=mask,
                             advantages=adv.to(self.device), ref_logps=ref, row_lens=row_lens, texts=texts,
                             rewards=total.tolist(), group=g)
        self.samples = [{"prompt": prompts[i // g].text, "completion": t, "reward": r,
                         "scores": dict(zip(self.rewards.names, s))}
                        for i, (t, r, s) in enumerate(zip(texts, total.tolist(), scores.tolist()))]
        lengths = mask.sum(-1)
        counts = {"completions": float(len(texts)), "completion_tokens": float(mask.sum()),
                  "reward_sum": float(total.sum()), "reward_sq_sum": float((total ** 2).sum()),
                  "group_std_sum": float(total.view(-1, g).std(dim=1).nan_to_num().sum())
                  if g > 1 else 0.0, "terminated": float(sum(1 for c in completions if c and c[-1] in
                                                             set(self.tok.stop_ids)))}
        counts["length_sum"] = float(lengths.sum())
        for k, name in enumerate(self.rewards.names):
            counts[f"reward_sum/{name.rpartition(':')[2]}"] = float(scores[:, k].sum())
        return counts

    def micro_batches(self, rows: list) -> Iterator[slice]:
        """Slices of this rank's completions: micro_batch_size prompts' G completions each."""
        n_prompts = sum(len(r) for r in rows)
        per = self.split.micro_batch_size * self.cfg.num_generations
        for start in range(0, n_prompts * self.cfg.num_generations, per):
            yield slice(start, start + per)

    def forward(self, root, mb: slice, counts: dict[str, float]) -> Forward:
        b = self.batch
        full = root(b.tokens[mb], b.targets[mb])  # (n, L-1)
        logps = full.gather(1, b.positions[mb])  # (n, T)
        mask = b.mask[mb]
        ref = b.ref_logps[mb] if b.ref_logps is not None else None
        terms = grpo_token_loss(logps, logps.detach(), ref, b.advantages[mb], mask, self.cfg)
        loss = reduce_loss(terms, mask, self.cfg.loss_type, counts)
        lens = b.row_lens[mb].double() - 1  # the inputs: every token but the last
        sums = {"loss": loss.detach().item(), "kl_sum": float(terms.kl.detach().sum()),
                "clipped_sum": float(terms.clipped.detach().sum()), "tokens": int(lens.sum()),
                "padded": b.tokens[mb].numel(), "doc_len_sq": float((lens ** 2).sum())}
        return Forward(loss=loss, sums=sums)

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        n, tokens = max(counts["completions"], 1.0), max(counts["completion_tokens"], 1.0)
        mean = counts["reward_sum"] / n
        var = (counts["reward_sq_sum"] - n * mean * mean) / (n - 1) if n > 1 else 0.0
        out = {"loss": sums["loss"], "reward": mean, "reward_std": math.sqrt(max(var, 0.0)),
               "kl": sums["kl_sum"] / tokens, "clip_ratio": sums["clipped_sum"] / tokens,
               "completion_length": counts["length_sum"] / n, "terminated": counts["terminated"] / n,
               "reward_group_std": counts["group_std_sum"] / (n / self.cfg.num_generations)}
        for k, v in counts.items():
            if k.startswith("reward_sum/"):
                out[f"rewards/{k.removeprefix('reward_sum/')}"] = v / n
        return out

    def evaluate(self, root) -> dict[str, float]:
        return {}


def prompt_of(record) -> tuple[list[dict], Optional[str], dict]:
    """One JSONL line -> (prompt messages, reference answer or None, the fields the rewards are given)."""
    from .generation_eval import _prompt_of

    if isinstance(record, dict) and "prompt" in record and not {"chosen", "completion"} & set(record):
        prompt = record["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) and "content" in m
                                                                  for m in messages)):
            raise ValueError('"prompt" must be a string or a list of {"role", "content"} messages')
        rest = {k: v for k, v in record.items() if k not in ("prompt", "reference")}
        return messages, record.get("reference"), rest
    p = _prompt_of(record)
    return p.messages, p.reference, p.fields


def load_prompts(path: str, tok, seq_len: int, drop_long: bool, flag: str) -> tuple[list[Prompt], object]:
    """A JSONL of prompts -> Prompts (chat format applied) and the file's stats. A line is {"prompt": text or
    messages, ...} (its other fields go to the rewards: "answer", "headings", ...), a chat record (the turns before
    its last assistant message are the prompt, that message the reference), or a preference pair / KTO line (its
    prompt). Prompts longer than seq_len tokens are dropped."""
    from .data import DataStats, check_data_file, jsonl_records

    path = check_data_file(path, flag)
    stats = DataStats(path=str(path))
    out = []
    for lineno, record in jsonl_records(path, stats):
        try:
            messages, reference, fields = prompt_of(record)
        except (ValueError, KeyError, TypeError) as e:
            stats.bad.append((lineno, str(e) or "no prompt"))
            continue
        ids = tok.encode_dialog(messages)
        if len(ids) > seq_len:
            stats.dropped_long += 1
            continue
        out.append(Prompt(messages=messages, ids=ids, reference=reference, fields=fields, line=lineno))
        stats.shapes["prompt"] = stats.shapes.get("prompt", 0) + 1
        stats.samples += 1
        stats.tokens += len(ids)
    if not out:
        raise ValueError(f"{flag} {path}: no usable prompt of at most --seq_len {seq_len} tokens")
    return out, stats
