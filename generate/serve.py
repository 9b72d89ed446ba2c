"""An OpenAI-compatible HTTP server with a chat page: every request shares one continuous-batching loop.

    python generate/serve.py                                   # the embedded SmolLM2; open http://127.0.0.1:8000/
    python generate/serve.py --ckpt DIR --adapter reviews=out/sft/final --max_batch_size 16 --max_seq_len 4096
    torchrun --nproc_per_node 8 generate/serve.py --ckpt Llama-3.1-70B-Instruct/   # tensor parallel, rank 0 serves

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions (both with "stream": true as server-sent
events), GET /health, GET /metrics (Prometheus), and GET / (the chat page). A request's "model" is the base model's name or an adapter's; the
fields it leaves out (temperature, top_p, top_k, repetition_penalty, max_tokens) take this server's flags, whose
defaults come from the checkpoint's generation_config.json. A new request joins the running batch at the next decode
step, a finished, stopped (stop string) or abandoned (client gone) one frees its row; a free row keeps its tokens,
so a request that continues an earlier conversation is prefilled only after the part its row holds.
Needs the serve extra: pip install -e '.[serve]'.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a fresh checkout

from minillama.util.cli import ArgumentParser, is_rank0, positive_int, run
from minillama.tools.flags import add_model_args, add_sampling_args, context_limit, engine_config, load_from_args, parse_args, resolve_checkpoint, sampling_params, set_help
from minillama.util.distributed import cleanup  # noqa: E402
from minillama.inference.constraints import grammar_vocab  # noqa: E402
from minillama.inference.engine import Engine  # noqa: E402
from minillama.lora.slots import set_row_adapters

DEFAULT_MAX_SEQ_LEN = 4096  # the KV cache holds --max_batch_size x --max_seq_len tokens; a 128K context would not fit


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    add_model_args(p)
    add_sampling_args(p, temperature=0.6, top_p=0.9, max_new_tokens=None)
    set_help(p, "adapter", "LoRA/DoRA adapter dir (PEFT layout), served beside the base model as NAME (NAME=DIR; "
                           "default NAME: the dir's name); repeat for several: one batch mixes them (single process; "
                           "tensor parallel serves one adapter, merged)")
    set_help(p, "max_seq_len", "prompt + answer tokens per request, the KV cache's length (default: "
                               f"generation_config.json's max_length, else min(the model's context, "
                               f"{DEFAULT_MAX_SEQ_LEN}))")
    set_help(p, "max_new_tokens", "max_tokens for requests that give none")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one, printed at start)")
    p.add_argument("--max_batch_size", "--batch_size", type=positive_int, default=8,
                   help="requests decoded together (KV cache rows); more wait for a free row")
    p.add_argument("--model_name", default=None, help="the base model's name in the API (default: the --ckpt dir's "
                                                      "name)")
    p.add_argument("--log_requests", action="store_true", help="also uvicorn's access log (one line per request "
                                                                "with id, tokens and time is always logged)")
    p.add_argument("--api_key", default=os.environ.get("MINILLAMA_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every route but /health and the chat page (default: "
                        "$MINILLAMA_API_KEY; unset: no key)")
    return parse_args(p, argv)


def name_adapters(adapters: Optional[list]) -> list[tuple[str, str]]:
    """--adapter's (name, dir) pairs as served: NAME=DIR keeps NAME, a bare DIR is served as the dir's name."""
    named = [(Path(path.rstrip("/")).name if name == "default" else name, path) for name, path in adapters or ()]
    names = [name for name, _ in named]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--adapter: two adapters would be served as {twice[0]!r}; name them as NAME=DIR")
    return named


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model is served so a busy port is a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(128)
    return sock


def main(argv=None):
    args = get_args(argv)
    try:
        import uvicorn  # noqa: F401
        from minillama.serve.app import create_app
    except ImportError as e:
        raise ValueError(f"the server needs FastAPI and uvicorn ({e}); install them: pip install -e '.[serve]'")
    from minillama.serve.protocol import Served
    from minillama.serve.worker import BatchLoop, follow
    named = name_adapters(args.adapter)
    adapters = [name for name, _ in named]
    ckpt, _ = resolve_checkpoint(args)
    if (args.model_name or ckpt.name) in adapters:
        raise ValueError(f"--adapter: {args.model_name or ckpt.name!r} is the base model's name; name the adapter "
                         "NAME=DIR or give --model_name")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    sock = listen(args.host, args.port) if is_rank0() else None
    loaded = load_from_args(args, log=log, merge_adapter=False, adapters=named)  # unmerged: the base model stays servable
    info, tok, model = loaded.dist, loaded.tok, loaded.model
    limit = context_limit(args, model, default=min(model.args.max_seq_len, DEFAULT_MAX_SEQ_LEN))
    merged = bool(adapters) and info.world_size > 1  # tensor parallel serves its one adapter merged in
    config = engine_config(args, loaded, batch_size=args.max_batch_size, cache_len=limit,
                           pad_id=tok.pad_id or 0, reuse_prefix=True,
                           # CUDA graphs are recorded per batch shape: decode every row; on CPU the compiled step
                           # takes any batch size, so a step runs only the rows up to the last busy one
                           fixed_batch=args.compile and model.tok_embeddings.weight.device.type == "cuda")
    engine = Engine(model, config, row_adapters=set_row_adapters if adapters and not merged else None,  # mixed
                    grammar=lambda: grammar_vocab(tok))  # response_format / forced tool calls, built on first use
    if not info.is_rank0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 says when serving ends
        follow(engine, info)
        cleanup()
        return
    served = Served(tok, args.model_name or ckpt.name, adapters, not merged, limit,
                    sampling_params(args), args.max_new_tokens, constrained=config.speculate is None)
    loop = BatchLoop(engine, info)
    host, port = sock.getsockname()[:2]
    log(f"[serving {', '.join(served.model_names())} on http://{host}:{port}/ ({args.max_batch_size} rows of "
        f"{limit} tokens, {info.world_size} process(es)); Ctrl-C stops]")
    server = uvicorn.Server(uvicorn.Config(create_app(served, loop, args.api_key, log), log_level="warning",
                                           access_log=args.log_requests, timeout_graceful_shutdown=3))
    http = threading.Thread(target=serve_http, args=(server, sock, loop), name="minillama-http", daemon=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_http(server))
    http.start()
    try:
        loop.run()  # the engine on the main thread (see serve/worker.py: MKL runs small matmuls slower elsewhere)
    finally:
        stop_http(server)
        http.join(10)
        cleanup()


def serve_http(server, sock: socket.socket, loop) -> None:
    """The HTTP server's thread: serve until told to exit, then stop the engine loop (its requests end first, within
    uvicorn's graceful-shutdown timeout)."""
    try:
        server.run(sockets=[sock])
    finally:
        loop.stop()


def stop_http(server) -> None:
    """Ctrl-C / SIGTERM (on the main thread): the HTTP server shuts down gracefully; a second one forces it."""
    if server.should_exit:
        server.force_exit = True
    server.should_exit = True


if __name__ == "__main__":
    sys.exit(run(main))
