"""Generation speed: decode and prefill of minillama vs Hugging Face `generate` at the real shapes, as fractions of
the device's measured copy bandwidth (decode) and matmul peak (prefill); and the long-prompt batch workload
through continuous batching (generate/batch.py's engine), with an extrapolation to a larger job.

    python generate/bench.py --shape llama3-8b                          # batch 1 and 8, prompts 128 and 8192
    python generate/bench.py --shape llama3-8b --impls ours_compile     # the compiled (CUDA-graph) decode step
    python generate/bench.py --shape llama3-8b --impls hf,hf_static     # transformers: sdpa, static cache + compile
    python generate/bench.py --shape llama3-8b --impls ours,ours_compile --quantize int4   # weight-only int4
    python generate/bench.py --shape mixtral-8x7b --workload            # 32 prompts of 8K, 512 new tokens each
    python generate/bench.py --shape tiny --device cpu --dtype float32  # toy shapes, seconds on a laptop
    python generate/bench.py --engine --device cpu --dtype float32      # the engine on the embedded SmolLM2:
                                  # a decode step with 256 vs 4096 cache slots; prompt-lookup speculative decoding
                                  # (add --draft_ckpt DIR: also a draft model's)

Weights are random (speed does not depend on the values); HF's model has its own random weights. Decode time per
token is (t(N new) - t(1 new)) / (N - 1), so prefill is excluded; prefill time is t(1 new). Bytes per decode step =
every weight a step reads + the KV cache at mid-generation. --json adds every figure to a results file as soon
as it is measured (see minillama/tools/benchmarks.py); the targets of the performance issue are printed at the end.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minillama import ModelArgs  # noqa: E402
from minillama.tools import benchmarks as bm  # noqa: E402
from minillama.util.cli import ArgumentParser, positive_int, run  # noqa: E402
from minillama.util.dtypes import DTYPE_NAMES, parse_dtype  # noqa: E402
from minillama.inference.engine import EngineConfig  # noqa: E402
from minillama.inference.generate import generate, generate_continuous  # noqa: E402
from minillama.perf import decode_bytes_per_step, forward_flops, stored_weight_bytes, time_fn  # noqa: E402
from minillama.weight_only import QUANTIZE_NAMES, quantize_model_  # noqa: E402

TINY = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=4096, hidden_dim=512, max_seq_len=16384,
            rope_theta=500000.0, family="llama3")
TINY_MOE = dict(TINY, n_experts=8, n_experts_per_tok=2, family="mixtral")
IMPLS = ("ours", "ours_compile", "hf", "hf_static")


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="llama3-8b",
                   help="a ModelArgs preset name (llama3-8b, mixtral-8x7b, ...), or 'tiny' / 'tiny-moe'")
    p.add_argument("--n_layers", type=positive_int, default=None,
                   help="fewer layers than the preset (the output says so)")
    p.add_argument("--batch_sizes", default="1,8", help="comma-separated batch sizes to time")
    p.add_argument("--prompt_lens", default="128,8192", help="comma-separated prompt lengths to time")
    p.add_argument("--max_new_tokens", type=positive_int, default=128, help="decode steps timed per case")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="weight and compute dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--impls", default="ours,ours_compile,hf",
                   help=f"comma list of {', '.join(IMPLS)} (hf_static: static cache, compiled by generate on GPU)")
    p.add_argument("--quantize", default=None, choices=QUANTIZE_NAMES,
                   help="weight-only quantize our model (ours, ours_compile; reported as ours+int4, ...) after it is "
                        "built, in --dtype otherwise; its bytes per step are the stored codes and scales. HF stays in "
                        "--dtype (default: none)")
    p.add_argument("--iters", type=positive_int, default=2, help="timed repetitions (median reported)")
    p.add_argument("--json", default=None, help="add every figure to this results file as it is measured")
    p.add_argument("--profile", default=None,
                   help="append torch.profiler's kernel table of each impl's batch-1, shortest-prompt case here")
    w = p.add_argument_group("the long-prompt workload (--workload)")
    w.add_argument("--workload", action="store_true",
                   help="time continuous batching over --n_prompts prompts instead of the decode cases")
    w.add_argument("--n_prompts", type=positive_int, default=32, help="prompts in the workload")
    w.add_argument("--prompt_len", type=positive_int, default=8192, help="tokens per workload prompt")
    w.add_argument("--new_tokens", type=positive_int, default=512, help="tokens generated for every prompt")
    w.add_argument("--batch_size", type=positive_int, default=32, help="cache rows decoded together")
    w.add_argument("--compile", action="store_true", help="compile the workload's decode step")
    w.add_argument("--extrapolate", default="285,12288,1024",
                   help="N,PROMPT,NEW: also estimate (not measure) the time of N prompts of PROMPT tokens, NEW each")
    e = p.add_argument_group("the engine on a real checkpoint (--engine)")
    e.add_argument("--engine", action="store_true",
                   help="time a decode step at a short context with 256 vs 4096 cache slots, and prompt-lookup "
                        "speculative decoding on a review-like prompt (a document in, an answer quoting it)")
    e.add_argument("--ckpt", "--model", dest="ckpt", default=None,
                   help="checkpoint for --engine (default: the embedded SmolLM2)")
    e.add_argument("--rows", type=positive_int, default=16, help="rows decoded together in the cache-size case")
    e.add_argument("--draft_tokens", type=positive_int, default=8, help="drafts per step in the speculative case")
    e.add_argument("--draft_ckpt", default=None, metavar="DIR",
                   help="also time speculative decoding with this draft model (sharing --ckpt's tokenizer) on the "
                        "review-like prompt (default: none)")
    a = p.parse_args(argv)
    bad = set(a.impls.split(",")) - set(IMPLS)
    if bad:
        p.error(f"--impls: unknown {sorted(bad)}; choose from {', '.join(IMPLS)}")
    return a


def model_args(shape: str, n_layers) -> ModelArgs:
    over = {"n_layers": n_layers} if n_layers else {}
    if shape in ("tiny", "tiny-moe"):
        return ModelArgs(**{**(TINY if shape == "tiny" else TINY_MOE), **over})
    return ModelArgs.from_name(shape, **over)


def random_prompts(n: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()


def time_generate(run, max_new_tokens: int, device, iters: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per step) from runs of 1 and max_new_tokens new tokens."""
    t1 = time_fn(lambda: run(1), device, warmup=1, iters=iters)
    tn = time_fn(lambda: run(max_new_tokens), device, warmup=1, iters=iters)
    if tn <= t1:  # timing noise swamped the decode steps (toy shapes): charge the whole run to decoding
        return t1, tn / max_new_tokens
    return t1, (tn - t1) / (max_new_tokens - 1)


