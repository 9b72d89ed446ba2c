"""Throughput of generate/serve.py under concurrent clients: tokens/s of the whole server, time to first token,
inter-token latency and request latency, for each concurrency level.

    python generate/bench_serve.py                                    # starts the server on the embedded SmolLM2
    python generate/bench_serve.py --concurrency 1,4,16 --max_batch_size 16 --max_tokens 32   # the issue's levels
    python generate/bench_serve.py --ckpt DIR --concurrency 1,8,32 --max_batch_size 32 --max_tokens 128
    python generate/bench_serve.py --url http://127.0.0.1:8000        # a server that is already running

Each client sends streamed chat requests back to back (greedy, a fixed answer length: "ignore" stop tokens by asking
for max_tokens and counting what comes back); concurrency 1 is the one-request baseline, so the ratio shows what
continuous batching gains.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a fresh checkout

from minillama.util.cli import ArgumentParser, positive_int, run  # noqa: E402

TASKS = ["Tell me a story about {}.", "Explain how {} works.", "Write a letter to a friend about {}.",
         "Describe {} in the morning.", "What makes {} good?", "Explain {} to a child."]
SUBJECTS = ["a lighthouse keeper", "a bicycle", "autumn", "a busy market", "a cup of tea", "photosynthesis",
            "a steam engine", "the tides", "a violin", "a beehive", "a snowstorm", "a library", "a volcano",
            "a sailing ship", "a clock", "a garden", "the moon", "a bakery", "a river", "a city bus"]


def prompt(i: int) -> str:
    """The i-th of 120 different user messages: every request of a run asks something new, so only the chat
    template's shared system prompt is a prefix the server can reuse, as with real users."""
    return TASKS[i % len(TASKS)].format(SUBJECTS[(i // len(TASKS)) % len(SUBJECTS)])


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--url", default=None, help="bench this running server instead of starting one")
    p.add_argument("--ckpt", "--model", dest="ckpt", default=None, help="checkpoint for the server it starts")
    p.add_argument("--concurrency", default="1,4,8", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests", type=int, default=16,
                   help="requests per concurrency level (at least one per client)")
    p.add_argument("--max_tokens", type=int, default=64, help="answer length asked for")
    p.add_argument("--max_batch_size", type=int, default=8, help="the started server's --max_batch_size")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="the started server's --threads (default: its own choice, from the idle cores, which the "
                        "load a previous run leaves in the 1-minute load average can lower: give it to compare runs)")
    p.add_argument("--server_args", default="", help="more flags for the started server, e.g. '--device cuda'")
    return p.parse_args(argv)


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py"), "--port", "0",
           "--max_batch_size", str(args.max_batch_size), *(["--ckpt", args.ckpt] if args.ckpt else []),
           *(["--threads", str(args.threads)] if args.threads else []),
           *args.server_args.split()]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        sys.stderr.write(line)
        if line.startswith("[serving "):
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep it drained
            return proc, line.split(" on ")[1].split()[0].rstrip("/")
    raise SystemExit(f"error: the server did not start (exit code {proc.wait()})")


def one_request(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, total seconds, tokens) of one streamed chat request; the inter-token latency is
    (total - first) / (tokens - 1)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0, first, tokens = time.perf_counter(), None, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0, tokens


def bench_level(url: str, model: str, clients: int, n: int, max_tokens: int, first: int) -> dict:
    """n requests (prompts first, first + 1, ...) from `clients` concurrent clients, after an untimed round of
    `clients` requests at this concurrency (the server's first batch of a new size is slower: allocation, kernels)."""
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda i: one_request(url, model, prompt(first + n + i), 4), range(clients)))  # warm-up
        t0 = time.perf_counter()
        results = list(pool.map(lambda i: one_request(url, model, prompt(first + i), max_tokens), range(n)))
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "requests": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(r[0] for r in results),
            "itl_p50_ms": 1e3 * statistics.median((r[1] - r[0]) / (r[2] - 1) for r in results if r[2] > 1),
            "latency_p50_s": statistics.median(r[1] for r in results)}


def main(argv=None):
    args = get_args(argv)
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args)
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
            model = json.loads(r.read())["data"][0]["id"]
        one_request(url, model, "Hi", 4)  # warm-up
        rows, first = [], 0
        for c in map(int, args.concurrency.split(",")):
            rows.append(bench_level(url, model, c, max(args.requests, c), args.max_tokens, first))
            first += max(args.requests, c) + c
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    base = rows[0]["tokens_per_s"]
    print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tokens/s':>9} {'x first':>7} "
          f"{'TTFT p50':>9} {'ITL p50':>9} {'latency p50':>11}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['tokens']:>7} {r['wall_s']:>7.1f} {r['tokens_per_s']:>9.1f} "
              f"{r['tokens_per_s'] / base:>7.2f} {r['ttft_p50_s']:>8.2f}s {r['itl_p50_ms']:>7.0f}ms "
              f"{r['latency_p50_s']:>10.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
