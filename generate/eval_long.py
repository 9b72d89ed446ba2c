"""Long-context evaluation: passkey retrieval (a needle in a haystack) and perplexity against context length.

    python generate/eval_long.py --task passkey --lengths 1024,2048,4096 --depths 0,0.25,0.5,0.75,1 --trials 3 \\\
        --out eval/before                                                     # the embedded SmolLM2
    python generate/eval_long.py --ckpt DIR --adapter out/final --task passkey --lengths 2048,4096 --out eval/after
    python generate/eval_long.py --ckpt DIR --task perplexity --data book.txt --lengths 512,1024,2048,4096 --out eval/
    torchrun --nproc_per_node 2 generate/eval_long.py --ckpt DIR --task passkey ...   # tensor parallel

passkey: for each length (prompt tokens, chat format included), needle depth (0 = the start of the filler, 1 = its
end) and trial, a random 5-digit key is hidden in filler text (the landmark-attention test: "The grass is green. The
sky is blue. ...") and the model is asked for it as one user turn in its chat format. The greedy answer is correct
if it contains the key. Writes OUT/passkey.jsonl (a record per trial: length, depth, trial, key, answer, correct,
prompt_tokens) and OUT/passkey.png (accuracy per cell; length on x, depth on y, green = found).
perplexity: the first --trials x (longest length) tokens of --data (a text file, or JSONL with "text" fields) are
cut into windows of every length, so each length is scored on the same tokens. Writes OUT/perplexity.jsonl (a record
per window: length, window, start, tokens, nll = mean next-token loss) and OUT/perplexity.png.
Prompts of a batch are decoded with continuous batching (--batch_size rows). Rerunning with the same --out skips
every record already written (a line cut off by a crash is redone) and redraws the PNG; OUT/eval_config.json holds
what was evaluated, and a rerun with another checkpoint, adapter, RoPE, dtype or seed is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a fresh checkout

from generate.batch import Progress, append_line, done_indices, sort_output  # noqa: E402
from minillama.util.cli import ArgumentParser, positive_int, run
from minillama.tools.flags import add_model_args, engine_config, load_from_args
from minillama.util.distributed import cleanup  # noqa: E402
from minillama.util.files import atomic_write, read_json, write_json  # noqa: E402
from minillama.inference.generate import generate_continuous  # noqa: E402
from minillama.rope import runs_past_context  # noqa: E402
from minillama.training.loss import chunked_cross_entropy  # noqa: E402
from minillama.util.plot import Chart, HeatmapLabels, heatmap_png, loss_curve_png, png_bytes  # noqa: E402

INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\n\nWhat is the pass key?"
# what a rerun must share with the records already in --out
SAME_RUN = ("task", "ckpt", "adapter", "tokenizer_path", "dtype", "quantize", "chat_format", "rope_theta", "rope_scaling",
            "max_seq_len", "seed", "max_new_tokens", "data")


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers >= 1, e.g. 1024,2048,4096")
    return sorted(set(values))


def depth_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or not all(0 <= v <= 1 and round(v * 1000) == v * 1000 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: depths are fractions in [0, 1] (3 decimals at most)")
    return sorted(set(values))


def get_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    add_model_args(p)
    for action in p._actions:  # keys and windows must not change between runs that resume each other
        if action.dest == "seed":
            action.default, action.help = 0, "seed of the passkeys"
    p.add_argument("--task", required=True, choices=("passkey", "perplexity"))
    p.add_argument("--lengths", required=True, type=int_list, help="context lengths in tokens, e.g. 1024,2048,4096")
    p.add_argument("--depths", type=depth_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="passkey: where the key sits in the filler (0 = start, 1 = end)")
    p.add_argument("--trials", type=positive_int, default=3,
                   help="passkey: keys per (length, depth) cell; perplexity: windows of the longest length scored")
    p.add_argument("--data", default=None, help="perplexity: a text file, or JSONL with a 'text' field per line")
    p.add_argument("--out", required=True, help="output dir (resumed when rerun)")
    p.add_argument("--batch_size", type=positive_int, default=4, help="prompts (windows) processed together")
    p.add_argument("--max_new_tokens", type=positive_int, default=16, help="passkey: answer tokens")
    p.add_argument("--title", default=None, help="the PNG's title (default: the task and checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="discard the task's earlier records in --out")
    return p.parse_args(argv)


# ---- the run's files ----
def run_config(args) -> dict:
    """The settings a rerun must share, as eval_config.json holds them (paths as strings, --adapter pairs as lists)."""
    return json.loads(json.dumps({k: getattr(args, k) for k in SAME_RUN}, default=str))


def prepare_out(args, rank0: bool) -> tuple[Path, Path]:
    """(records file, png) in --out, checked against the config of the records already there. Before loading."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file")
    records, png, cfg_file = out / f"{args.task}.jsonl", out / f"{args.task}.png", out / "eval_config.json"
    if args.task == "perplexity" and not args.data:
        raise ValueError("--task perplexity needs --data FILE (text, or JSONL with 'text')")
    if args.data and not Path(args.data).is_file():
        raise FileNotFoundError(f"--data {args.data} does not exist")
    configs = read_json(cfg_file, "the earlier run's") if cfg_file.is_file() else {}
    old = configs.get(args.task)
    if old is not None and old != run_config(args) and records.is_file() and not args.overwrite:
        diff = sorted(k for k in SAME_RUN if old.get(k) != run_config(args).get(k))
        raise FileExistsError(f"--out {out} holds {args.task} records of another setup (differs in {', '.join(diff)})"
                              "; give another --out, or --overwrite to discard them")
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            for f in (records, png):
                f.unlink(missing_ok=True)
        write_json(cfg_file, {**configs, args.task: run_config(args)})
    return records, png


