"""Benchmark floors and scripts: the numbers they divide by are right, and the scripts run at toy shapes on CPU."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from minillama import ModelArgs, Transformer
from minillama.perf import decode_bytes_per_step, forward_flops, param_counts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, total_b", [("llama3-8b", 8.03), ("llama3.2-1b", 1.24), ("mixtral-8x7b", 46.7),
                                           ("llama2-70b", 68.98)])
def test_param_counts_match_released_sizes(name, total_b):
    assert param_counts(ModelArgs.from_name(name))["total"] / 1e9 == pytest.approx(total_b, abs=0.01)


def test_param_counts_match_a_built_model():
    for over in ({}, {"n_experts": 4, "n_experts_per_tok": 2}, {"tie_embeddings": True}):
        args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=96, **over)
        n = sum(p.numel() for p in Transformer(args).parameters())  # shared tied weight counted once
        assert param_counts(args)["total"] == n


def test_decode_floor_counts_weights_and_cache():
    args = ModelArgs.from_name("llama3-8b")
    # batch 1, empty cache: the 7.5B weights a step reads (embedding table excluded, head included), bf16
    assert decode_bytes_per_step(args, 1, 0) == 2 * param_counts(args)["active"] - 2 * args.dim
    # each cached position adds 2 (k, v) * 32 layers * 8 heads * 128 dims * 2 bytes = 128 KiB
    assert decode_bytes_per_step(args, 1, 1) - decode_bytes_per_step(args, 1, 0) == 131072
    mixtral = ModelArgs.from_name("mixtral-8x7b")
    assert decode_bytes_per_step(mixtral, 1, 0) < decode_bytes_per_step(mixtral, 8, 0)  # batch 8 touches more


def test_forward_flops_is_2_per_param_per_token_plus_attention():
    args = ModelArgs.from_name("llama3-8b")
    f = forward_flops(args, 8192, 8192)
    assert f / 8192 == pytest.approx(2 * param_counts(args)["active"] + 2 * 32 * 4096 * 8192, rel=1e-9)


def run_script(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_generate_bench_runs_at_toy_shape_against_transformers(tmp_path):
    results = tmp_path / "r.json"
    out = run_script("generate/bench.py", "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
                     "--batch_sizes", "1,2", "--prompt_lens", "16", "--max_new_tokens", "6", "--iters", "1",
                     "--impls", "ours,hf", "--json", str(results))
    decode = json.loads(results.read_text())["decode"]
    assert set(decode) == {f"{i}|b{b}|p16" for i in ("ours", "hf") for b in (1, 2)}
    for r in decode.values():  # ours, HF, and the floors filled for every case
        assert r["tokens_per_s"] > 0 and r["pct_bandwidth"] > 0 and r["prefill_pct_peak"] > 0
        assert r["copy_GBps"] > 0 and r["matmul_TFLOPs"] > 0 and r["layers_cut"] is False
    assert "x HF eager decode" in out and "target" in out


def test_train_bench_runs_at_toy_shape_against_transformers_and_peft(tmp_path):
    results = tmp_path / "r.json"
    out = run_script("train/bench.py", "--tiny", "--device", "cpu", "--seq_len", "128", "--moe_tokens", "128",
                     "--iters", "1", "--json", str(results))
    for case in ("lora", "full"):
        assert f"{case}: " in out and "x HF tokens/s" in out, out
    data = json.loads(results.read_text())
    assert set(data["train"]) == {"lora|minillama", "lora|HF + peft", "full|minillama", "full|HF"}
    assert set(data["moe"]) == {"minillama", "HF", "HF grouped_mm"} and data["moe"]["minillama"]["grouped_gemm"]
    assert "x HF grouped_mm tokens/s" in out


def test_bench_flags_are_checked_before_any_work():
    for script, flag in (("generate/bench.py", "--impls=ours,vllm"), ("train/bench.py", "--cases=lora,dpo")):
        out = subprocess.run([sys.executable, script, flag], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "unknown ['" in out.stderr and "choose from" in out.stderr


def test_workload_extrapolation_scales_the_measured_prefill_rate_and_decode_bandwidth():
    """285 x 12K prompts + 1K answers: prefill FLOPs at the measured FLOP/s + decode bytes at the measured bytes/s."""
    spec = importlib.util.spec_from_file_location("generate_bench", os.path.join(ROOT, "generate", "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = SimpleNamespace(extrapolate="285,12288,1024", batch_size=32)
    measured = {"prefill_flops_per_s": 4e14, "decode_Bps": 3.5e12}
    mixtral = ModelArgs.from_name("mixtral-8x7b")
    r = bench.extrapolate(mixtral, a, measured, torch.device("cpu"), 2)
    prefill = 285 * forward_flops(mixtral, 12288, 12288) / 4e14
    decode = math.ceil(285 * 1024 / 32) * decode_bytes_per_step(mixtral, 32, 12288 + 512) / 3.5e12
    assert r["extrapolated_prefill_s"] == pytest.approx(prefill) and r["extrapolated_decode_s"] == pytest.approx(decode)
    assert r["extrapolated_minutes"] == pytest.approx((prefill + decode) / 60)
    assert r["extrapolated_job"] == {"prompts": 285, "prompt_len": 12288, "new_tokens": 1024, "rows": 32}
    assert "exceed" not in r["extrapolation_basis"]  # 13K tokens fit Mixtral's 32K context
    llama = bench.extrapolate(ModelArgs.from_name("llama3-8b"), a, measured, torch.device("cpu"), 2)
    assert "exceed this preset's context of 8192" in llama["extrapolation_basis"]


def test_train_bench_smollm2_case_alternates_processes_and_compares_the_same_loss(tmp_path):
    from sft_helpers import tiny_checkpoint
    ckpt = tiny_checkpoint(tmp_path / "tiny", tie=True)  # SmolLM2's layout: a tied head, HF format
    results = tmp_path / "r.json"
    out = run_script("train/bench.py", "--cases", "smollm2-lora", "--ckpt", str(ckpt), "--seq_len", "64",
                     "--rounds", "2", "--warmup", "1", "--iters", "1", "--json", str(results))
    assert "x HF + peft step speed" in out and "peak RSS" in out, out
    rec = json.loads(results.read_text())["train"]["smollm2-lora|seq64"]
    assert [r["impl"] for r in rec["runs"]["ours"]] == ["ours", "ours"] and len(rec["runs"]["hf"]) == 2
    assert rec["runs"]["ours"][0]["first_loss"] == pytest.approx(rec["runs"]["hf"][0]["first_loss"], abs=1e-3)
    assert rec["speed_x"] > 0 and rec["peak_rss_x"] > 0 and rec["ours"]["step_rss_mb"] >= 0
