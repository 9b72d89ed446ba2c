"""The pieces of a training loop that every recipe in train/ shares: the run's position (TrainState), the batch
schedule, one optimizer step over the global batch (train_step), the eval loss, and the per-step log line.

A step's loss is the mean over every learned token of the whole global batch (all ranks, all micro-batches), so it
does not depend on the number of processes or of accumulation steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from .context_parallel import ContextGroup, shard_batch
from .data import Sample
from .metrics import MetricsWriter, ProgressBar, SavedActivations, peak_memory_gb
from .optim import set_lr
from .packing import MicroBatch, collate, padded_tokens, plan_epoch
from ..perf import train_flops


@dataclass
class TrainState:
    """Where a run is: what a resumed run restores (with the weights, optimizer and RNG)."""

    step: int = 0
    epoch: int = 0
    batch_idx: int = 0  # next batch of the epoch's plan
    tokens_seen: int = 0

    def advance(self, tokens: int) -> None:
        """One optimizer step done over `tokens` real tokens."""
        self.step, self.batch_idx, self.tokens_seen = self.step + 1, self.batch_idx + 1, self.tokens_seen + tokens

    def to_json(self, world_size: int) -> dict:
        return {**asdict(self), "world_size": world_size}

    @classmethod
    def from_json(cls, d: dict) -> "TrainState":
        return cls(**{k: d[k] for k in ("step", "epoch", "batch_idx", "tokens_seen")})


@dataclass
class BatchSplit:
    """How a global batch of rows is split: over ranks, then into micro-batches (gradient accumulation)."""

    batch_size: int  # global rows
    world_size: int
    micro_batch_size: int  # rows per forward per rank

    @classmethod
    def make(cls, batch_size: int, world_size: int, micro_batch_size: int) -> "BatchSplit":
        if batch_size % world_size:
            raise ValueError(f"--batch_size {batch_size} must be a multiple of the {world_size} processes")
        per_rank = batch_size // world_size
        micro = micro_batch_size or per_rank
        if per_rank % micro:
            raise ValueError(f"--batch_size {batch_size} / {world_size} processes = {per_rank} rows per rank, "
                             f"not a multiple of --micro_batch_size {micro}")
        return cls(batch_size, world_size, micro)

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.world_size // self.micro_batch_size

    def rank_rows(self, batch: list, rank: int) -> list:
        """This rank's contiguous share of a global batch's rows."""
        per_rank = len(batch) // self.world_size
        return batch[rank * per_rank:(rank + 1) * per_rank]


@dataclass
class Schedule:
    """The batch plan of every epoch, built on demand from (seed, epoch) alone: the same on every rank."""

    lengths: list[int]
    batch_size: int
    seq_len: int
    pack: bool
    seed: int
    plans: dict = field(default_factory=dict)

    def plan(self, epoch: int) -> list:
        if epoch not in self.plans:
            self.plans[epoch] = plan_epoch(self.lengths, self.batch_size, self.seq_len, self.pack, self.seed, epoch)
            self.plans.pop(epoch - 2, None)  # keep the current and the previous epoch only
        return self.plans[epoch]

    def total_steps(self, max_steps: int, epochs: int) -> int:
        return max_steps or sum(len(plan_epoch(self.lengths, self.batch_size, self.seq_len, self.pack, self.seed, e))
                                for e in range(epochs))

    def next_batch(self, state: TrainState) -> list:
        """The global batch at the state's position, rolling over into the next epoch (state is advanced there)."""
        if state.batch_idx >= len(self.plan(state.epoch)):
            state.epoch, state.batch_idx = state.epoch + 1, 0
        return self.plan(state.epoch)[state.batch_idx]

    def nonpad_fraction(self, micro_batch_size: int) -> float:
        first = self.plan(0)
        return sum(self.lengths) / max(1, sum(padded_tokens(b, self.lengths, micro_batch_size) for b in first))


