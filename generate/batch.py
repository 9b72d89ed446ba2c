"""Generate for every line of a JSONL file with continuous batching, resumable after a crash.

    python generate/batch.py --ckpt DIR --input prompts.jsonl --output answers.jsonl --batch_size 16
    torchrun --nproc_per_node 2 generate/batch.py --ckpt DIR --input in.jsonl --output out.jsonl

Input lines: "a prompt string", {"prompt": str}, {"messages": [{"role", "content"}, ...]} or xtuner-style
{"conversation": [{"system": ..., "input": ..., "output": ...}, ...]} (the last turn's output is what we write).
Strings and "prompt" are raw text completion unless --chat wraps them as one user turn. An "id" field is copied.
With several --adapter NAME=DIR, a line's "adapter" field picks one by name (null: the base model), as does an
OpenAI-style "model" field that names a loaded adapter; lines without either use the first --adapter.
A line may also set its own sampling: "temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty",
"presence_penalty", "logit_bias" ({"token id": bias}, OpenAI's) and "min_p" override the flags for that line.
Structured output: a line's "response_format", in OpenAI's shape ({"type": "json_object"}, {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}, the server's {"type": "regex", "regex"}; {"type": "text"}: free), makes
its answer match; --response_format sets it for lines without one. Constrained and free lines share the batch.
Output: one line per non-blank input line, {"index", "id"?, "output", "prompt_tokens", "output_tokens", "stop_reason"},
written (and fsync'ed) as each prompt finishes, then sorted into input order when the run completes.
Continuous batching: --batch_size prompts are in flight; when one answer ends, its row takes the next prompt at
once, so long answers do not hold the others back. Greedy outputs equal generating each prompt alone; sampled
ones are reproducible for the same --seed, input and --batch_size.
"index" is the input's 0-based line number. A bad input line (not UTF-8, not JSON, an empty prompt, too long) is
reported on stderr as FILE:LINE and recorded as {"index", "id"?, "line", "error"}; the run goes on.
Rerunning with the same --output skips every index answered there and retries the ones that ended in an error; a
last line cut off by a crash mid-write is dropped and redone. With nothing left to do it says so without loading the
model. An existing --output must be one this tool wrote (every line a record of the form above): any other file, and
the --input itself, is refused untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a fresh checkout

from minillama.util.cli import ArgumentParser, positive_int, run
from minillama.tools.flags import (add_model_args, add_sampling_args, context_limit, engine_config,  # noqa: E402
                                   load_from_args, parse_args, response_format_arg, sampling_params)
from minillama.util.distributed import cleanup  # noqa: E402
from minillama.util.files import atomic_write, disk_full_names, require_file  # noqa: E402
from minillama.inference.constraints import Constraint, check, grammar_vocab, parse_response_format  # noqa: E402
from minillama.inference.generate import generate_requests  # noqa: E402
from minillama.inference.request import Request  # noqa: E402
from minillama.inference.sampling import SamplingParams  # noqa: E402
from minillama.inference.loading import broadcast_object  # noqa: E402
from minillama.lora.slots import adapter_names, lora_modules, set_adapter
from minillama.tokenizer.tokenizer import decode_cut  # noqa: E402


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    add_model_args(p)
    add_sampling_args(p, temperature=0.0, top_p=1.0, max_new_tokens=256)
    p.add_argument("--input", required=True, help="JSONL of prompts")
    p.add_argument("--output", required=True, help="JSONL of answers (appended to / resumed)")
    p.add_argument("--batch_size", "--max_batch_size", type=positive_int, default=8,
                   help="prompts decoded together (--max_batch_size: Meta's name)")
    p.add_argument("--chat", action="store_true", help="wrap plain-string / 'prompt' inputs as one user turn")
    p.add_argument("--truncate_left", action="store_true", help="keep the end of prompts longer than the context")
    p.add_argument("--response_format", type=response_format_arg, default=None, metavar="JSON_OR_FILE",
                   help='OpenAI\'s response_format for lines without their own, as JSON or a JSON file holding '
                        'it: {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name", "schema", '
                        '"strict": true}} or {"type": "regex", "regex"} (default: none, such lines are free text)')
    return parse_args(p, argv)


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


def parse_line(raw: bytes) -> dict:
    """One input line -> its record ({"prompt"} for a JSON string); ValueError says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    try:  # without its newline: inside an unterminated string json would blame the newline's column instead
        record = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON at column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None
    if isinstance(record, str):
        record = {"prompt": record}
    if not isinstance(record, dict) or not {"prompt", "messages", "conversation"} & record.keys():
        raise ValueError('expected a JSON string or an object with "prompt", "messages" or "conversation"')
    return record


