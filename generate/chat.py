"""Chat with an instruct model: a streaming REPL over stdin (a pipe works too), or one answer with --prompt.

    python generate/chat.py                                   # weights/smollm2-135m-instruct/
    torchrun --nproc_per_node 1 generate/chat.py --ckpt DIR --system "Be brief."
    torchrun --nproc_per_node 2 generate/chat.py --ckpt DIR   # tensor parallel over 2 GPUs
    python generate/chat.py --prompt "What is the capital of France?" --temperature 0

REPL: line editing and history (readline), /help lists the commands (/system TEXT, /reset, /exit), a line ending
in \\ continues on the next one, \"\"\" starts and ends a multi-line block. Ctrl-C stops the answer in progress (also
under torchrun); Ctrl-C at the prompt, Ctrl-D or /exit quits. After each answer a dim line gives the token count and
speed. The KV cache is kept between turns: a turn prefills only its new tokens after the cached conversation. When
the history no longer fits --max_seq_len, the oldest turns are dropped (the system prompt is kept).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a fresh checkout

from minillama.util.cli import ArgumentParser, run
from minillama.tools.flags import add_model_args, add_sampling_args, context_limit, engine_config, load_from_args, parse_args, sampling_params
from minillama.util.distributed import cleanup  # noqa: E402
from minillama.inference.engine import Engine
from minillama.inference.request import Request
from minillama.inference.loading import broadcast_object, rank0_print  # noqa: E402
from minillama.inference.repl import HELP, Terminal, dim  # noqa: E402
from minillama.tokenizer.tokenizer import StreamDecoder, decode_cut  # noqa: E402

GO, STOP, QUIT = 0, 1, 2  # what rank 0 tells every rank before each decode step


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    add_model_args(p)
    add_sampling_args(p, temperature=0.6, top_p=0.9, max_new_tokens=512)
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's own, if any)")
    p.add_argument("--prompt", default=None, help="one-shot: answer this message and exit")
    return parse_args(p, argv)


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


def signal_from_rank0(term: Terminal, info) -> int:
    """GO, STOP (Ctrl-C: end this answer) or QUIT (a second Ctrl-C), decided on rank 0, known to every rank."""
    what = GO
    if info.is_rank0:
        try:
            what = STOP if term.interrupted() else GO
        except KeyboardInterrupt:
            what = QUIT
    return broadcast_object(what, info)


def respond(loaded, engine: Engine, ids: list[int], args, term: Terminal) -> tuple[str | None, str]:
    """Stream the answer to stdout (rank 0); returns (its text, or None if interrupted; the stats line)."""
    tok, info = loaded.tok, loaded.dist
    engine.reserve(len(ids) + args.max_new_tokens)  # grown in place: the cached conversation stays
    req = engine.submit(Request(ids, args.max_new_tokens, sampling_params(args), frozenset(tok.stop_ids)))
    decoder, t0, what = StreamDecoder(tok), time.perf_counter(), GO
    with term.answering():
        while req.finish is None:
            what = signal_from_rank0(term, info)
            if what != GO:
                engine.cancel(req.key)
                break
            for ev in engine.step():
                if ev.token is not None:
                    rank0_print(info, decoder.push(ev.token), end="")
    if what == QUIT:
        raise KeyboardInterrupt
    rank0_print(info, "" if req.finish == "length" else decoder.flush())  # a cut answer drops a partial character
    seconds = time.perf_counter() - t0
    n = len(req.output)
    stats = (f"[{n} tokens, {n / max(seconds, 1e-9):.1f} tokens/s; prompt {len(ids)} tokens, "
             f"{req.cached_tokens} of them cached]")
    text = decode_cut(tok, req.output) if req.finish == "length" else tok.decode(req.output)
    return (None if req.finish == "cancelled" else text), stats


def main(argv=None):
    args = get_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    loaded = load_from_args(args, log=log)
    info, tok = loaded.dist, loaded.tok
    limit = context_limit(args, loaded.model)
    say = log if info.is_rank0 else (lambda msg: None)
    # one cache row, kept between turns (reuse_prefix): each turn prefills only what the cache does not hold yet
    engine = Engine(loaded.model, engine_config(args, loaded, batch_size=1, cache_len=min(limit, 1024),
                                                reuse_prefix=True))
    term = Terminal(info.is_rank0)
    system = [{"role": "system", "content": args.system}] if args.system else []

    if args.prompt is not None:
        ids, _ = fit_history(tok, system + [{"role": "user", "content": args.prompt}], limit, args.max_new_tokens)
        _, stats = respond(loaded, engine, ids, args, term)
        say(dim(stats))
        cleanup()
        return

    say(f"[chat: {tok.chat_format} format; /help lists the commands, Ctrl-C stops an answer, Ctrl-D quits]")
    history = list(system)
    try:
        while True:
            line = broadcast_object(term.read() if info.is_rank0 else None, info)
            command, _, rest = line.strip().partition(" ") if line is not None else ("/exit", "", "")
            if command == "/exit" or command == "/quit":
                break
            if command == "/help":
                say(HELP)
            elif command == "/reset":
                history = [m for m in history if m["role"] == "system"]
                say("[history cleared]")
            elif command == "/system":
                history = [m for m in history if m["role"] != "system"]
                if rest.strip() and rest.strip() != "-":
                    history.insert(0, {"role": "system", "content": rest.strip()})
                say(f"[system prompt: {history[0]['content']!r}]" if history and history[0]["role"] == "system"
                    else "[no system prompt]")
            elif command.startswith("/") and command[1:].isalpha():
                say(f"[unknown command {command}; /help lists them]")
            elif line.strip():
                history = chat_turn(loaded, engine, history, line, limit, args, term, say)
    except KeyboardInterrupt:  # the second Ctrl-C
        if info.is_rank0:
            print(flush=True)
    term.restore()
    cleanup()


def chat_turn(loaded, engine, history: list[dict], line: str, limit: int, args, term, say) -> list[dict]:
    """One user message and the model's answer; returns the history with both (or unchanged if interrupted)."""
    messages = history + [{"role": "user", "content": line}]
    try:
        ids, dropped = fit_history(loaded.tok, messages, limit, args.max_new_tokens)
    except ValueError as e:
        say(f"[{e}; message skipped]")
        return history
    if dropped:
        say(f"[dropped the {dropped} oldest turn(s) to fit --max_seq_len {limit}]")
    answer, stats = respond(loaded, engine, ids, args, term)
    if answer is None:
        say("[interrupted; answer dropped from the history]")
        return history
    say(dim(stats))
    return messages + [{"role": "assistant", "content": answer}]


if __name__ == "__main__":
    sys.exit(run(main))
