"""The one training loop. A recipe (SFT in training/sft.py, DPO/ORPO/IPO/SimPO in training/preference.py, KTO in
training/kto.py) says how it counts, batches and scores rows; the loop around it is the same for every recipe, and a
recipe's main() shows each part of a step:

    for step in steps(run, recipe):                       # the next global batch; lr set; normalisers counted
        for mb in step.micro_batches():                   # this rank's rows, a micro-batch at a time
            out = recipe.forward(run.root, mb, step.counts)   # forward: this micro-batch's share of the loss
            out.loss.backward()                           # backward (gradients accumulate)
            step.add(out)
        grad_norm = clip_gradients(run.trainable, cfg.optim.grad_clip)
        result = step.result(grad_norm)                   # every rank's sums -> the step's metrics
        if not result.finite: ...                         # no optimizer step, exit 1
        run.optimizer.step(); run.optimizer.zero_grad(set_to_none=True)
        log_step(run, step, result)
        if eval_due(run): evaluate(run, recipe)          # held-out loss; --eval_generate: answers scored
        if save_due(run): save(run)                 # also where a SIGTERM is acted on
    return finish(run, recipe)

A step's loss is the mean over the whole global batch (all ranks, all micro-batches: SFT's learned tokens, a
preference recipe's pairs), so it does not depend on the number of processes or of accumulation steps: a recipe's
forward divides by the global counts that `count` gave and the loop summed over ranks before the first forward.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Protocol

import torch
import torch.distributed as dist

from .generation_eval import summarize_samples, write_samples
from .optim import lr_at, set_lr
from .session import Run, export, stopped

# what every recipe's forward reports in Forward.sums, beside its own metrics: the step log's throughput and MFU
ROW_STATS = ("tokens", "padded", "doc_len_sq")  # real tokens, tokens the model processed, sum of doc_len^2


@dataclass
class Forward:
    """A recipe's forward over one micro-batch."""

    loss: torch.Tensor  # this micro-batch's share of the global batch's objective (differentiable scalar)
    sums: dict[str, float]  # metric sums (summed over micro-batches and ranks; ROW_STATS among them)
    peaks: dict[str, float] = field(default_factory=dict)  # maxima over micro-batches and ranks


class Recipe(Protocol):
    """What a recipe plugs into the loop."""

    has_eval: bool  # whether evaluate() has held-out data

    def count(self, root, rows: list) -> dict[str, float]:
        """This rank's normalisers of its rows (learned tokens, pairs, KTO's KL sum from a pass without gradients);
        the loop sums them over ranks before the first forward."""

    def micro_batches(self, rows: list) -> Iterable:
        """This rank's rows as micro-batches."""

    def forward(self, root, mb, counts: dict[str, float]) -> Forward:
        """Forward over one micro-batch: its share of the loss (divided by the global counts) and metric sums."""

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        """The global sums of a step -> its metrics: "loss" first, "aux_loss" (router loss) if any, then its own."""

    def evaluate(self, root) -> dict[str, float]:
        """The held-out metrics ("loss" first), every rank taking its share."""


@dataclass
class StepResult:
    """One optimizer step, over all ranks."""

    loss: float  # the global batch's objective
    grad_norm: float  # before clipping
    lr: float
    tokens: int  # real (non-pad) tokens
    padded: int  # tokens the model processed
    doc_len_sq: float  # sum of squared document lengths (attention FLOPs)
    aux_loss: float = 0.0  # router load-balancing loss, averaged over micro-batches
    seconds: float = 0.0
    activation_mb: Optional[float] = None  # saved-for-backward bytes of the first micro-batch, largest rank
    extra: dict = field(default_factory=dict)  # the recipe's own metrics (preference tuning: rewards, accuracies)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def all_reduce_values(values: dict[str, float], device, op=dist.ReduceOp.SUM) -> dict[str, float]:
    """Named numbers summed (or op'd) over all ranks, in float64; every rank passes the same names."""
    names = sorted(values)
    t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return dict(zip(names, t.tolist()))