def encode_record(record: dict, tok, chat: bool) -> list[int]:
    """The prompt token ids of a parsed record; ValueError says what is wrong with it."""
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise ValueError('"prompt" must be a string')
        if not record["prompt"]:
            raise ValueError("empty prompt")
        if chat:
            return tok.encode_dialog([{"role": "user", "content": record["prompt"]}])
        ids = tok.encode(record["prompt"], bos=True)
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        return ids
    messages = to_messages(record)
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    try:
        return tok.encode_dialog(messages)
    except (KeyError, TypeError) as e:
        raise ValueError(f"bad messages: {e!r}") from None


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty",
                   "logit_bias", "min_p")


def line_sampling(record: dict, default: SamplingParams, vocab: int) -> SamplingParams:
    """The flags' sampling with the line's own fields over it; ValueError names a bad field."""
    given = {k: record[k] for k in SAMPLING_FIELDS if k in record}
    if isinstance(given.get("logit_bias"), dict):
        try:
            given["logit_bias"] = tuple(sorted((int(t), b) for t, b in given["logit_bias"].items()))
        except ValueError:
            raise ValueError('"logit_bias" must map token ids to biases in [-100, 100]') from None
    try:
        params = dataclasses.replace(default, **given)
    except (ValueError, TypeError) as e:
        raise ValueError(f"bad sampling field: {e}") from None
    if any(t >= vocab for t, _ in params.logit_bias):
        raise ValueError(f'"logit_bias" names a token id outside the vocabulary (ids 0..{vocab - 1})')
    return params


def line_constraint(record: dict, default: Optional[Constraint], tok, speculate: bool) -> Optional[Constraint]:
    """The line's "response_format" (absent or null: the --response_format default) as a Constraint checked against
    the vocabulary, or None for free text; ValueError says what is wrong with it."""
    c = default
    if record.get("response_format") is not None:
        try:
            c = parse_response_format(record["response_format"])
            if c is not None:
                check(c, grammar_vocab(tok))  # a schema the grammar engine rejects is this line's error
        except ValueError as e:
            raise ValueError(f'"response_format": {e}') from None
    if c is not None and speculate:
        raise ValueError('"response_format": constrained decoding cannot run under --speculate or --draft_ckpt')
    return c


def pick_adapter(record: dict, names: list[str], merged: bool) -> Optional[str]:
    """The adapter a parsed line asks for ("adapter", or a "model" naming a loaded adapter), else the first loaded."""
    default = names[0] if names else None
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


ANSWER_KEYS = {"index", "id", "output", "prompt_tokens", "output_tokens", "stop_reason"}
ERROR_KEYS = {"index", "id", "line", "error"}


def is_our_record(rec) -> bool:
    """A line this tool writes: an answer or an error record (what proves an existing --output is ours)."""
    if not isinstance(rec, dict) or isinstance(rec.get("index"), bool) or not isinstance(rec.get("index"), int):
        return False
    keys = set(rec)
    return (keys <= ANSWER_KEYS and {"output", "stop_reason"} <= keys) or (keys <= ERROR_KEYS and "error" in keys)


