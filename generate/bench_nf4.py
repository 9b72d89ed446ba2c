"""NF4 inference on CPU, the whole-weight path against the one that never forms the float weight, in one process.

    OMP_NUM_THREADS=1 python generate/bench_nf4.py --threads 1            # the embedded SmolLM2-135M, float32

"old" is what every NF4 matmul did before (and QLoRA training still does): the whole weight dequantized, then
F.linear (quant._NF4Matmul). "new" is quant.nf4_inference_linear, what nf4_linear runs under no_grad on CPU: the
compiled fused matvec for one row, row blocks otherwise. The two alternate round by round, so a load that drifts
hits both alike. Reported: one pass over every NF4 linear with 1 row (a decode step) and --prefill rows, and the
end-to-end batch-1 decode ms/token ((t(N new) - t(1 new)) / (N - 1), as generate/bench.py takes it). Not a test:
quote the numbers with the command, the CPU and the load average.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from generate.bench import ours_runner, time_generate  # noqa: E402
from minillama import quant  # noqa: E402
from minillama.checkpoints import load_model  # noqa: E402
from minillama.tokenizer.tokenizer import load_tokenizer  # noqa: E402
from minillama.util.cli import DEFAULT_CKPT, ArgumentParser, positive_int, run  # noqa: E402

PATHS = {"old": lambda x, w, index=None: quant._NF4Matmul.apply(x, w, index), "new": quant.nf4_inference_linear}


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", "--model", dest="ckpt", default=str(DEFAULT_CKPT),
                   help="checkpoint dir (default: the embedded SmolLM2)")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads")
    p.add_argument("--rounds", type=positive_int, default=5, help="alternating rounds (median reported)")
    p.add_argument("--prefill", type=positive_int, default=8, help="rows of the prefill-shaped pass")
    p.add_argument("--new_tokens", type=positive_int, default=16, help="decode steps timed end to end")
    return p.parse_args(argv)


def linears_pass(model, rows: int, rounds: int) -> dict:
    """Median ms of one pass over every NF4 linear with `rows` input rows, per path."""
    lins = [m for m in model.modules() if isinstance(m, quant.NF4Linear)]
    xs = {m.in_features: torch.randn(rows, m.in_features) for m in lins}
    times = {name: [] for name in PATHS}
    with torch.no_grad():
        for m in lins:  # warm-up: the compiled kernel is built once per weight shape
            PATHS["new"](xs[m.in_features], m.weight)
        for _ in range(rounds):
            for name, fn in PATHS.items():
                t = time.perf_counter()
                for m in lins:
                    fn(xs[m.in_features], m.weight)
                times[name].append(1e3 * (time.perf_counter() - t))
    return {name: statistics.median(v) for name, v in times.items()}


def decode(model, prompt: list[int], a) -> dict:
    """Median batch-1 decode ms/token per path, swapping the path nf4_linear calls."""
    runner = ours_runner(model, [prompt], a.new_tokens, False)
    times = {name: [] for name in PATHS}
    try:
        for _ in range(a.rounds):
            for name, fn in PATHS.items():
                quant.nf4_inference_linear = fn
                times[name].append(1e3 * time_generate(runner, a.new_tokens, torch.device("cpu"), 1)[1])
    finally:
        quant.nf4_inference_linear = PATHS["new"]
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None):
    a = get_args(argv)
    torch.set_num_threads(a.threads)
    model = load_model(a.ckpt, quantize="nf4")
    n = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, quant.NF4Linear))
    print(f"{a.ckpt} --quantize nf4 (float32): {n / 1e6:.1f}M NF4 weights; {a.threads} threads; torch "
          f"{torch.__version__}; load average {os.getloadavg()[0]:.2f}", flush=True)
    for rows in (1, a.prefill):
        t = linears_pass(model, rows, a.rounds)
        print(f"all NF4 linears, {rows} row(s): old {t['old']:.1f} ms, new {t['new']:.1f} ms "
              f"({t['old'] / t['new']:.2f}x); load {os.getloadavg()[0]:.2f}", flush=True)
    prompt = load_tokenizer(a.ckpt).encode("The capital of France is a city that")[:8]
    t = decode(model, prompt, a)
    print(f"batch-1 decode, {len(prompt)}-token prompt, {a.new_tokens} new: old {t['old']:.1f} ms/token, new "
          f"{t['new']:.1f} ms/token ({t['old'] / t['new']:.2f}x); load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(run(main))