def ours_runner(model, prompts, max_new_tokens: int, compile: bool):
    # this case's own cache, allocated once: a new one per run would move the addresses the CUDA graph was
    # recorded with
    model.setup_cache(len(prompts), len(prompts[0]) + max_new_tokens)
    config = EngineConfig(compile=compile, sync_every=1 << 30, prefill_chunk=len(prompts) * len(prompts[0]))

    @torch.inference_mode()
    def run(n):
        out = generate(model, prompts, max_new_tokens=n, config=config)
        assert all(len(o) == n for o in out), "a row stopped early: the timing would be wrong"
    return run


def hf_runner(hf, prompts, max_new_tokens: int, static: bool):
    ids = torch.tensor(prompts, device=hf.device)
    mask = torch.ones_like(ids)
    # one static cache size for the 1- and N-token runs: a new size would make generate recompile its step
    extra = {"cache_implementation": "static", "max_cache_len": ids.shape[1] + max_new_tokens} if static else {}

    @torch.inference_mode()
    def run(n):
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=0, eos_token_id=None, **extra)
    return run


def decode_record(args, a, ceil, impl, batch, prompt, t_pre, t_tok, weights=None) -> dict:
    """Tokens/s and the fractions of the floors, with everything needed to read them. weights: the bytes of the
    weights as stored (a quantized model's), else those of args' parameters in --dtype."""
    bytes_per = torch.tensor([], dtype=parse_dtype(a.dtype)).element_size()
    step_bytes = decode_bytes_per_step(args, batch, prompt + a.max_new_tokens // 2,
                                       bytes_per if weights is None else 0, bytes_per) + (weights or 0)
    pre_flops = forward_flops(args, batch * prompt, prompt)
    bw, peak = ceil["copy_GBps"] * 1e9, ceil["matmul_TFLOPs"] * 1e12
    return {"impl": impl, "shape": a.shape, **bm.layers_note(args, a.shape), "dtype": a.dtype, "batch": batch,
            "prompt": prompt, "new_tokens": a.max_new_tokens, "tokens_per_s": batch / t_tok,
            "ms_per_token": 1e3 * t_tok, "GBps": step_bytes / t_tok / 1e9,
            "pct_bandwidth": 100 * step_bytes / t_tok / bw,
            "floor_tokens_per_s": batch * bw / step_bytes, "prefill_ms": 1e3 * t_pre,
            "prefill_pct_peak": 100 * pre_flops / t_pre / peak, "prefill_floor_ms": 1e3 * pre_flops / peak, **ceil}