def scan_output(path: str, ours: Callable[[object], bool] = is_our_record) -> tuple[set[int], list[str], list[str]]:
    """(indices answered, the output's good lines, notes on what is dropped): a last line cut off by a crash is
    dropped and redone; error records are dropped so their lines are retried. Reads only. Every complete line must be
    a record this tool writes, else ValueError: a file it did not write is never rewritten."""
    if not os.path.exists(path):
        return set(), [], []
    require_file(path, "--output")
    done, good, notes, cut, retry = set(), [], [], 0, 0
    with open(path, "rb") as f:
        raws = f.readlines()
    for n, raw in enumerate(raws, start=1):
        if not raw.strip():
            continue
        prefix = raw.startswith(b'{"index": ')  # how every line this tool writes begins
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            if prefix:  # a line of ours damaged on disk
                notes.append(f"{path}:{n}: not valid UTF-8; dropped, its prompt will be redone")
                continue
            rec = None
        except (ValueError, RecursionError):
            rec = None
        if prefix and not ours(rec) and not isinstance(rec, dict):  # cut off by a crash mid-write
            cut += 1
            continue
        if not ours(rec):
            raise ValueError(f"{path}:{n} is not a record this tool writes; refusing to change a file it did not "
                             "write: choose another output file")
        if "error" in rec:
            retry += 1
            continue
        good.append(raw.decode("utf-8").rstrip("\n") + "\n")
        done.add(rec["index"])
    notes += [f"[{path}: dropping {cut} incomplete line(s); they will be redone]"] * bool(cut)
    notes += [f"[{path}: retrying {retry} line(s) whose earlier attempt ended in an error]"] * bool(retry)
    return done, good, notes


def check_paths(args) -> None:
    """--output must not be --input (also through a link): resuming would rewrite the prompts as answers."""
    same = os.path.exists(args.output) and os.path.exists(args.input) and os.path.samefile(args.input, args.output)
    if same or os.path.realpath(args.input) == os.path.realpath(args.output):
        raise ValueError(f"--output {args.output} is the --input file; give the answers their own file")


def done_indices(path: str, ours: Callable[[object], bool] = is_our_record) -> set[int]:
    """Indices answered in the output, after rewriting it (atomically) without the lines scan_output drops; `ours`
    recognizes the writing tool's records (eval_long shares this)."""
    done, good, notes = scan_output(path, ours)
    for note in notes:
        print(note, file=sys.stderr, flush=True)
    if notes:
        atomic_write(path, "".join(good))
    return done


def input_indices(path: str) -> list[int]:
    """The 0-based line numbers of the input's non-blank lines (checked before the model loads)."""
    require_file(path, "--input")
    with open(path, "rb") as f:
        return [i for i, raw in enumerate(f) if raw.strip()]


RESUME_HINT = "; free some space and rerun the same command: the answers written so far are kept"


