"""The SFT recipe's part of a step: rows of tokenized samples become micro-batches (padded or packed, optionally split
over a context-parallel group), the loss is the mean next-token cross-entropy over every learned token of the global
batch (plus Mixtral's router loss), and the eval loss is the same mean over the held-out set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from .context_parallel import ContextGroup, shard_batch
from .data import Sample
from .metrics import SavedActivations
from .packing import MicroBatch, collate, plan_epoch
from .schedule import BatchSplit
from .trainer import Forward


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
class SFT:
    """Supervised fine-tuning: what train/sft.py plugs into the trainer (see trainer.Recipe)."""

    samples: list[Sample]
    eval_samples: Optional[list[Sample]]
    split: BatchSplit
    feed: Feed
    pack: bool
    seq_len: int
    aux_coef: float = 0.0  # Mixtral's router loss weight
    measure: bool = True  # the next forward measures its activation memory (a process's first micro-batch)

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_samples)

    def count(self, root, rows: list) -> dict[str, float]:
        return {"targets": sum(self.samples[i].n_targets() for r in rows for i in r)}

    def micro_batches(self, rows: list) -> Iterator[MicroBatch]:
        micro = self.split.micro_batch_size
        for m in range(0, len(rows), micro):
            yield collate(self.samples, rows[m:m + micro], self.feed.pad_id, self.pack)

    def _targets(self, counts: dict) -> float:
        return max(counts["targets"] / self.feed.copies, 1.0)  # every rank of a context group counted the same rows

    def forward(self, root, mb: MicroBatch, counts: dict[str, float]) -> Forward:
        saved = SavedActivations(enabled=self.measure)
        self.measure = False
        with saved:
            ce_sum, aux = root(**self.feed.inputs(mb))
        aux_scale = 1.0 / (self.split.accumulation * self.split.world_size)
        loss = ce_sum / self._targets(counts) + self.aux_coef * aux * aux_scale
        mine = self.feed.counts_rows
        sums = {"ce_sum": ce_sum.item(), "aux_loss": aux.item(), "tokens": mb.n_real if mine else 0,
                "padded": mb.tokens.numel() if mine else 0,
                "doc_len_sq": sum(n * n for n in mb.doc_lengths) if mine else 0}
        return Forward(loss=loss, sums=sums, peaks={"activation_bytes": saved.bytes} if saved.enabled else {})

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        micro_steps = self.split.accumulation * self.split.world_size * self.feed.copies
        return {"loss": sums["ce_sum"] / self._targets(counts), "aux_loss": sums["aux_loss"] / micro_steps}

    @torch.no_grad()
    def evaluate(self, root) -> dict[str, float]:
        """Mean token loss over the whole eval set (every rank takes its share of each batch)."""
        root.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.feed.device)
        samples = self.eval_samples
        for batch in plan_epoch([len(s.ids) for s in samples], self.split.batch_size, self.seq_len, self.pack, 0, 0):
            for mb in self._eval_micro_batches(self.split.rank_rows(batch, self.feed.dp_rank)):
                inputs = self.feed.inputs(mb)
                ce_sum, _ = root(**inputs)
                total[0] += ce_sum.double()
                total[1] += int((inputs["targets"] != -100).sum())  # this rank's own targets (a shard's, under CP)
        dist.all_reduce(total)
        root.train()
        return {"loss": (total[0] / total[1].clamp(min=1)).item()}

    def _eval_micro_batches(self, rows: list) -> Iterator[MicroBatch]:
        micro = self.split.micro_batch_size
        for m in range(0, len(rows), micro):
            yield collate(self.eval_samples, rows[m:m + micro], self.feed.pad_id, self.pack)