def is_eval_record(rec) -> bool:
    """A line this tool writes (a passkey trial or a perplexity window): what lets a rerun rewrite the records."""
    return isinstance(rec, dict) and isinstance(rec.get("index"), int) and not isinstance(rec["index"], bool) and (
        {"key", "answer", "correct"} <= rec.keys() or {"window", "nll"} <= rec.keys() or "error" in rec)


def record_index(length: int, depth: float, trial: int) -> int:
    """A stable id of one trial (resuming and output order): by length, then depth, then trial."""
    return (length * 1001 + round(depth * 1000)) * 100000 + trial


# ---- passkey ----
def most_that_fit(size, budget: int) -> int:
    """The largest n >= 0 with size(n) <= budget, for size growing with n (size(0) must fit)."""
    hi = 1
    while size(hi) <= budget:  # doubling, then bisection: a few encodes of texts about the budget's size
        hi *= 2
    lo = hi // 2 if hi > 1 else 0
    while lo < hi - 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid)
    return lo


def passkey_prompt(tok, length: int, depth: float, key: str, reserve: int) -> list[int]:
    """The longest chat prompt of at most length - reserve tokens with the key at `depth` of the filler."""
    budget = length - reserve

    def build(n: int) -> list[int]:
        at = round(depth * n)
        text = (INTRO + FILLER * at + f"The pass key is {key}. Remember it. {key} is the pass key. "
                + FILLER * (n - at) + QUESTION)
        return tok.encode_dialog([{"role": "user", "content": text}])

    if len(build(0)) > budget:
        raise ValueError(f"--lengths {length}: even without filler the prompt needs {len(build(0))} tokens "
                         f"(+ --max_new_tokens {reserve})")
    return build(most_that_fit(lambda n: len(build(n)), budget))


