"""Batch plans and collation: packed rows of whole samples (with doc_ids) or length-grouped padded rows.

A plan is built for the whole global batch, identically on every rank, from (seed, epoch) alone, so the data
order does not depend on the number of processes and a resumed run can skip straight to its position.
Shape letters: B rows in a micro-batch, L padded row length.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import torch

from .data import IGNORE, Sample

Row = list[int]  # sample indices; [] is an empty filler row (one pad token, nothing learned)
PACK_WINDOW = 64  # first-fit looks at this many most recent open rows: near-optimal fill, O(n) time


def pack_rows(lengths: list[int], order: list[int], seq_len: int) -> list[Row]:
    """First-fit of samples (taken in `order`) into rows of at most seq_len tokens; every sample stays whole."""
    rows: list[Row] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise ValueError(f"sample {i} has {n} tokens > seq_len {seq_len}; apply the length rule first")
        lo = max(0, len(rows) - PACK_WINDOW)
        for r in range(lo, len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
    return rows


def length_grouped_batches(lengths: list[int], order: list[int], batch_size: int,
                           group_batches: int = 32) -> list[list[int]]:
    """Batches of sample indices; samples of similar length share a batch (less padding)."""
    group = batch_size * group_batches
    batches = []
    for g in range(0, len(order), group):
        chunk = sorted(order[g:g + group], key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return batches


def plan_epoch(lengths: list[int], batch_size: int, seq_len: int, pack: bool, seed: int, epoch: int) -> list[list[Row]]:
    """Global batches (each exactly batch_size rows; the last one filled with empty rows) for one epoch."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if pack:
        rows = pack_rows(lengths, order, seq_len)
        batches = [rows[b:b + batch_size] for b in range(0, len(rows), batch_size)]
    else:
        groups = length_grouped_batches(lengths, order, batch_size)
        rng.shuffle(groups)  # sorting inside groups must not make the batch order sorted too
        batches = [[[i] for i in g] for g in groups]
    for b in batches:
        b += [[] for _ in range(batch_size - len(b))]
    return batches


def row_length(row: Row, lengths: list[int]) -> int:
    return max(1, sum(lengths[i] for i in row))


def padded_tokens(batch: list[Row], lengths: list[int], micro_batch_size: int) -> int:
    """Tokens the model processes for a global batch when each micro-batch pads to its longest row."""
    total = 0
    for m in range(0, len(batch), micro_batch_size):
        micro = batch[m:m + micro_batch_size]
        total += len(micro) * max(row_length(r, lengths) for r in micro)
    return total


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # (B, L) long
    targets: torch.Tensor  # (B, L) long, IGNORE where nothing is learned
    doc_ids: Optional[torch.Tensor]  # (B, L) long for packed rows, else None (plain causal attention)
    real: torch.Tensor  # (B, L) bool, False on padding (kept out of the MoE router statistics)
    n_real: int  # non-pad tokens
    doc_lengths: list[int]  # every document's length, for the attention FLOP count


def collate(samples: list[Sample], rows: list[Row], pad_id: int, packed: bool) -> MicroBatch:
    """Right-pad rows to the longest one; packed rows get doc_ids (padding is a document of its own)."""
    lengths = [len(s.ids) for s in samples]
    L = max(row_length(r, lengths) for r in rows)
    B = len(rows)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    targets = torch.full((B, L), IGNORE, dtype=torch.long)
    doc_ids = torch.zeros((B, L), dtype=torch.long)
    real = torch.zeros((B, L), dtype=torch.bool)
    n_real, doc_lengths = 0, []
    for b, row in enumerate(rows):
        pos = 0
        for d, i in enumerate(row):
            s = samples[i]
            n = len(s.ids)
            tokens[b, pos:pos + n] = torch.tensor(s.ids)
            targets[b, pos:pos + n] = torch.tensor(s.targets())
            doc_ids[b, pos:pos + n] = d
            pos += n
            doc_lengths.append(n)
        doc_ids[b, pos:] = len(row)
        real[b, :pos] = True
        n_real += pos
    return MicroBatch(tokens, targets, doc_ids if packed else None, real, n_real, doc_lengths)