def print_decode_row(r: dict):
    print(f"{r['impl']:<17} {r['batch']:>5} {r['prompt']:>6} | {r['tokens_per_s']:>8.1f} {r['ms_per_token']:>7.2f} "
          f"{r['GBps']:>7.0f} {r['pct_bandwidth']:>5.1f} {r['floor_tokens_per_s']:>8.1f} | "
          f"{r['prefill_ms']:>10.1f} {r['prefill_pct_peak']:>6.1f}", flush=True)


def bench_decode(a, args, device, dtype, ceil):
    """Every (impl, batch, prompt) case; ours first (then freed), then HF's."""
    impls = a.impls.split(",")
    batches, prompt_lens = (int(x) for x in a.batch_sizes.split(",")), [int(x) for x in a.prompt_lens.split(",")]
    cases = [(b, p) for b in batches for p in prompt_lens if p + a.max_new_tokens <= args.max_seq_len]
    print(f"\n{'impl':<17} {'batch':>5} {'prompt':>6} | {'tok/s':>8} {'ms/tok':>7} {'GB/s':>7} {'%bw':>5} "
          f"{'floor':>8} | {'prefill ms':>10} {'%peak':>6}")
    rows = {}
    for group in (("ours", "ours_compile"), ("hf", "hf_static")):
        wanted = [i for i in impls if i in group]
        if not wanted:
            continue
        model = bm.random_model(args, dtype, device) if group[0] == "ours" else bm.hf_model(args, dtype, device)
        quantized = group[0] == "ours" and a.quantize is not None
        if quantized:
            quantize_model_(model, a.quantize)
        weights = stored_weight_bytes(model) if quantized else None
        for impl in wanted:
            name = f"{impl}+{a.quantize}" if quantized else impl
            for b, p in cases:
                prompts = random_prompts(b, p, args.vocab_size)
                run = (ours_runner(model, prompts, a.max_new_tokens, impl == "ours_compile") if group[0] == "ours"
                       else hf_runner(model, prompts, a.max_new_tokens, impl == "hf_static"))
                r = decode_record(args, a, ceil, name, b, p, *time_generate(run, a.max_new_tokens, device, a.iters),
                                  weights=weights)
                rows[(name, b, p)] = r
                bm.record(a.json, "decode", f"{name}|b{b}|p{p}", r)
                print_decode_row(r)
                if b == 1 and p == min(prompt_lens):
                    bm.profile_to(a.profile, f"decode {name} {a.shape} batch {b} prompt {p}, {a.max_new_tokens} new",
                                  lambda: run(a.max_new_tokens), device)
        if group[0] == "ours":
            model.clear_cache()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for (impl, b, p), r in rows.items():
        hf = rows.get(("hf", b, p))
        if impl != "hf" and hf:
            print(f"{impl} batch {b} prompt {p}: {r['tokens_per_s'] / hf['tokens_per_s']:.2f}x HF eager decode")
    print("\n%bw: bytes a decode step must read (weights + KV cache at mid-generation) / step time, over the copy "
          "bandwidth; floor: the tokens/s that bandwidth allows.\n%peak: prefill matmul FLOPs (incl. causal "
          "attention) / prefill time, over the measured matmul peak.")