def passkey_work(args, tok, done: set) -> list[dict]:
    """Every (length, depth, trial) not yet in the records, with its key and prompt."""
    work = []
    for length in args.lengths:
        for depth in args.depths:
            for trial in range(args.trials):
                index = record_index(length, depth, trial)
                if index in done:
                    continue
                key = str(random.Random(f"{args.seed}-{length}-{depth}-{trial}").randint(10000, 99999))
                ids = passkey_prompt(tok, length, depth, key, args.max_new_tokens)
                work.append({"index": index, "length": length, "depth": depth, "trial": trial, "key": key,
                             "ids": ids})
    return work


def run_passkey(loaded, args, records: Path) -> None:
    tok, info = loaded.tok, loaded.dist
    work = passkey_work(args, tok, done_indices(str(records), is_eval_record)) if info.is_rank0 else None
    work = broadcast(work, info)  # every tensor-parallel rank decodes the same prompts
    out = open(records, "a", encoding="utf-8") if info.is_rank0 else None
    progress = Progress(len(work)) if info.is_rank0 else None
    finished = generate_continuous(loaded.model, [w["ids"] for w in work], args.max_new_tokens,
                                   stop_ids=tok.stop_ids, max_seq_len=max(args.lengths),
                                   config=engine_config(args, loaded, batch_size=args.batch_size,
                                                        reuse_prefix=True)) if work else ()
    for k, new, _ in finished:
        if not info.is_rank0:
            continue
        w = work[k]
        answer = tok.decode(new)
        append_line(out, {"index": w["index"], "length": w["length"], "depth": w["depth"], "trial": w["trial"],
                          "key": w["key"], "answer": answer, "correct": w["key"] in answer,
                          "prompt_tokens": len(w["ids"])})
        progress.update(1, len(new))
    if info.is_rank0:
        progress.close()
        out.close()


def passkey_table(args, rows: list[dict]) -> tuple[np.ndarray, list[list[str]]]:
    """Accuracy per (depth, length) cell of the requested grid, and 'found/trials' texts."""
    acc = np.full((len(args.depths), len(args.lengths)), np.nan)
    text = [["" for _ in args.lengths] for _ in args.depths]
    for i, depth in enumerate(args.depths):
        for j, length in enumerate(args.lengths):
            cell = [r["correct"] for r in rows if r["length"] == length and r["depth"] == depth]
            if cell:
                acc[i, j] = sum(cell) / len(cell)
                text[i][j] = f"{sum(cell)}/{len(cell)}"
    return acc, text


