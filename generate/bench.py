"""Decode and prefill speed: minillama vs Hugging Face `generate` on the same random weights, as fractions of the
device's measured copy bandwidth (decode) and matmul peak (prefill).

    python generate/bench.py --shape llama3-8b                       # batch 1 and 8, prompts 128 and 8192
    python generate/bench.py --shape mixtral-8x7b --n_layers 8       # fewer layers so both copies fit
    python generate/bench.py --shape tiny --device cpu               # toy shapes, seconds on a laptop

Weights are random (speed does not depend on the values). Decode time per token is (t(N new) - t(1 new)) / (N - 1),
so prefill is excluded; prefill time is t(1 new). Bytes per decode step = every weight a step reads + the KV cache.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minillama import ModelArgs, Transformer, save_hf  # noqa: E402
from minillama.cli import ArgumentParser, run  # noqa: E402
from minillama.dtypes import DTYPE_NAMES, parse_dtype  # noqa: E402
from minillama.generation import generate  # noqa: E402
from minillama.training.perf import (decode_bytes_per_step, forward_flops, measure_copy_bandwidth,  # noqa: E402
                            measure_matmul_peak, time_fn)

TINY = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=4096, hidden_dim=512, max_seq_len=16384,
            rope_theta=500000.0, family="llama3")


def get_args():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="llama3-8b", help="a ModelArgs preset name (llama3-8b, mixtral-8x7b, ...) or 'tiny'")
    p.add_argument("--n_layers", type=int, default=None, help="override the layer count (say so when reporting)")
    p.add_argument("--batch_sizes", default="1,8")
    p.add_argument("--prompt_lens", default="128,8192")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs)")
    p.add_argument("--no_hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--iters", type=int, default=3, help="timed repetitions (median reported)")
    return p.parse_args()


def model_args(shape: str, n_layers) -> ModelArgs:
    over = {"n_layers": n_layers} if n_layers else {}
    if shape == "tiny":
        return ModelArgs(**{**TINY, **over})
    return ModelArgs.from_name(shape, **over)


def random_model(args: ModelArgs, dtype: torch.dtype, device: torch.device) -> Transformer:
    """The real shape with small random weights, allocated directly in dtype on the device."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        if p.dim() > 1:
            p.data.normal_(0.0, 0.02, generator=gen)
        else:
            p.data.fill_(1.0)
    model.reset_rope(device)
    model.tie_weights()
    return model.eval()


def time_generate(run, max_new_tokens: int, device, iters: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per step) from runs of 1 and max_new_tokens new tokens."""
    t1 = time_fn(lambda: run(1), device, warmup=1, iters=iters)
    tn = time_fn(lambda: run(max_new_tokens), device, warmup=1, iters=iters)
    if tn <= t1:  # timing noise swamped the decode steps (toy shapes): charge the whole run to decoding
        return t1, tn / max_new_tokens
    return t1, (tn - t1) / (max_new_tokens - 1)


def bench_ours(model, batch, prompt_len, new, device, compile, iters):
    prompts = torch.randint(0, model.args.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    prompts = prompts.tolist()

    @torch.inference_mode()
    def run(n):
        out = generate(model, prompts, max_new_tokens=n, compile=compile, check_every=1 << 30)
        assert all(len(o) == n for o in out), "a row stopped early: the timing would be wrong"

    return time_generate(run, new, device, iters)


def bench_hf(hf, batch, prompt_len, new, device, vocab, iters):
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def run(n):
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=0, eos_token_id=None)

    return time_generate(run, new, device, iters)


def main():
    a = get_args()
    device, dtype = torch.device(a.device), parse_dtype(a.dtype)
    args = model_args(a.shape, a.n_layers)
    batches = [int(x) for x in a.batch_sizes.split(",")]
    prompt_lens = [int(x) for x in a.prompt_lens.split(",")]
    bw = measure_copy_bandwidth(device, mbytes=1024 if device.type == "cuda" else 128)
    peak = measure_matmul_peak(device, dtype, n=8192 if device.type == "cuda" else 512)
    bytes_per = torch.tensor([], dtype=dtype).element_size()
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(f"shape: {a.shape} ({args.n_layers} layers), {a.dtype}; copy bandwidth {bw / 1e9:.0f} GB/s, "
          f"{a.dtype} matmul peak {peak / 1e12:.1f} TFLOP/s")

    cases = [(b, p) for b in batches for p in prompt_lens if p + a.max_new_tokens <= args.max_seq_len]
    model = random_model(args, dtype, device)
    ours = {c: bench_ours(model, *c, a.max_new_tokens, device, a.compile, a.iters) for c in cases}
    hf_times = {}
    if not a.no_hf:
        from transformers import AutoModelForCausalLM
        with tempfile.TemporaryDirectory() as tmp:  # the same weights, through the public save path
            save_hf(model, tmp)
            del model
            gc.collect()
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        hf_times = {c: bench_hf(hf, *c, a.max_new_tokens, device, args.vocab_size, a.iters) for c in cases}

    print(f"\n{'batch':>5} {'prompt':>6} | {'tok/s':>8} {'ms/tok':>7} {'GB/s':>7} {'%bw':>5} | "
          f"{'HF tok/s':>8} {'HF %bw':>6} | {'x HF':>5} | {'prefill ms':>10} {'%peak':>6} {'HF prefill':>10}")
    for (b, p), (t_pre, t_tok) in ours.items():
        step_bytes = decode_bytes_per_step(args, b, p + a.max_new_tokens // 2, bytes_per, bytes_per)
        gbs = step_bytes / t_tok
        pre_flops = forward_flops(args, b * p, p)
        line = (f"{b:>5} {p:>6} | {b / t_tok:>8.1f} {t_tok * 1e3:>7.2f} {gbs / 1e9:>7.0f} {100 * gbs / bw:>5.1f} | ")
        if (b, p) in hf_times:
            h_pre, h_tok = hf_times[(b, p)]
            line += f"{b / h_tok:>8.1f} {100 * step_bytes / h_tok / bw:>6.1f} | {h_tok / t_tok:>5.2f} | "
        else:
            h_pre = None
            line += f"{'-':>8} {'-':>6} | {'-':>5} | "
        line += f"{t_pre * 1e3:>10.1f} {100 * pre_flops / t_pre / peak:>6.1f} "
        line += f"{h_pre * 1e3:>10.1f}" if h_pre else f"{'-':>10}"
        print(line)
    print("\n%bw: bytes a decode step must read (weights + KV cache at mid-generation) / step time, over the copy "
          "bandwidth.\n%peak: prefill matmul FLOPs (incl. causal attention) / prefill time, over the measured peak.")


if __name__ == "__main__":
    sys.exit(run(main))
