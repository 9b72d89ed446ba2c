"""Generate for every line of a JSONL file with continuous batching, resumable after a crash.

    python generate/batch.py --ckpt DIR --input prompts.jsonl --output answers.jsonl --batch_size 16
    torchrun --nproc_per_node 2 generate/batch.py --ckpt DIR --input in.jsonl --output out.jsonl

Input lines: "a prompt string", {"prompt": str}, {"messages": [{"role", "content"}, ...]} or xtuner-style
{"conversation": [{"system": ..., "input": ..., "output": ...}, ...]} (the last turn's output is what we write).
Strings and "prompt" are raw text completion unless --chat wraps them as one user turn. An "id" field is copied.
With several --adapter NAME=DIR, a line's "adapter" field picks one by name (null: the base model), as does an
OpenAI-style "model" field that names a loaded adapter; lines without either use the first --adapter.
Output: one line per non-blank input line, {"index", "id"?, "output", "prompt_tokens", "output_tokens", "stop_reason"},
written (and fsync'ed) as each prompt finishes, then sorted into input order when the run completes.
Continuous batching: --batch_size prompts are in flight; when one answer ends, its row takes the next prompt at
once, so long answers do not hold the others back. Greedy outputs equal generating each prompt alone; sampled
ones are reproducible for the same --seed, input and --batch_size.
"index" is the input's 0-based line number. A malformed input line is reported on stderr with its line number and
recorded as {"index", "line", "error"}; delete such lines from the output to retry them.
Rerunning with the same --output skips every index already there; a truncated last line (a crash mid-write)
is dropped and redone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a fresh checkout

from minillama.cli import (add_model_args, add_sampling_args, context_limit, generation_options,  # noqa: E402
                           load_from_args, positive_int, run, sampling_params)
from minillama.distributed import cleanup  # noqa: E402
from minillama.files import atomic_write  # noqa: E402
from minillama.generation import generate_continuous  # noqa: E402
from minillama.loading import broadcast_object  # noqa: E402
from minillama.lora import adapter_names, lora_modules, set_adapter  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampling_args(p, temperature=0.0, top_p=1.0, max_new_tokens=256)
    p.add_argument("--input", required=True, help="JSONL of prompts")
    p.add_argument("--output", required=True, help="JSONL of answers (appended to / resumed)")
    p.add_argument("--batch_size", "--max_batch_size", type=positive_int, default=8,
                   help="prompts decoded together (--max_batch_size: Meta's name)")
    p.add_argument("--chat", action="store_true", help="wrap plain-string / 'prompt' inputs as one user turn")
    p.add_argument("--truncate_left", action="store_true", help="keep the end of prompts longer than the context")
    return p.parse_args(argv)


def to_messages(record) -> list[dict] | None:
    """The chat messages a record describes, or None for a plain-text prompt."""
    if "messages" in record:
        return record["messages"]
    turns = record["conversation"]
    if not isinstance(turns, list) or not turns:
        raise ValueError('"conversation" must be a non-empty list of {"system"?, "input", "output"?} turns')
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("input"), str):
            raise ValueError(f'conversation turn {i} needs an "input" string')
        if turn.get("system"):
            messages.append({"role": "system", "content": turn["system"]})
        messages.append({"role": "user", "content": turn["input"]})
        if i < len(turns) - 1:
            messages.append({"role": "assistant", "content": str(turn.get("output", ""))})
    return messages


def encode_line(text: str, tok, chat: bool) -> tuple[list[int], object]:
    """(prompt token ids, id field or None) of one input line; ValueError says what is wrong with it."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(record, str):
        record = {"prompt": record}
    if not isinstance(record, dict) or not {"prompt", "messages", "conversation"} & record.keys():
        raise ValueError('expected a JSON string or an object with "prompt", "messages" or "conversation"')
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise ValueError('"prompt" must be a string')
        if chat:
            return tok.encode_dialog([{"role": "user", "content": record["prompt"]}]), record.get("id")
        return tok.encode(record["prompt"], bos=True), record.get("id")
    messages = to_messages(record)
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError('"messages" must be a list of {"role", "content"} objects')
    try:
        return tok.encode_dialog(messages), record.get("id")
    except (KeyError, TypeError) as e:
        raise ValueError(f"bad messages: {e!r}") from None


def pick_adapter(text: str, names: list[str], merged: bool) -> Optional[str]:
    """The adapter a line asks for ("adapter", or a "model" naming a loaded adapter), else the first loaded."""
    record = json.loads(text)
    default = names[0] if names else None
    if not isinstance(record, dict):
        return default
    if "adapter" not in record:
        return record["model"] if record.get("model") in names else default
    want = record["adapter"]
    if want is not None and want not in names:
        loaded = f"loaded: {', '.join(names)}" if names else "no --adapter was given"
        raise ValueError(f'"adapter" {want!r} is not a loaded adapter ({loaded})')
    if want != default and merged:
        raise ValueError(f'"adapter" {want!r}: the only --adapter is merged into the model; give each adapter as '
                         "--adapter NAME=DIR (two or more are kept side by side)")
    return want