# ---- perplexity ----
def read_text(path: str) -> str:
    """A text file, or the 'text' fields of a JSONL file joined by blank lines."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {path}: not valid UTF-8 (byte {e.start})") from None
    if not path.endswith(".jsonl"):
        return raw
    texts = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError(f"{path}:{lineno}: JSON nested too deeply to read") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a 'text' string")
        texts.append(rec["text"])
    return "\n\n".join(texts)


def perplexity_windows(args, tok, done: set) -> list[dict]:
    """Windows of every length over the same first trials x longest tokens of --data, not yet recorded."""
    ids = tok.encode(read_text(args.data), bos=True)
    need = args.trials * max(args.lengths)
    if len(ids) < need:
        raise ValueError(f"--data {args.data} has {len(ids)} tokens; --trials {args.trials} windows of "
                         f"{max(args.lengths)} need {need}")
    work = []
    for length in args.lengths:
        for w in range(need // length):
            index = record_index(length, 0.0, w)
            if index not in done:
                work.append({"index": index, "length": length, "window": w, "start": w * length,
                             "ids": ids[w * length:(w + 1) * length]})
    return work


@torch.no_grad()
def run_perplexity(loaded, args, records: Path) -> None:
    info, model = loaded.dist, loaded.model
    done = done_indices(str(records), is_eval_record) if info.is_rank0 else None
    work = broadcast(perplexity_windows(args, loaded.tok, done) if info.is_rank0 else None, info)
    device = model.tok_embeddings.weight.device
    out = open(records, "a", encoding="utf-8") if info.is_rank0 else None
    progress = Progress(len(work)) if info.is_rank0 else None
    for length in args.lengths:  # a batch holds windows of one length
        todo = [w for w in work if w["length"] == length]
        for b in range(0, len(todo), args.batch_size):
            batch = todo[b:b + args.batch_size]
            x = torch.tensor([w["ids"] for w in batch], device=device)  # (B, L)
            hidden = model(x, return_hidden=True)  # (B, L, D): logits only chunk by chunk in the loss
            targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
            for w, h, t in zip(batch, hidden, targets):
                nll = chunked_cross_entropy(h, model.output, t).item() / (length - 1)
                if info.is_rank0:
                    append_line(out, {"index": w["index"], "length": length, "window": w["window"],
                                      "start": w["start"], "tokens": length - 1, "nll": nll})
            if info.is_rank0:
                progress.update(len(batch), len(batch) * length)
    if info.is_rank0:
        progress.close()
        out.close()


def perplexity_table(args, rows: list[dict]) -> list[float]:
    """Perplexity per requested length: exp of the token-weighted mean loss of its windows."""
    ppl = []
    for length in args.lengths:
        cell = [r for r in rows if r["length"] == length]
        total = sum(r["tokens"] for r in cell)
        ppl.append(math.exp(sum(r["nll"] * r["tokens"] for r in cell) / total) if total else float("nan"))
    return ppl


# ---- shared ----
def broadcast(obj, info):
    from minillama.inference.loading import broadcast_object
    return broadcast_object(obj, info)


def check_lengths(args, model) -> None:
    longest = max(args.lengths)
    if longest > model.args.max_seq_len and not runs_past_context(model.args.rope_scaling):
        raise ValueError(f"--lengths {longest} exceeds the model's context of {model.args.max_seq_len} tokens; pass "
                         "--max_seq_len (with a --rope_theta / --rope_scaling that reaches it)")


def report(args, records: Path, png: Path) -> None:
    """Sort the records, draw the PNG, print the table."""
    sort_output(str(records))
    rows = [json.loads(line) for line in records.read_text(encoding="utf-8").splitlines()]
    title = args.title or f"{args.task}: {Path(args.ckpt or 'smollm2-135m-instruct').name}" \
                          f"{''.join(' + ' + Path(d).name for _, d in args.adapter or ())}"
    lengths = [str(n) for n in args.lengths]
    if args.task == "passkey":
        acc, text = passkey_table(args, rows)
        img = heatmap_png(acc, lengths, [f"{d:g}" for d in args.depths],
                          HeatmapLabels("context length (tokens)", "depth", title), text)
        print(f"passkey accuracy (rows: depth, columns: length {' '.join(lengths)})", file=sys.stderr)
        for depth, line in zip(args.depths, text):
            print(f"  {depth:<5g} " + " ".join(f"{t:>6}" for t in line), file=sys.stderr)
        overall = [r["correct"] for r in rows if r["length"] in args.lengths and r["depth"] in args.depths]
        print(f"  overall {sum(overall)}/{len(overall)}", file=sys.stderr)
    else:
        ppl = perplexity_table(args, rows)
        img = loss_curve_png(args.lengths, ppl, chart=Chart(x_label="context length (tokens)", y_label="perplexity",
                                                            names=(title, ""), dots=True))
        print("perplexity: " + ", ".join(f"{n}: {p:.3f}" for n, p in zip(lengths, ppl)), file=sys.stderr)
    atomic_write(png, png_bytes(img))
    print(f"wrote {records} and {png}", file=sys.stderr)


def main(argv=None):
    args = get_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    records, png = prepare_out(args, rank0)
    loaded = load_from_args(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    check_lengths(args, loaded.model)
    if args.task == "passkey":
        run_passkey(loaded, args, records)
    else:
        run_perplexity(loaded, args, records)
    if loaded.dist.is_rank0:
        report(args, records, png)
    cleanup()


if __name__ == "__main__":
    sys.exit(run(main))
