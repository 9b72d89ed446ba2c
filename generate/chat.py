"""Chat with an instruct model: a streaming REPL over stdin (a pipe works too), or one answer with --prompt.

    python generate/chat.py                                   # weights/smollm2-135m-instruct/
    torchrun --nproc_per_node 1 generate/chat.py --ckpt DIR --system "Be brief."
    torchrun --nproc_per_node 2 generate/chat.py --ckpt DIR   # tensor parallel over 2 GPUs
    python generate/chat.py --prompt "What is the capital of France?" --temperature 0

REPL commands: /reset clears the history (the system prompt stays), /exit or end of input quits.
When the history no longer fits --max_seq_len, the oldest turns are dropped (the system prompt is kept).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a fresh checkout

from minillama.cli import (ArgumentParser, add_model_args, add_sampling_args, context_limit,  # noqa: E402
                           generation_options, load_from_args, run, sampling_params)
from minillama.distributed import cleanup  # noqa: E402
from minillama.generation import generate_stream  # noqa: E402
from minillama.loading import broadcast_object, rank0_print  # noqa: E402
from minillama.tokenizer import StreamDecoder  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    add_model_args(p)
    add_sampling_args(p, temperature=0.6, top_p=0.9, max_new_tokens=512)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--prompt", default=None, help="one-shot: answer this message and exit")
    return p.parse_args(argv)


def fit_history(tok, messages: list[dict], limit: int, max_new_tokens: int) -> tuple[list[int], int]:
    """Encode the dialog, dropping the oldest user/assistant turns (never the system prompt) until
    prompt + max_new_tokens fits in limit. Mutates messages; returns (ids, number of turns dropped)."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    dropped = 0
    while True:
        ids = tok.encode_dialog(messages, add_generation_prompt=True)  # in the --chat_format the tokenizer got
        if len(ids) + max_new_tokens <= limit:
            return ids, dropped
        if len(messages) - first <= 1:
            raise ValueError(f"this message alone is {len(ids)} tokens; with --max_new_tokens {max_new_tokens} it "
                             f"does not fit --max_seq_len {limit}")
        del messages[first:first + 2]  # one user turn and the assistant's answer
        dropped += 1


def respond(loaded, ids: list[int], args) -> str:
    """Stream the answer to stdout (rank 0) and return its text."""
    tok, info = loaded.tok, loaded.dist
    decoder, new = StreamDecoder(tok), []
    for step in generate_stream(loaded.model, [ids], args.max_new_tokens, sampling_params(args),
                                stop_ids=tok.stop_ids, process_group=loaded.tp_group, **generation_options(args)):
        for _, t in step:
            new.append(t)
            rank0_print(info, decoder.push(t), end="")
    rank0_print(info, decoder.flush())
    return tok.decode(new)


def read_line(info) -> str | None:
    """Rank 0 reads one line from stdin (None at end of input); every rank gets it."""
    line = None
    if info.is_rank0:
        if sys.stdin.isatty():
            print("> ", end="", flush=True)
        raw = sys.stdin.readline()
        line = raw.rstrip("\r\n") if raw else None
    return broadcast_object(line, info)


def main(argv=None):
    args = get_args(argv)
    info_print = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    loaded = load_from_args(args, log=info_print)
    info, tok = loaded.dist, loaded.tok
    limit = context_limit(args, loaded.model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    say = (lambda msg: info_print(msg)) if info.is_rank0 else (lambda msg: None)

    if args.prompt is not None:
        messages = system + [{"role": "user", "content": args.prompt}]
        ids, _ = fit_history(tok, messages, limit, args.max_new_tokens)
        respond(loaded, ids, args)
        cleanup()
        return

    say(f"[chat: {tok.chat_format} format; /reset clears the history, /exit quits]")
    history = list(system)
    while True:
        line = read_line(info)
        if line is None or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = list(system)
            say("[history cleared]")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            ids, dropped = fit_history(tok, history, limit, args.max_new_tokens)
        except ValueError as e:
            say(f"[{e}; message skipped]")
            history.pop()
            continue
        if dropped:
            say(f"[dropped the {dropped} oldest turn(s) to fit --max_seq_len {limit}]")
        try:
            answer = respond(loaded, ids, args)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat (one process; torchrun stops all ranks)
            if info.world_size > 1:
                raise
            say("\n[interrupted; answer dropped from the history]")
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})
    cleanup()


if __name__ == "__main__":
    sys.exit(run(main))