def done_indices(path: str) -> set[int]:
    """Indices already in the output; drops a truncated or unreadable line left by a crash (rewriting atomically)."""
    if not os.path.exists(path):
        return set()
    good, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                if not line.endswith("\n") or not isinstance(rec.get("index"), int):
                    raise ValueError
                good.append(line)
            except (ValueError, AttributeError):
                bad += 1
    if bad:
        print(f"[{path}: dropping {bad} incomplete line(s); they will be redone]", file=sys.stderr, flush=True)
        atomic_write(path, "".join(good))
    return {json.loads(line)["index"] for line in good}


def append_line(f, record: dict) -> None:
    """One JSON line, on disk before we go on (a crash loses at most the line being written)."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def sort_output(path: str) -> None:
    """Put the finished output in input order."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    atomic_write(path, "".join(sorted(lines, key=lambda line: json.loads(line)["index"])))


class Progress:
    """A one-line progress bar with tokens/s on stderr (redrawn at most 5 times a second)."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width, self.done, self.tokens = total, width, 0, 0
        self.start = self.last = time.perf_counter()

    def update(self, n_done: int, n_tokens: int, force: bool = False):
        self.done += n_done
        self.tokens += n_tokens
        now = time.perf_counter()
        if not force and now - self.last < 0.2:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        print(f"\r[{bar}] {self.done}/{self.total}  {self.tokens / elapsed:7.1f} tok/s  {elapsed:6.1f}s",
              end="", file=sys.stderr, flush=True)

    def close(self):
        self.update(0, 0, force=True)
        print(file=sys.stderr, flush=True)


def plan_work(args, tok, limit: int, adapters: tuple[list[str], bool] = ([], False)
              ) -> tuple[list[tuple[int, list[int], object, Optional[str]]], list[dict]]:
    """(work items (index, ids, id, adapter) not yet in the output, error records for malformed lines)."""
    done = done_indices(args.output)
    work, errors = [], []
    try:
        f = open(args.input, encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"--input {args.input}: {e.strerror}") from None
    with f:
        for index, text in enumerate(f):
            if not text.strip() or index in done:
                continue
            try:
                ids, rec_id = encode_line(text, tok, args.chat)
                adapter = pick_adapter(text, *adapters)
                if len(ids) + args.max_new_tokens > limit and not args.truncate_left:
                    raise ValueError(f"prompt has {len(ids)} tokens; with --max_new_tokens {args.max_new_tokens} "
                                     f"it exceeds --max_seq_len {limit} (use --truncate_left to keep its end)")
            except ValueError as e:
                print(f"{args.input}:{index + 1}: skipped: {e}", file=sys.stderr, flush=True)
                errors.append({"index": index, "line": index + 1, "error": str(e)})
                continue
            work.append((index, ids, rec_id, adapter))
    return work, errors


def run_groups(loaded, work: list, args, merged: bool):
    """generate_continuous over the work, one adapter at a time; yields (work index, new tokens, stop reason)."""
    for name in dict.fromkeys(item[3] for item in work):  # adapters in order of first use
        group = [k for k, item in enumerate(work) if item[3] == name]
        if adapter_names(loaded.model) and not merged:
            set_adapter(loaded.model, name)
        # every rank runs the same schedule: tensor parallel broadcasts rank 0's tokens, so rows finish in lockstep
        finished = generate_continuous(loaded.model, [work[k][1] for k in group], args.max_new_tokens,
                                       args.batch_size, sampling_params(args), stop_ids=loaded.tok.stop_ids,
                                       truncate_left=args.truncate_left, process_group=loaded.tp_group,
                                       **generation_options(args))
        for j, new, reason in finished:
            yield group[j], new, reason


def main(argv=None):
    args = get_args(argv)
    loaded = load_from_args(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    tok, info = loaded.tok, loaded.dist
    limit = context_limit(args, loaded.model)
    names = adapter_names(loaded.model)
    merged = any(m.merged for _, m in lora_modules(loaded.model))
    plan = plan_work(args, tok, limit, (names, merged)) if info.is_rank0 else None
    work, errors = broadcast_object(plan, info)  # rank 0 reads the files; every rank runs the same batches
    out = open(args.output, "a", encoding="utf-8") if info.is_rank0 else None
    progress = Progress(len(work) + len(errors)) if info.is_rank0 else None
    for rec in errors if info.is_rank0 else ():
        append_line(out, rec)
        progress.update(1, 0)
    for k, new, reason in run_groups(loaded, work, args, merged):
        if not info.is_rank0:
            continue
        index, ids, rec_id, _ = work[k]
        rec = {"index": index, **({"id": rec_id} if rec_id is not None else {}), "output": tok.decode(new),
               "prompt_tokens": min(len(ids), limit - args.max_new_tokens), "output_tokens": len(new),
               "stop_reason": reason}
        append_line(out, rec)
        progress.update(1, len(new))
    if info.is_rank0:
        progress.close()
        out.close()
        sort_output(args.output)
        print(f"wrote {args.output}", file=sys.stderr, flush=True)
    cleanup()


if __name__ == "__main__":
    sys.exit(run(main))