def append_line(f, record: dict) -> None:
    """One JSON line, on disk before we go on (a crash loses at most the line being written)."""
    with disk_full_names(f.name, RESUME_HINT):
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def sort_output(path: str) -> None:
    """Put the finished output in input order."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    with disk_full_names(path, RESUME_HINT):
        atomic_write(path, "".join(sorted(lines, key=lambda line: json.loads(line)["index"])))


class Progress:
    """Progress with tokens/s on stderr: one redrawn line on a terminal (at most 5 times a second), else one plain
    line per update (at most every 5 s) so logs stay readable."""

    def __init__(self, total: int, width: int = 30, file=None):
        self.total, self.width, self.done, self.tokens = total, width, 0, 0
        self.file = file or sys.stderr
        self.tty = self.file.isatty()
        self.every = 0.2 if self.tty else 5.0
        self.start = self.last = time.perf_counter()

    def update(self, n_done: int, n_tokens: int, force: bool = False):
        self.done += n_done
        self.tokens += n_tokens
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total}  {self.tokens / elapsed:7.1f} tok/s  {elapsed:6.1f}s"
        print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", file=self.file, flush=True)

    def close(self):
        self.update(0, 0, force=True)
        if self.tty:
            print(file=self.file, flush=True)


def plan_work(args, tok, limit: int,
              adapters: tuple[list[str], bool] = ([], False)) -> tuple[list[Request], list[dict]]:
    """(a Request for each line not yet in the output: key its index, reply its id; error records for bad lines).
    Plain data throughout, so tensor parallel can broadcast it; each rank compiles the grammars itself."""
    done = done_indices(args.output)
    work, errors = [], []
    with open(args.input, "rb") as f:
        for index, raw in enumerate(f):
            if not raw.strip() or index in done:
                continue
            rec_id = None
            try:
                record = parse_line(raw)
                rec_id = record.get("id")
                ids = encode_record(record, tok, args.chat)
                adapter = pick_adapter(record, *adapters)
                sampling = line_sampling(record, sampling_params(args), tok.vocab_size)
                constraint = line_constraint(record, args.response_format, tok, bool(args.speculate or args.draft_ckpt))
                room = limit - args.max_new_tokens
                if len(ids) > room and not args.truncate_left:
                    raise ValueError(f"prompt has {len(ids)} tokens; with --max_new_tokens {args.max_new_tokens} "
                                     f"it exceeds --max_seq_len {limit} (use --truncate_left to keep its end)")
            except ValueError as e:
                print(f"{args.input}:{index + 1}: skipped: {e}", file=sys.stderr, flush=True)
                errors.append({"index": index, **({"id": rec_id} if rec_id is not None else {}), "line": index + 1,
                               "error": str(e)})
                continue
            work.append(Request(ids[-room:], args.max_new_tokens, sampling, frozenset(tok.stop_ids), adapter=adapter,
                                key=index, reply=rec_id, constraint=constraint))
    return work, errors


def run_groups(loaded, work: list[Request], args, merged: bool):
    """generate_requests over the work, one adapter at a time; yields each Request as it finishes."""
    for name in dict.fromkeys(req.adapter for req in work):  # adapters in order of first use
        if adapter_names(loaded.model) and not merged:
            set_adapter(loaded.model, name)
        # every rank runs the same schedule: tensor parallel broadcasts rank 0's tokens, so rows finish in lockstep
        yield from generate_requests(loaded.model, [req for req in work if req.adapter == name],
                                     engine_config(args, loaded, batch_size=args.batch_size, reuse_prefix=True),
                                     grammar=lambda: grammar_vocab(loaded.tok))  # built when a constrained line starts


def main(argv=None):
    args = get_args(argv)
    check_paths(args)
    if args.response_format is not None and (args.speculate or args.draft_ckpt):
        raise ValueError("--response_format cannot be combined with --speculate or --draft_ckpt: a grammar needs the "
                         "host after every token")
    lines = input_indices(args.input)
    if not lines:
        raise ValueError(f"--input {args.input} holds no prompts (every line is blank)")
    answered = len(scan_output(args.output)[0] & set(lines))
    if answered == len(lines):
        print(f"{args.output}: {answered} of {len(lines)} already done", file=sys.stderr, flush=True)
        return
    loaded = load_from_args(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    tok, info = loaded.tok, loaded.dist
    limit = context_limit(args, loaded.model)
    names = adapter_names(loaded.model)
    merged = any(m.merged for _, m in lora_modules(loaded.model))
    plan = plan_work(args, tok, limit, (names, merged)) if info.is_rank0 else None
    work, errors = broadcast_object(plan, info)  # rank 0 reads the files; every rank runs the same batches
    if info.is_rank0 and os.path.dirname(args.output):
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
    out = open(args.output, "a", encoding="utf-8") if info.is_rank0 else None
    progress = Progress(len(work) + len(errors)) if info.is_rank0 else None
    for rec in errors if info.is_rank0 else ():
        append_line(out, rec)
        progress.update(1, 0)
    for req in run_groups(loaded, work, args, merged):
        if not info.is_rank0:
            continue
        new = req.output
        text = decode_cut(tok, new) if req.finish == "length" else tok.decode(new)  # no half character at a cut
        rec = {"index": req.key, **({"id": req.reply} if req.reply is not None else {}), "output": text,
               "prompt_tokens": len(req.prompt), "output_tokens": len(new), "stop_reason": req.finish}
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
