"""Preference pairs for DPO/ORPO: JSONL -> (chosen, rejected) token samples sharing their prompt, and doc-masked rows.

Accepted line shapes (one JSON object per line):
  {"prompt": str | [messages], "chosen": answer, "rejected": answer}    (TRL's standard / conversational shape)
  {"messages": [messages], "chosen": answer, "rejected": answer}        (the dialog before the answer)
  {"chosen": [messages], "rejected": [messages]}                       (Anthropic HH / UltraFeedback: the leading
                                                                        turns both share are the prompt)
An answer is a string, one {"role": "assistant", "content"} message, or a list holding one. A string prompt is one
user turn. Both sides are encoded with the checkpoint's chat format; only the answer's tokens (and its end-of-turn
token) are learned. A pair longer than seq_len loses the same number of prompt-middle tokens on both sides (the
answers are kept; data.fit_to_length), or is dropped with drop_long. Bad lines are skipped and reported.

Rows: each pair is two documents side by side in one row, chosen then rejected (doc_ids keep attention inside
each); with packing a row holds several whole pairs, so a rank always has both halves of its pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from .data import IGNORE, DataStats, Sample, check_data_file, fit_to_length, jsonl_records, nothing_usable
from .packing import Row, row_length


@dataclass
class Pair:
    """A prompt with a chosen and a rejected answer, each a whole training sample."""

    chosen: Sample
    rejected: Sample
    line: int

    def __len__(self) -> int:
        return len(self.chosen.ids) + len(self.rejected.ids)


def _messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{where}' must be a string or a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{i}] must be {{'role': str, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _answer(value, where: str) -> dict:
    """One assistant message from a string, a message or a list of one message."""
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    msgs = _messages([value] if isinstance(value, dict) else value, where)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise ValueError(f"'{where}' must be one assistant message (a string, a message or a list of one)")
    return msgs[0]


def to_pair(record) -> tuple[str, list[dict], dict, dict]:
    """(shape, prompt messages, chosen answer, rejected answer) of one line; ValueError says what is wrong (also an
    empty answer, or the same answer on both sides: such a pair teaches nothing, or only noise)."""
    shape, prompt, chosen, rejected = _to_pair(record)
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer["content"].strip():
            raise ValueError(f"the '{side}' answer is empty")
    if chosen["content"] == rejected["content"]:
        raise ValueError("'chosen' and 'rejected' are the same answer")
    return shape, prompt, chosen, rejected


def _to_pair(record) -> tuple[str, list[dict], dict, dict]:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "chosen" not in record or "rejected" not in record:
        raise ValueError(f"a preference pair needs 'chosen' and 'rejected' (keys here: {sorted(record)[:8]})")
    if "prompt" in record or "messages" in record:
        key = "prompt" if "prompt" in record else "messages"
        shape = "prompt" if isinstance(record[key], str) else "conversational"
        return shape, _messages(record[key], key), _answer(record["chosen"], "chosen"), \
            _answer(record["rejected"], "rejected")
    chosen, rejected = _messages(record["chosen"], "chosen"), _messages(record["rejected"], "rejected")
    p = 0
    while p < min(len(chosen), len(rejected)) and chosen[p] == rejected[p]:
        p += 1
    if p == 0:
        raise ValueError("'chosen' and 'rejected' share no leading turn to use as the prompt")
    if len(chosen) != p + 1 or len(rejected) != p + 1:
        raise ValueError("'chosen' and 'rejected' must differ in their last message only (one answer each)")
    return "chosen/rejected", chosen[:p], _answer(chosen[p:], "chosen"), _answer(rejected[p:], "rejected")


def encode_answer(tok, prompt: list[dict], answer: dict) -> tuple[list[int], list[bool]]:
    """prompt + answer in the chat format; only the answer's tokens are learned (the mask's last run)."""
    ids, mask = tok.encode_dialog_with_mask(prompt + [answer])
    mask = [bool(m) for m in mask]
    end = len(mask) - mask[::-1].index(True) if True in mask else 0
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return list(ids), [start <= i < end for i in range(len(ids))]


def tokenize_pair(tok, prompt, chosen, rejected, seq_len: int) -> tuple[tuple, tuple, str]:
    """Both sides encoded and fitted together into seq_len tokens -> ((ids, mask), (ids, mask), how)."""
    c, r = encode_answer(tok, prompt, chosen), encode_answer(tok, prompt, rejected)
    excess = len(c[0]) + len(r[0]) - seq_len
    if excess <= 0:
        return c, r, "ok"
    cut = (excess + 1) // 2  # the prompt is shared: cut the same number of its tokens from both sides
    c2, r2 = fit_to_length(*c, len(c[0]) - cut), fit_to_length(*r, len(r[0]) - cut)
    if len(c2[0]) + len(r2[0]) > seq_len:  # an odd excess left one token over: cut the longer side once more
        longer = c2 if len(c2[0]) >= len(r2[0]) else r2
        shorter = fit_to_length(longer[0], longer[1], len(longer[0]) - 1)
        c2, r2 = (shorter, r2) if longer is c2 else (c2, shorter)
    how = "answer_cut" if "answer_cut" in (c2[2], r2[2]) else "prompt_cut"
    return c2[:2], r2[:2], how


def load_pairs(path, tok, seq_len: int, drop_long: bool = False, flag: str = "--data") -> tuple[list[Pair],
                                                                                                 DataStats]:
    """Read and tokenize a preference JSONL; bad lines (not UTF-8, not JSON, wrong shape) are skipped and listed in
    the stats."""
    path = check_data_file(path, flag)
    stats, pairs = DataStats(path=str(path)), []
    for lineno, record in jsonl_records(path, stats):
        try:
            shape, prompt, chosen, rejected = to_pair(record)
            c, r, how = tokenize_pair(tok, prompt, chosen, rejected, seq_len)
        except (ValueError, KeyError, TypeError) as e:
            stats.bad.append((lineno, str(e)))
            continue
        stats.shapes[shape] = stats.shapes.get(shape, 0) + 1
        if how != "ok" and drop_long:
            stats.dropped_long += 1
            continue
        stats.prompt_cut += how == "prompt_cut"
        stats.answer_cut += how == "answer_cut"
        pair = Pair(Sample(*c, lineno), Sample(*r, lineno), lineno)
        if not pair.chosen.n_targets() or not pair.rejected.n_targets():
            stats.no_target += 1
            continue
        pairs.append(pair)
        stats.tokens += len(pair)
        stats.target_tokens += pair.chosen.n_targets() + pair.rejected.n_targets()
    stats.samples = len(pairs)
    if not pairs:
        raise nothing_usable(flag, path, stats, "preference pairs")
    return pairs, stats


@dataclass
class PairBatch:
    """One micro-batch of pair rows. Documents are numbered 2k (chosen) and 2k+1 (rejected) for its k-th pair."""

    tokens: torch.Tensor  # (B, L) long
    targets: torch.Tensor  # (B, L) long, IGNORE where nothing is learned
    doc_ids: torch.Tensor  # (B, L) long, documents within each row (padding is one more)
    doc_index: torch.Tensor  # (B, L) long: the micro-batch document each learned target belongs to, -1 elsewhere
    real: torch.Tensor  # (B, L) bool
    pair_ids: list[int]  # dataset index of each pair, in document order
    n_real: int
    doc_lengths: list[int]

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)


def collate_pairs(pairs: list[Pair], rows: list[Row], pad_id: int) -> PairBatch:
    """Right-pad rows of whole pairs to the longest row; every pair contributes its chosen then rejected doc."""
    lengths = [len(p) for p in pairs]
    L, B = max(row_length(r, lengths) for r in rows), len(rows)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    targets = torch.full((B, L), IGNORE, dtype=torch.long)
    doc_ids = torch.zeros((B, L), dtype=torch.long)
    doc_index = torch.full((B, L), -1, dtype=torch.long)
    real = torch.zeros((B, L), dtype=torch.bool)
    pair_ids, doc_lengths, n_real = [], [], 0
    for b, row in enumerate(rows):
        pos, d = 0, 0
        for i in row:
            for s in (pairs[i].chosen, pairs[i].rejected):
                n = len(s.ids)
                tokens[b, pos:pos + n] = torch.tensor(s.ids)
                t = torch.tensor(s.targets())
                targets[b, pos:pos + n] = t
                doc_index[b, pos:pos + n][t != IGNORE] = 2 * len(pair_ids) + (s is pairs[i].rejected)
                doc_ids[b, pos:pos + n] = d
                pos, d = pos + n, d + 1
                doc_lengths.append(n)
            pair_ids.append(i)
        doc_ids[b, pos:] = d
        real[b, :pos] = True
        n_real += pos
    return PairBatch(tokens, targets, doc_ids, doc_index, real, pair_ids, n_real, doc_lengths)


def pair_fingerprint(pairs: list[Pair]) -> list[int]:
    """What precomputed reference log-probs depend on: every pair's token count (checked on resume)."""
    return [len(p) for p in pairs]