@dataclass
class Feed:
    """How micro-batches reach the model: this rank's rows on its device, or (context parallel) its shard of them."""

    device: torch.device
    pad_id: int
    dp_rank: int = 0  # which share of each global batch's rows this rank takes
    cp: Optional[ContextGroup] = None
    window: Optional[int] = None  # the model's sliding window, which context-parallel shards apply themselves

    def inputs(self, mb: MicroBatch) -> dict:
        """CausalLMLoss keyword arguments."""
        if self.cp is not None:
            return shard_batch(mb, self.cp, self.pad_id, self.device, self.window)
        doc_ids = mb.doc_ids.to(self.device) if mb.doc_ids is not None else None
        return dict(tokens=mb.tokens.to(self.device), targets=mb.targets.to(self.device), doc_ids=doc_ids,
                    real=mb.real.to(self.device))

    @property
    def copies(self) -> int:
        """How many ranks see each row (the context group size)."""
        return self.cp.size if self.cp is not None else 1

    @property
    def counts_rows(self) -> bool:
        """Whether this rank reports row statistics (tokens, padding): one rank per context group does."""
        return self.cp is None or self.cp.rank == 0


@dataclass
class StepResult:
    """One optimizer step, summed over all ranks."""

    loss: float  # mean token loss of the global batch
    grad_norm: float
    lr: float
    tokens: int  # real (non-pad) tokens
    padded: int  # tokens the model processed
    doc_len_sq: float  # sum of squared document lengths (attention FLOPs)
    aux_loss: float  # router load-balancing loss, averaged over micro-batches
    stop_requested: bool  # some rank got SIGTERM
    seconds: float
    activation_mb: Optional[float] = None  # saved-for-backward bytes of the first micro-batch, largest rank (measured)
    extra: dict = field(default_factory=dict)  # a recipe's own metrics (preference tuning: rewards, accuracies)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def _forward_backward(root, samples: list[Sample], rows, split: BatchSplit, feed: Feed, pack: bool,
                      global_count: float, aux_coef: float, measure: bool = False) -> list:
    """Forward + backward over this rank's micro-batches. Returns this rank's [sum of token losses, sum of aux
    losses, real tokens, padded tokens, sum of squared document lengths, activation bytes of the first micro-batch
    (when measure)]."""
    totals = [0.0, 0.0, 0, 0, 0, 0]
    aux_scale = 1.0 / (split.accumulation * split.world_size)
    micro = split.micro_batch_size
    for m in range(0, len(rows), micro):
        mb = collate(samples, rows[m:m + micro], feed.pad_id, pack)
        saved = SavedActivations(enabled=measure and m == 0)
        with saved:
            ce_sum, aux = root(**feed.inputs(mb))
        loss = ce_sum / global_count + aux_coef * aux * aux_scale
        loss.backward()
        totals[0] += ce_sum.item()
        totals[1] += aux.item()
        if feed.counts_rows:
            totals[2] += mb.n_real
            totals[3] += mb.tokens.numel()
            totals[4] += sum(n * n for n in mb.doc_lengths)
        totals[5] = max(totals[5], saved.bytes)
    return totals