class PrefillClock:
    """Times the prefills (forwards of more than one token) inside a run without adding syncs: CUDA events on GPU."""

    def __init__(self, model, device):
        self.model, self.cuda, self.spans = model, device.type == "cuda", []

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __enter__(self):
        forward = self.model.forward

        def timed(tokens, *args, **kwargs):
            if tokens.shape[1] == 1:  # a decode step (also what a compiled step traces: this branch only)
                return forward(tokens, *args, **kwargs)
            start = self._mark()
            out = forward(tokens, *args, **kwargs)
            self.spans.append((start, self._mark()))
            return out

        self.model.forward = timed
        return self

    def __exit__(self, *exc):
        del self.model.forward  # the class's forward again

    def seconds(self) -> float:
        if not self.cuda:
            return sum(end - start for start, end in self.spans)
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.spans) / 1e3


def rows_that_fit(args: ModelArgs, device, seq_len: int, bytes_per: int, batch: int) -> int:
    """Cache rows of seq_len slots that fit beside the weights in the device's memory (batch itself on CPU)."""
    if device.type != "cuda":
        return batch
    from minillama.perf import param_counts

    free = torch.cuda.get_device_properties(device).total_memory - param_counts(args)["total"] * bytes_per - 8 * 2**30
    per_row = 2 * args.n_layers * args.n_kv_heads * args.head_dim * seq_len * bytes_per  # k and v, every layer
    return max(1, min(batch, int(free // per_row)))


def extrapolate(args: ModelArgs, a, measured: dict, device, bytes_per: int) -> dict:
    """Estimate (not measure) the time of the --extrapolate job from this run's prefill FLOP rate and decode bytes/s.

    Prefill: its FLOPs (minillama.perf.forward_flops, causal attention included) at the FLOP rate the
    measured prefills reached. Decode: steps = prompts x new / rows (continuous batching keeps rows busy), each
    reading the weights + the rows' KV cache at mid-answer, at the bytes/s the measured decode reached. Rows: the
    measured batch, or fewer if their longer cache would not fit in this device's memory.
    """
    n, prompt, new = (int(x) for x in a.extrapolate.split(","))
    rows = rows_that_fit(args, device, prompt + new, bytes_per, a.batch_size)
    prefill = n * forward_flops(args, prompt, prompt) / measured["prefill_flops_per_s"]
    steps = math.ceil(n * new / rows)
    decode = steps * decode_bytes_per_step(args, rows, prompt + new // 2, bytes_per, bytes_per) / measured["decode_Bps"]
    note = "" if prompt + new <= args.max_seq_len else (f"; {prompt + new} tokens exceed this preset's context of "
                                                        f"{args.max_seq_len} (assumes a long-context variant)")
    return {"extrapolated_job": {"prompts": n, "prompt_len": prompt, "new_tokens": new, "rows": rows},
            "extrapolated_prefill_s": prefill, "extrapolated_decode_s": decode,
            "extrapolated_minutes": (prefill + decode) / 60,
            "extrapolation_basis": "prefill FLOP rate and decode bytes/s measured in this run" + note}


def bench_workload(a, args, device, dtype, ceil):
    """generate_continuous over n_prompts random prompts (greedy, no stop token: every answer runs to new_tokens)."""
    bytes_per = torch.tensor([], dtype=dtype).element_size()
    model = bm.random_model(args, dtype, device)
    prompts = random_prompts(a.n_prompts, a.prompt_len, args.vocab_size)
    B = min(a.batch_size, a.n_prompts)
    with PrefillClock(model, device) as clock:  # installed first: the compiled step sees the same model twice
        warm = random_prompts(B, 16, args.vocab_size, seed=2)  # kernels (and the compiled step) before timing
        list(generate_continuous(model, warm, 4, config=EngineConfig(batch_size=B, compile=a.compile)))
        model.setup_cache(B, a.prompt_len + a.new_tokens)
        clock.seconds()
        clock.spans.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        config = EngineConfig(batch_size=B, compile=a.compile)
        done = [(i, len(out)) for i, out, _ in generate_continuous(model, prompts, a.new_tokens, config=config)]
        prefill_s = clock.seconds()
        wall = time.perf_counter() - t0
    assert len(done) == a.n_prompts and all(n == a.new_tokens for _, n in done), "an answer stopped early"
    decode_s = max(wall - prefill_s, 1e-9)
    out_tokens, in_tokens = a.n_prompts * a.new_tokens, a.n_prompts * a.prompt_len
    steps = math.ceil(out_tokens / B)
    measured = {
        "prefill_flops_per_s": a.n_prompts * forward_flops(args, a.prompt_len, a.prompt_len) / prefill_s,
        "decode_Bps": steps * decode_bytes_per_step(args, B, a.prompt_len + a.new_tokens // 2, bytes_per,
                                                    bytes_per) / decode_s}
    r = {"shape": a.shape, **bm.layers_note(args, a.shape), "dtype": a.dtype, "compile": a.compile,
         "prompts": a.n_prompts, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "batch_size": B,
         "wall_s": wall, "prefill_s": prefill_s, "decode_s": decode_s, "output_tokens_per_s": out_tokens / wall,
         "prompt_tokens_per_s": in_tokens / prefill_s, "decode_tokens_per_s": out_tokens / decode_s,
         "prefill_pct_peak": 100 * measured["prefill_flops_per_s"] / (ceil["matmul_TFLOPs"] * 1e12),
         "decode_pct_bandwidth": 100 * measured["decode_Bps"] / (ceil["copy_GBps"] * 1e9),
         "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
         **measured, **ceil}
    r.update(extrapolate(args, a, measured, device, bytes_per))
    bm.record(a.json, "workload", "run", r)
    cut = f" (layers cut to {args.n_layers} of {r['real_n_layers']})" if r["layers_cut"] else ""
    print(f"\nworkload: {a.n_prompts} prompts x {a.prompt_len} tokens, {a.new_tokens} new each, {B} rows, "
          f"{a.shape}{cut} {a.dtype}{' compiled' if a.compile else ''}")
    print(f"  wall {wall:.1f} s: prefill {prefill_s:.1f} s ({r['prompt_tokens_per_s']:.0f} prompt tok/s, "
          f"{r['prefill_pct_peak']:.0f}% of matmul peak), decode {decode_s:.1f} s "
          f"({r['decode_tokens_per_s']:.0f} tok/s, {r['decode_pct_bandwidth']:.0f}% of copy bandwidth)")
    print(f"  output tokens/s over the whole run: {r['output_tokens_per_s']:.1f}")
    job = r["extrapolated_job"]
    print(f"  EXTRAPOLATED, not measured: {job['prompts']} prompts x {job['prompt_len']} tokens with "
          f"{job['new_tokens']}-token answers on {job['rows']} rows: prefill {r['extrapolated_prefill_s'] / 60:.1f} min"
          f" + decode {r['extrapolated_decode_s'] / 60:.1f} min = {r['extrapolated_minutes']:.1f} min "
          f"({r['extrapolation_basis']})")


def main(argv=None):
    a = get_args(argv)
    device, dtype = torch.device(a.device), parse_dtype(a.dtype)
    args = model_args(a.shape, a.n_layers)
    ceil = bm.ceilings(device, dtype)
    note = bm.layers_note(args, a.shape)
    cut = f", layers cut to {args.n_layers} of {note['real_n_layers']}" if note["layers_cut"] else ""
    print(f"device: {bm.device_name(device)}, torch {torch.__version__}")
    print(f"shape: {a.shape} ({args.n_layers} layers{cut}), {a.dtype}; copy bandwidth {ceil['copy_GBps']:.0f} GB/s, "
          f"{a.dtype} matmul peak {ceil['matmul_TFLOPs']:.1f} TFLOP/s", flush=True)
    if a.engine:
        from importlib import import_module  # generate/ in a checkout, minillama.recipes.generate installed
        import_module(f"{__package__ or 'generate'}.bench_engine").bench_engine(a, device)
    elif a.workload:
        bench_workload(a, args, device, dtype, ceil)
    else:
        bench_decode(a, args, device, dtype, ceil)
    if a.json:
        print("\n" + bm.format_targets(bm.target_rows(bm.load(a.json))))


if __name__ == "__main__":
    sys.exit(run(main))
