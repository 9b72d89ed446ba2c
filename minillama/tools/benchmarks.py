"""What generate/bench.py, train/bench.py and tests/gpu_check.sh share: random models at real shapes, the device's
measured ceilings, one JSON results file that every figure is added to as soon as it is measured, and the
performance targets of issue 13 evaluated against that file (the one place they are written down).

Results file layout: {section: {key: record}}, sections "env", "decode" (key "impl|b<batch>|p<prompt>"), "train"
(key "case|impl"), "moe" (key impl), "workload" (key "run"), "parts" and "correctness" (written by gpu_check).
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Optional

import torch

from ..args import ModelArgs, to_hf_config
from ..util.files import read_json, write_json
from ..model import Transformer
from ..perf import measure_copy_bandwidth, measure_matmul_peak


def random_model(args: ModelArgs, dtype: torch.dtype, device, seed: int = 0) -> Transformer:
    """The real shape with random weights N(0, 0.02) (norms 1), allocated once, directly in dtype on the device."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)  # cast while still meta: no float32 copy is ever allocated
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen) if p.dim() > 1 else p.fill_(1.0)
    model.reset_rope(device)
    model.tie_weights()
    return model.eval()


def hf_model(args: ModelArgs, dtype: torch.dtype, device, attn: str = "sdpa"):
    """transformers' model of the same architecture, built (and randomly initialised) directly on the device.

    Its weights are its own random values: speed does not depend on them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**to_hf_config(args, dtype=str(dtype).removeprefix("torch.")))
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    return hf.eval()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'x86'})"


def environment(device: torch.device) -> dict:
    """What the numbers were measured on."""
    env = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version()}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def ceilings(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The device's copy bandwidth (bytes read + written) and dense matmul rate in dtype, measured now."""
    gpu = device.type == "cuda"
    bw = measure_copy_bandwidth(device, mbytes=1024 if gpu else 64)
    peak = measure_matmul_peak(device, dtype, n=8192 if gpu else 256)
    return {"copy_GBps": bw / 1e9, "matmul_TFLOPs": peak / 1e12, "matmul_dtype": str(dtype).removeprefix("torch.")}


def layers_note(args: ModelArgs, preset: Optional[str]) -> dict:
    """The layer count measured and, where it was cut from the preset's, the real one (the output must say so)."""
    from ..args import PRESETS

    real = PRESETS[preset]["n_layers"] if preset in PRESETS else args.n_layers  # toy shapes have no "real" count
    return {"n_layers": args.n_layers, "layers_cut": args.n_layers != real, "real_n_layers": real}


def profile_to(path: Optional[str], title: str, fn, device: torch.device, rows: int = 25) -> None:
    """Append torch.profiler's table of the kernels fn() runs (self time, largest first) to a text file."""
    if not path:
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # warm: no compile or allocation in the profile
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"==== {title}\n{prof.key_averages().table(sort_by=key, row_limit=rows)}\n")


# ---- the results file ----

def record(path: Optional[str], section: str, key: str, value: dict) -> None:
    """Add one figure to the results file now (read, update, atomic rewrite), so a later timeout cannot lose it."""
    if not path:
        return
    data = read_json(path, "benchmark results") if os.path.exists(path) else {}
    data.setdefault(section, {})[key] = value
    write_json(path, data)


def load(path: str) -> dict:
    return read_json(path, "benchmark results") if path and Path(path).is_file() else {}


# ---- targets (issue 13, H200, floors measured in the same run) ----

def _get(results: dict, section: str, key: str, field: str) -> Optional[float]:
    value = results.get(section, {}).get(key, {}).get(field)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _decode_prompts(results: dict) -> list[int]:
    """Prompt lengths measured at batch 1, shortest first (128 and 8192 in the device run)."""
    return sorted({r["prompt"] for r in results.get("decode", {}).values() if r.get("batch") == 1})


