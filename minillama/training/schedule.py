"""Where a run is and what it trains on next: its position (TrainState), how a global batch of rows is split over
processes and micro-batches (BatchSplit), and the batch plan of every epoch (Schedule), the same on every rank."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .packing import padded_tokens, plan_epoch


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