@dataclass
class Step:
    """One optimizer step in the making: this rank's rows of the global batch, the global counts, and what the
    micro-batches' forwards have added up so far."""

    run: Run
    recipe: Recipe
    lr: float
    rows: list  # this rank's rows of the global batch
    counts: dict[str, float]  # the global batch's normalisers, summed over ranks
    first: bool  # the first step this process takes (a resumed run's too)
    started: float = field(default_factory=time.perf_counter)
    sums: dict = field(default_factory=lambda: defaultdict(float))
    peaks: dict = field(default_factory=dict)

    def micro_batches(self) -> Iterable:
        return self.recipe.micro_batches(self.rows)

    def add(self, out: Forward) -> None:
        for k, v in out.sums.items():
            self.sums[k] += float(v)
        for k, v in out.peaks.items():
            self.peaks[k] = max(self.peaks.get(k, 0.0), float(v))

    def result(self, grad_norm: float) -> StepResult:
        """Every rank's sums -> the step's metrics (a collective)."""
        device = self.run.info.device
        sums = all_reduce_values(self.sums, device)
        peaks = all_reduce_values(self.peaks, device, dist.ReduceOp.MAX) if self.peaks else {}
        metrics = self.recipe.summarize(sums, self.counts)
        activation = peaks.get("activation_bytes")
        return StepResult(loss=metrics.pop("loss"), grad_norm=grad_norm, lr=self.lr, tokens=int(sums["tokens"]),
                          padded=int(sums["padded"]), doc_len_sq=sums["doc_len_sq"],
                          aux_loss=metrics.pop("aux_loss", 0.0),
                          activation_mb=activation / 2**20 if activation is not None else None, extra=metrics)


def steps(run: Run, recipe: Recipe) -> Iterator[Step]:
    """The run's remaining steps from its state, each the next global batch with its lr set and its normalisers
    counted over all ranks. Ends after the last step, or at the boundary where save_due saw a stop."""
    cfg, first = run.cfg, run.state.step + 1
    while run.state.step < run.total_steps and not run.stopping:
        batch = run.schedule.next_batch(run.state)
        lr = lr_at(run.state.step + 1, cfg.optim.lr, cfg.optim.warmup_steps, run.total_steps, cfg.optim.min_lr_ratio)
        set_lr(run.optimizer, lr)
        rows = run.split.rank_rows(batch, run.dp_rank)
        counts = all_reduce_values(recipe.count(run.root, rows), run.info.device)  # the mean's denominators
        yield Step(run=run, recipe=recipe, lr=lr, rows=rows, counts=counts, first=run.state.step + 1 == first)


def clip_gradients(trainable: list, grad_clip: float) -> float:
    """Clip the global gradient norm to grad_clip (<= 0: no clipping); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))
    return norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item()


def log_step(run: Run, step: Step, result: StepResult) -> None:
    """The step is done: the run's position advances and the step's record is written."""
    if run.info.device.type == "cuda":
        torch.cuda.synchronize()
    result.seconds = time.perf_counter() - step.started
    run.state.advance(result.tokens)
    run.steps_here += 1
    run.log.step(run.state.step, run.state.epoch, result)


def evaluate(run: Run, recipe: Recipe, final: bool = False) -> None:
    """The held-out metrics (recipe.evaluate) and, with --eval_generate, answers generated, scored and written."""
    step = run.state.step
    if recipe.has_eval:
        run.log.eval(step, recipe.evaluate(run.root), final=final)
    if run.generation is not None and run.steps_here == 0:
        # FSDP sets up its sharding state in the first forward through the root; generation calls the model
        # inside it, so it waits for a training step (a resumed run that has no step left to take skips it)
        run.log.message(f"step {step}: --eval_generate skipped: no training step taken by this process")
    elif run.generation is not None:
        samples = run.generation.run(run.root, run.model)
        scores = summarize_samples(samples)
        if run.info.is_rank0:
            path = write_samples(run.out, step, samples)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) or "no scores"
            run.log.record({"step": step, **scores}, f"step {step}: generated {len(samples)} answers ({path}): {shown}")


def eval_due(run: Run) -> bool:
    """Every --eval_every steps (the last step's eval comes in finish)."""
    step, every = run.state.step, run.cfg.eval_every
    return bool(every) and step % every == 0 and step < run.total_steps


def save_due(run: Run) -> bool:
    """At a step boundary: whether to save now. Every --save_every steps; and when stopping, which is read here, at
    the first boundary after a SIGTERM (run.stop.requested as it is now, agreed by all ranks) or --stop_at_step;
    a stop sets run.stopping, which ends steps()."""
    flag = torch.tensor([float(run.stop.requested)], device=run.info.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a signal any rank got stops them all at this same boundary
    step = run.state.step
    run.stopping = flag.item() > 0 or step == run.cfg.stop_at_step
    every = run.cfg.save_every
    return run.stopping or (bool(every) and step % every == 0 and step < run.total_steps)


def finish(run: Run, recipe: Recipe) -> int:
    """After the loop: a stopped run says how to continue; a finished one is evaluated and exported (the last
    checkpoint, final/, loss.png). Returns the exit code."""
    if run.stopping:
        return stopped(run)
    evaluate(run, recipe, final=True)
    export(run)
    return 0
