"""Deployment speed and accuracy of a real checkpoint on this machine: bs1 decode of minillama (bf16, int8, int4)
next to transformers (bf16) and llama.cpp (llama-cpp-python: f16, q8_0, q4_0 of our own GGUF export), each as a
fraction of the copy bandwidth measured in the same run; and the perplexity of int8/int4 against bf16.

    python generate/bench_deploy.py                                    # the embedded SmolLM2-135M, 2 threads
    python generate/bench_deploy.py --ckpt CKPT --threads 8 --impls ours_bf16,ours_int4,llama_q4_0 --json r.json

Decode seconds per token are (t(N new) - t(1 new)) / (N - 1), as generate/bench.py takes them (prefill excluded).
Bytes per step = the bytes of every weight a step reads as stored (int8/int4 codes and scales, the GGUF's tensors;
the embedding table only where it is the head) + the KV cache at mid-generation in 16 bits. Perplexity: windows
of --ppl_window tokens over the first --ppl_tokens tokens of a fixed text (Python's own pydoc topics, the same for
every run of a Python version). Not a test: run it once, on an otherwise idle machine, and quote the numbers with
the command and the CPU.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from generate.bench import hf_runner, ours_runner, time_generate  # noqa: E402
from minillama.checkpoints import load_model  # noqa: E402
from minillama.util.cli import DEFAULT_CKPT, ArgumentParser, positive_int, run  # noqa: E402
from minillama.util.files import write_json  # noqa: E402
from minillama.tokenizer.tokenizer import load_tokenizer  # noqa: E402
from minillama.perf import measure_copy_bandwidth, stored_weight_bytes  # noqa: E402

IMPLS = ("ours_bf16", "ours_int8", "ours_int4", "ours_bf16_compile", "ours_int8_compile", "ours_int4_compile",
         "hf_bf16", "llama_f16", "llama_q8_0", "llama_q4_0")
# ours: (--quantize, compiled decode step: the engine's EngineConfig(compile=True), inductor's C++ code on CPU)
OURS = {"ours_bf16": (None, False), "ours_int8": ("int8", False), "ours_int4": ("int4", False),
        "ours_bf16_compile": (None, True), "ours_int8_compile": ("int8", True), "ours_int4_compile": ("int4", True)}


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", "--model", dest="ckpt", default=str(DEFAULT_CKPT),
                   help="checkpoint dir (default: the embedded SmolLM2)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads for every implementation")
    p.add_argument("--new_tokens", type=positive_int, default=128, help="decode steps timed")
    p.add_argument("--prompt_len", type=positive_int, default=32, help="prompt tokens")
    p.add_argument("--iters", type=positive_int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--ppl_tokens", type=positive_int, default=4096, help="tokens of the fixed text scored")
    p.add_argument("--ppl_window", type=positive_int, default=512, help="tokens per perplexity window")
    p.add_argument("--json", default=None, help="write every figure to this file")
    a = p.parse_args(argv)
    a.impls = [i.strip() for i in a.impls.split(",") if i.strip()]
    if bad := [i for i in a.impls if i not in IMPLS]:
        p.error(f"--impls: unknown {', '.join(bad)}; valid: {', '.join(IMPLS)}")
    if a.ppl_window < 2 or a.ppl_tokens < a.ppl_window:
        p.error(f"--ppl_tokens {a.ppl_tokens} / --ppl_window {a.ppl_window}: perplexity needs a window of at least 2 "
                "tokens and at least one whole window of text")
    return a


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def fixed_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def gguf_weight_bytes(path: Path) -> int:
    from minillama.checkpoints.gguf import open_gguf
    tensors = {t.name: int(t.n_bytes) for t in open_gguf(path).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight")
    return sum(tensors.values())


def llama_runner(llm, prompt: list[int]):
    def go(n):
        llm.reset()  # no prefix reuse: every run prefills, as ours and transformers' do
        for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True)):
            if i + 1 >= n:
                break
    return go


@torch.no_grad()
def perplexity(model, ids: list[int], window: int) -> float:
    """exp(mean next-token loss) over consecutive windows of `ids`."""
    nll, n = 0.0, 0
    for s in range(0, len(ids) - window + 1, window):
        x = torch.tensor([ids[s:s + window]])
        logits = model(x)[0, :-1]  # (W-1, V) float32
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        n += window - 1
    return math.exp(nll / n)


def decode_row(impl: str, t_tok: float, step_bytes: int, bw: float) -> dict:
    return {"impl": impl, "tokens_per_s": 1 / t_tok, "ms_per_token": 1e3 * t_tok, "MB_per_step": step_bytes / 1e6,
            "GBps": step_bytes / t_tok / 1e9, "pct_copy_bandwidth": 100 * step_bytes / t_tok / bw}


def main(argv=None):
    a = get_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    tok = load_tokenizer(a.ckpt)
    text_ids = tok.encode(fixed_text())
    prompt = text_ids[:a.prompt_len]
    bw = measure_copy_bandwidth(device, mbytes=256)
    env = {"cpu": cpu_name(), "threads": a.threads, "torch": torch.__version__, "copy_GBps": bw / 1e9,
           "ckpt": a.ckpt, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens}
    print(f"{env['cpu']}, {a.threads} threads, torch {torch.__version__}; copy bandwidth {bw / 1e9:.1f} GB/s "
          f"(read + write of a 256 MB tensor)", flush=True)
    rows, ppl = [], {}
    fp32 = load_model(a.ckpt)
    kv_tokens = a.prompt_len + a.new_tokens // 2
    args = fp32.args
    kv_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * kv_tokens * 2
    for impl in a.impls:
        if impl in OURS:
            quantize, compile = OURS[impl]
            model = load_model(a.ckpt, dtype=torch.bfloat16, quantize=quantize)
            step = stored_weight_bytes(model) + kv_bytes
            t_pre, t_tok = time_generate(ours_runner(model, [prompt], a.new_tokens, compile), a.new_tokens, device,
                                         a.iters)  # time_generate warms up first: a compile is not timed
            model.clear_cache()
            ppl[impl] = perplexity(model, text_ids[:a.ppl_tokens], a.ppl_window)
        elif impl == "hf_bf16":
            import transformers
            model = transformers.AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=torch.bfloat16).eval()
            step = weight_bytes_hf(model) + kv_bytes
            t_pre, t_tok = time_generate(hf_runner(model, [prompt], a.new_tokens, False), a.new_tokens, device,
                                         a.iters)
        else:
            import llama_cpp

            from minillama.checkpoints.gguf_export import export_gguf
            quant = impl.removeprefix("llama_")
            path = Path(tempfile.mkdtemp()) / f"model.{quant}.gguf"
            export_gguf(fp32, tok, path, quant)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=a.prompt_len + a.new_tokens + 8, n_threads=a.threads,
                                  n_threads_batch=a.threads, verbose=False)
            step = gguf_weight_bytes(path) + kv_bytes
            t_pre, t_tok = time_generate(llama_runner(llm, prompt), a.new_tokens, device, a.iters)
            del llm
            path.unlink()
        row = decode_row(impl, t_tok, step, bw)
        row["prefill_ms"] = 1e3 * t_pre
        rows.append(row)
        print(f"{impl:<11} {row['tokens_per_s']:7.1f} tok/s  {row['ms_per_token']:6.2f} ms/token  "
              f"{row['MB_per_step']:6.1f} MB/step  {row['GBps']:5.1f} GB/s = {row['pct_copy_bandwidth']:4.1f}% of copy"
              f"  (prefill {a.prompt_len} tokens: {row['prefill_ms']:.0f} ms)", flush=True)
    if ppl:
        base = ppl.get("ours_bf16")
        print(f"perplexity over {a.ppl_tokens} tokens of the pydoc topics text, windows of {a.ppl_window}:")
        for impl, v in ppl.items():
            rel = f" ({100 * (v / base - 1):+.2f}% vs bf16)" if base and impl != "ours_bf16" else ""
            print(f"  {impl:<10} {v:.4f}{rel}")
    if a.json:
        write_json(a.json, {"environment": env, "decode": rows, "perplexity": ppl})


def weight_bytes_hf(model) -> int:
    """transformers' bf16 weights one step reads (the tied embedding counted once, as the head)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    if not model.config.tie_word_embeddings:
        total -= model.get_input_embeddings().weight.numel() * 2
    return total


if __name__ == "__main__":
    sys.exit(run(main))
