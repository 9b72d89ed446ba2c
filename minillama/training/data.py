"""SFT data: JSONL in the common shapes -> token ids + loss mask, with a length rule that keeps the answer.

Accepted line shapes (one JSON object per line; the first matching key wins):
  chat     {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  sharegpt {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
  xtuner   {"conversation": [{"system": str (optional), "input": str, "output": str}, ...]}
  alpaca   {"instruction": str, "input": str (optional), "output": str, "system": str (optional)}
  text     {"text": str}   (continued pre-training: every token is learned)
Chat-like shapes are encoded with the checkpoint's chat format (tok.encode_dialog_with_mask): only assistant tokens
(and their end-of-turn token) are learned. Bad lines are skipped and reported with their line numbers.

Length rule for a sample longer than seq_len tokens (unless drop_long, which drops it instead):
  - chat-like: cut the middle of the prompt (the tokens before the first learned token), keeping its first and
    last halves (BOS/system prompt at the start, the question's end and the assistant header at the end), so every
    answer token survives. If the answers alone do not fit, the sample's end is cut instead ("answer cut").
  - text: split into consecutive pieces of seq_len tokens, each a sample of its own.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..util.files import require_file

IGNORE = -100  # target value that contributes no loss


@dataclass
class Sample:
    """One training sequence: model input ids and, per position, whether the token is learned."""

    ids: list[int]
    mask: list[bool]  # mask[i] True: ids[i] is a target (predicted from ids[:i])
    line: int  # 1-based line in the JSONL file, for messages

    def targets(self) -> list[int]:
        """Next-token targets aligned with ids: targets[i] = ids[i+1] if learned, else IGNORE; last is IGNORE."""
        return [t if m else IGNORE for t, m in zip(self.ids[1:], self.mask[1:])] + [IGNORE]

    def n_targets(self) -> int:
        return sum(self.mask[1:])


@dataclass
class DataStats:
    """What happened to each line of a data file; printed by the trainer."""

    path: str = ""
    lines: int = 0
    shapes: dict = field(default_factory=dict)  # shape name -> count
    bad: list = field(default_factory=list)  # (line, reason)
    prompt_cut: int = 0  # samples whose prompt middle was cut to fit
    answer_cut: int = 0  # samples whose end (answer included) was cut to fit
    split: int = 0  # text samples split into several pieces
    dropped_long: int = 0  # samples dropped by drop_long
    no_target: int = 0  # samples with nothing to learn (skipped)
    samples: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def summary(self) -> str:
        shapes = ", ".join(f"{k} {v}" for k, v in sorted(self.shapes.items())) or "none"
        return (f"{self.path}: {self.lines} lines ({shapes}); {len(self.bad)} bad lines skipped; "
                f"{self.samples} samples, {self.tokens} tokens, {self.target_tokens} learned; too long: "
                f"{self.prompt_cut} prompt-middle cut, {self.answer_cut} answer cut, {self.split} text split, "
                f"{self.dropped_long} dropped; {self.no_target} with nothing to learn skipped")


def _need_str(obj: dict, key: str, where: str, optional: bool = False) -> str:
    value = obj.get(key, "" if optional else None)
    if not isinstance(value, str):
        raise ValueError(f"{where}'{key}' must be a string, got {type(value).__name__}")
    return value


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def to_messages(record) -> tuple[str, object]:
    """(shape, messages list) for chat-like records, or ("text", str). Raises ValueError naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{'role': str, 'content': str}}")
        return "chat", [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise ValueError("'conversations' must be a non-empty list")
        msgs = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES:
                raise ValueError(f"conversations[{i}]['from'] must be one of {', '.join(SHAREGPT_ROLES)}")
            msgs.append({"role": SHAREGPT_ROLES[t["from"]], "content": _need_str(t, "value", f"conversations[{i}]")})
        return "sharegpt", msgs
    if "conversation" in record:
        turns = record["conversation"]
        if not isinstance(turns, list) or not turns:
            raise ValueError("'conversation' must be a non-empty list")
        msgs = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise ValueError(f"conversation[{i}] must be an object with 'input' and 'output'")
            system = _need_str(t, "system", f"conversation[{i}]", optional=True)
            if system:
                msgs.append({"role": "system", "content": system})
            msgs.append({"role": "user", "content": _need_str(t, "input", f"conversation[{i}]")})
            msgs.append({"role": "assistant", "content": _need_str(t, "output", f"conversation[{i}]")})
        return "xtuner", msgs
    if "instruction" in record or "output" in record:
        instruction = _need_str(record, "instruction", "")
        extra = _need_str(record, "input", "", optional=True)
        output = _need_str(record, "output", "")
        system = _need_str(record, "system", "", optional=True)
        msgs = [{"role": "system", "content": system}] if system else []
        msgs.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction})
        msgs.append({"role": "assistant", "content": output})
        return "alpaca", msgs
    if "text" in record:
        return "text", _need_str(record, "text", "")
    raise ValueError(f"unknown record shape with keys {sorted(record)[:8]}; expected 'messages', 'conversations', "
                     f"'conversation', 'instruction'/'output' or 'text'")