def _best_decode(results: dict, batch: int, prompt: int, quantize: str = "") -> tuple[Optional[str], Optional[float]]:
    """Our faster decode (compiled or eager) at this case, in bf16 or weight-only quantized ("int4": generate/bench.py
    --quantize int4): (impl, tokens/s)."""
    best, suffix = (None, None), f"+{quantize}" if quantize else ""
    for impl in (f"ours_compile{suffix}", f"ours{suffix}"):
        tps = _get(results, "decode", f"{impl}|b{batch}|p{prompt}", "tokens_per_s")
        if tps is not None and (best[1] is None or tps > best[1]):
            best = (impl, tps)
    return best


def target_rows(results: dict) -> list[dict]:
    """Each target of the issue with the measured value (None where not measured) and pass/fail."""
    rows = []

    def add(figure, value, op, target, unit, note=""):
        ok = None if value is None else (value >= target if op == ">=" else value <= target)
        rows.append({"figure": figure, "value": value, "target": f"{op} {target:g}{unit}", "pass": ok, "note": note})

    prompts = _decode_prompts(results) or [128, 8192]
    short, long = prompts[0], prompts[-1]
    impl, tps = _best_decode(results, 1, short)
    bw = _get(results, "decode", f"{impl}|b1|p{short}", "pct_bandwidth") if impl else None
    add(f"decode batch 1, prompt {short}: % of copy bandwidth", bw, ">=", 85, "%", impl or "")
    add(f"decode batch 1, prompt {short}: x HF generate (sdpa, eager)",
        _ratio(tps, _get(results, "decode", f"hf|b1|p{short}", "tokens_per_s")), ">=", 5, "x", impl or "")
    int4, int4_tps = _best_decode(results, 1, short, "int4")
    add(f"int4 decode batch 1, prompt {short}: x our bf16 decode", _ratio(int4_tps, tps), ">=", 1.5, "x",
        f"{int4}: reads ~0.3x the bytes" if int4 else "")
    prefill = [_get(results, "decode", f"{i}|b1|p{long}", "prefill_pct_peak") for i in ("ours", "ours_compile")]
    prefill = [p for p in prefill if p is not None]
    add(f"prefill of a {long}-token prompt: % of matmul peak", max(prefill) if prefill else None, ">=", 55, "%")
    ours, hf = "lora|minillama", "lora|HF + peft"
    add("LoRA packed rows: x HF + peft tokens/s", _ratio(_get(results, "train", ours, "tokens_per_s"),
                                                          _get(results, "train", hf, "tokens_per_s")), ">=", 2, "x")
    add("LoRA packed rows: peak memory / HF + peft's", _ratio(_get(results, "train", ours, "peak_gb"),
                                                              _get(results, "train", hf, "peak_gb")), "<=", 0.7, "x")
    add("LoRA packed rows: MFU", _get(results, "train", ours, "mfu_pct"), ">=", 40, "%")
    moe = _get(results, "moe", "minillama", "tokens_per_s")
    add("MoE layer fwd+bwd: x HF MixtralSparseMoeBlock (eager loop)",
        _ratio(moe, _get(results, "moe", "HF", "tokens_per_s")), ">=", 3, "x")
    add("MoE layer fwd+bwd: x HF (experts_implementation=grouped_mm)",
        _ratio(moe, _get(results, "moe", "HF grouped_mm", "tokens_per_s")), ">=", 3, "x", "transformers 5 default")
    job = results.get("workload", {}).get("run", {}).get("extrapolated_job", {})
    what = f"{job['prompts']} prompts x {job['prompt_len']} + {job['new_tokens']} new" if job else "long-prompt job"
    add(f"{what} (extrapolated): minutes", _get(results, "workload", "run", "extrapolated_minutes"), "<=", 15,
        " min", "extrapolation, not a measurement")
    return rows


def format_targets(rows: list[dict]) -> str:
    lines = [f"{'target':<62} {'value':>9} {'goal':>10}  result"]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.2f}"
        result = "not measured" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        note = f"  ({r['note']})" if r["note"] else ""
        lines.append(f"{r['figure']:<62} {value:>9} {r['target']:>10}  {result}{note}")
    return "\n".join(lines)