def train_step(root, optimizer, trainable: list, samples: list[Sample], batch: list, split: BatchSplit, feed: Feed,
               lr: float, pack: bool, grad_clip: float, aux_coef: float, stop_requested: bool,
               measure: bool = False) -> StepResult:
    """Forward/backward over the global batch, clip, and (if loss and gradient norm are finite) one optimizer step.

    measure: also report the activation memory (bytes autograd saves) of the first micro-batch, largest rank."""
    t0 = time.perf_counter()
    device = feed.device
    rows = split.rank_rows(batch, feed.dp_rank)
    count = torch.tensor([sum(samples[i].n_targets() for r in rows for i in r)], dtype=torch.float64, device=device)
    dist.all_reduce(count)  # the loss is a mean over the global batch's learned tokens: count them first
    count /= feed.copies  # every rank of a context group counted the same rows
    set_lr(optimizer, lr)
    totals = _forward_backward(root, samples, rows, split, feed, pack, count.clamp(min=1).item(), aux_coef, measure)
    activation = torch.tensor([float(totals.pop())], device=device)
    if measure:
        dist.all_reduce(activation, op=dist.ReduceOp.MAX)
    # [loss sum, aux sum, real tokens, padded tokens, sum of doc_len^2, stop requested] over all ranks
    sums = torch.tensor(totals + [float(stop_requested)], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    grad_norm = clip_gradients(trainable, grad_clip)
    loss = sums[0].item() / max(count.item(), 1)
    result = StepResult(loss, grad_norm, lr, int(sums[2].item()), int(sums[3].item()), sums[4].item(),
                        sums[1].item() / (split.accumulation * split.world_size * feed.copies), sums[5].item() > 0,
                        0.0, activation.item() / 2**20 if measure else None)
    return finish_step(result, optimizer, device, t0)


def clip_gradients(trainable: list, grad_clip: float) -> float:
    """Clip the global gradient norm to grad_clip (<= 0: no clipping); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))
    return norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item()


def finish_step(result: StepResult, optimizer, device, t0: float) -> StepResult:
    """The optimizer step, only when loss and gradient norm are finite (a bad step leaves the weights as they
    were); the gradients freed; the step's time."""
    if result.finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def evaluate(root, samples: list[Sample], split: BatchSplit, seq_len: int, pack: bool, feed: Feed) -> float:
    """Mean token loss over the whole eval set (every rank takes its share of each batch)."""
    root.eval()
    total = torch.zeros(2, dtype=torch.float64, device=feed.device)
    micro = split.micro_batch_size
    for batch in plan_epoch([len(s.ids) for s in samples], split.batch_size, seq_len, pack, 0, 0):
        rows = split.rank_rows(batch, feed.dp_rank)
        for m in range(0, len(rows), micro):
            inputs = feed.inputs(collate(samples, rows[m:m + micro], feed.pad_id, pack))
            ce_sum, _ = root(**inputs)
            total[0] += ce_sum.double()
            total[1] += int((inputs["targets"] != -100).sum())  # this rank's own targets (a shard's, under CP)
    dist.all_reduce(total)
    root.train()
    return (total[0] / total[1].clamp(min=1)).item()


class StepLog:
    """Rank 0's view of the run: metrics.jsonl records, the progress bar, and one-off messages."""

    def __init__(self, metrics: MetricsWriter, bar: ProgressBar, model_args, device, world_size: int, lora: bool,
                 peak_tflops: Optional[float], moe: bool):
        self.metrics, self.bar = metrics, bar
        self.model_args, self.device, self.world_size, self.lora = model_args, device, world_size, lora
        self.peak, self.moe = peak_tflops, moe

    def step(self, step: int, epoch: int, r: StepResult) -> dict:
        record = {"step": step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm, "tokens": r.tokens,
                  "tokens_per_s": r.tokens / r.seconds, "nonpad_frac": r.tokens / max(r.padded, 1), "epoch": epoch,
                  "time_s": r.seconds, "peak_mem_gb": peak_memory_gb(self.device)}
        record.update(r.extra)
        if self.moe:
            record["aux_loss"] = r.aux_loss
        if r.activation_mb is not None:
            record["activation_mb"] = r.activation_mb
        if self.peak:
            flops = train_flops(self.model_args, r.tokens, r.doc_len_sq / max(r.tokens, 1), lora=self.lora)
            record["mfu"] = flops / r.seconds / (self.peak * 1e12 * self.world_size)
        self.metrics.write(record)
        fields = {"loss": f"{r.loss:.4f}", "lr": f"{r.lr:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}"}
        if "rewards/accuracies" in r.extra:
            fields["acc"] = f"{r.extra['rewards/accuracies']:.2f}"
            fields["margin"] = f"{r.extra['rewards/margins']:.3f}"
        if "mfu" in record:
            fields["mfu"] = f"{record['mfu']:.1%}"
        fields["mem"] = f"{record['peak_mem_gb']:.1f}G"
        self.bar.update(step, fields)
        return record

    def eval(self, step: int, loss: float, final: bool = False, extra: Optional[dict] = None) -> None:
        """An eval record; `extra` metrics are written with an eval_ prefix and shown after the loss."""
        extra = extra or {}
        self.metrics.write({"step": step, "eval_loss": loss, **{f"eval_{k}": v for k, v in extra.items()}})
        shown = "".join(f", {k} {v:.4f}" for k, v in extra.items() if k in ("rewards/accuracies", "pref_accuracy"))
        self.bar.message(f"eval loss {loss:.4f}{shown}" if final else f"step {step}: eval loss {loss:.4f}{shown}")

    def message(self, text: str) -> None:
        self.bar.message(text)

    def close(self) -> None:
        self.metrics.close()