def fit_to_length(ids: list[int], mask: list[bool], seq_len: int) -> tuple[list[int], list[bool], str]:
    """Apply the length rule (module docstring) to a chat sample -> (ids, mask, "ok"|"prompt_cut"|"answer_cut")."""
    n = len(ids)
    if n <= seq_len:
        return ids, mask, "ok"
    prompt = mask.index(True) if True in mask else n
    # the first learned token is predicted from the token before it, so that one must stay in the prompt part
    keep = prompt - (n - seq_len)
    if keep >= 2:
        head = keep // 2
        tail = keep - head
        cut = slice(head, prompt - tail)
        return ids[:cut.start] + ids[cut.stop:], mask[:cut.start] + mask[cut.stop:], "prompt_cut"
    return ids[:seq_len], mask[:seq_len], "answer_cut"


def tokenize_record(tok, shape: str, content, seq_len: int) -> list[tuple[list[int], list[bool], str]]:
    """One record -> list of (ids, mask, how) after the length rule (text can give several pieces)."""
    if shape == "text":
        ids = tok.encode(content, bos=True, eos=True)
        mask = [True] * len(ids)
        if len(ids) <= seq_len:
            return [(ids, mask, "ok")]
        return [(ids[i:i + seq_len], mask[i:i + seq_len], "split") for i in range(0, len(ids), seq_len)]
    ids, mask = tok.encode_dialog_with_mask(content)
    return [fit_to_length(list(ids), [bool(m) for m in mask], seq_len)]


def check_data_file(path, flag: str = "--data") -> Path:
    """The file a data flag names: it must exist, be a file and not be empty (checked before the model loads)."""
    return require_file(path, flag, nonempty=True)


def jsonl_records(path: Path, stats: DataStats):
    """(line number, parsed JSON) of each non-blank line; a line that is not UTF-8 or not JSON is counted in
    stats.bad with its reason and skipped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.lines += 1
                stats.bad.append((lineno, "not valid UTF-8"))
                continue
            if not line.strip():
                continue
            stats.lines += 1
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                stats.bad.append((lineno, f"not valid JSON ({e.msg} at column {e.colno})"))
            except RecursionError:
                stats.bad.append((lineno, "JSON nested too deeply to read"))



def nothing_usable(flag: str, path, stats: DataStats, what: str) -> ValueError:
    """The error for a data file none of whose lines could be used: what was wanted, the first bad lines' reasons."""
    reasons = "; ".join(f"line {n}: {r}" for n, r in stats.bad[:5])
    return ValueError(f"{flag} {path}: no usable {what} in {stats.lines} lines" + (f" ({reasons})" if reasons else ""))

def load_jsonl(path, tok, seq_len: int, drop_long: bool = False, flag: str = "--data") -> tuple[list[Sample],
                                                                                                DataStats]:
    """Read and tokenize a JSONL file; bad lines (not UTF-8, not JSON, wrong shape) are skipped and listed in the
    stats (never trained on)."""
    path = check_data_file(path, flag)
    stats = DataStats(path=str(path))
    samples: list[Sample] = []
    for lineno, record in jsonl_records(path, stats):
        try:
            shape, content = to_messages(record)
            pieces = tokenize_record(tok, shape, content, seq_len)
        except (ValueError, KeyError, TypeError) as e:
            stats.bad.append((lineno, str(e)))
            continue
        stats.shapes[shape] = stats.shapes.get(shape, 0) + 1
        for ids, mask, how in pieces:
            if how != "ok" and drop_long:
                stats.dropped_long += 1
                break  # a long text is dropped whole, not piecewise
            if how == "prompt_cut":
                stats.prompt_cut += 1
            elif how == "answer_cut":
                stats.answer_cut += 1
            sample = Sample(ids, mask, lineno)
            if sample.n_targets() == 0:
                stats.no_target += 1
                continue
            samples.append(sample)
            stats.tokens += len(ids)
            stats.target_tokens += sample.n_targets()
        if shape == "text" and len(pieces) > 1 and not drop_long:
            stats.split += 1
    stats.samples = len(samples)
    if not samples:
        reasons = "; ".join(f"line {n}: {r}" for n, r in stats.bad[:3])
        why = f" ({reasons}{'; ...' if len(stats.bad) > 3 else ''})" if reasons else \
            f" ({stats.no_target} with nothing to learn, {stats.dropped_long} dropped as too long)"
        raise ValueError(f"{flag} {path}: no usable samples in {stats.lines} lines{why}")
    return samples, stats


def report_bad_lines(stats: DataStats, limit: int = 10, file=None) -> None:
    """Print the first `limit` bad lines as path:line: reason (to stderr by default)."""
    file = file or sys.stderr
    for lineno, reason in stats.bad[:limit]:
        print(f"{stats.path}:{lineno}: skipped: {reason}", file=file)
    if len(stats.bad) > limit:
        print(f"{stats.path}: ... and {len(stats.bad) - limit} more bad lines", file=file)
