"""tests/gpu_check.sh's bookkeeping: the environment and ceilings first, and at the end the parts' statuses, the
CUDA test results (pytest's junit XML) and one table of every figure and target, all folded into the results JSON.

    python tests/gpu_check_report.py env --json OUT/gpu_check.json [--device cpu]
    python tests/gpu_check_report.py summary --json OUT/gpu_check.json --parts OUT/parts.tsv --junit OUT/x.xml
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minillama.tools import benchmarks as bm  # noqa: E402


def env(a):
    import torch

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = {**bm.environment(device), **bm.ceilings(device, torch.bfloat16), "toy": a.toy}
    bm.record(a.json, "env", "device", info)
    print(f"device: {info['device']}, torch {info['torch']}, transformers {info.get('transformers', '-')}; "
          f"copy bandwidth {info['copy_GBps']:.0f} GB/s, bf16 matmul peak {info['matmul_TFLOPs']:.1f} TFLOP/s")


def read_parts(path: str) -> dict:
    """name -> {status, seconds, estimate_s, limit_s} from the TSV the shell script appends to."""
    parts = {}
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                name, status, seconds, estimate, limit = line.rstrip("\n").split("\t")
                parts[name] = {"status": status, "seconds": int(seconds), "estimate_s": int(estimate),
                               "limit_s": int(limit)}
    return parts


def read_junit(path: str) -> dict:
    """pytest's junit XML -> counts and each test's outcome (with the first line of any failure)."""
    if not path or not os.path.exists(path):
        return {}
    tests, counts = {}, {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                detail = (el.get("message") or "").splitlines()[0][:300] if el.get("message") else ""
        counts[outcome] += 1
        tests[name] = {"outcome": outcome, **({"detail": detail} if detail else {}),
                       "seconds": float(case.get("time", 0))}
    return {**counts, "tests": tests}


def figure_lines(results: dict) -> list[str]:
    """Every measured figure, one line each, with the layer cut where there was one."""
    lines = []
    for key, r in sorted(results.get("decode", {}).items()):
        cut = f" [{r['n_layers']}/{r['real_n_layers']} layers]" if r.get("layers_cut") else ""
        lines.append(f"decode {r['shape']}{cut} {key}: {r['tokens_per_s']:.1f} tok/s, {r['pct_bandwidth']:.1f}% of "
                     f"copy bw (floor {r['floor_tokens_per_s']:.1f} tok/s); prefill {r['prefill_ms']:.1f} ms = "
                     f"{r['prefill_pct_peak']:.1f}% of peak")
    for key, r in sorted(results.get("train", {}).items()):
        mem = "-" if r.get("peak_gb") is None else f"{r['peak_gb']:.1f} GB"
        lines.append(f"train {key} ({r['shape']}, rows of {r['seq_len']}): {r['tokens_per_s']:.0f} tok/s, MFU "
                     f"{r['mfu_pct']:.1f}%, peak {mem}")
    for key, r in sorted(results.get("moe", {}).items()):
        lines.append(f"moe layer {key} ({r['tokens']} tokens, grouped GEMM {r['grouped_gemm']}): "
                     f"{r['tokens_per_s']:.0f} tok/s, {r['ms']:.2f} ms fwd+bwd")
    w = results.get("workload", {}).get("run")
    if w:
        cut = f" [{w['n_layers']}/{w['real_n_layers']} layers]" if w.get("layers_cut") else ""
        lines.append(f"workload {w['shape']}{cut}: {w['prompts']} x {w['prompt_len']} prompt + {w['new_tokens']} new, "
                     f"{w['batch_size']} rows: {w['wall_s']:.1f} s, {w['output_tokens_per_s']:.1f} output tok/s, "
                     f"{w['prompt_tokens_per_s']:.0f} prompt tok/s; EXTRAPOLATED {w['extrapolated_minutes']:.1f} min "
                     f"for {w['extrapolated_job']}")
    return lines


def summary(a):
    results = bm.load(a.json)
    parts, tests = read_parts(a.parts), read_junit(a.junit)
    for name, p in parts.items():
        bm.record(a.json, "parts", name, p)
    if tests:
        bm.record(a.json, "correctness", "pytest -m cuda", tests)
    results = bm.load(a.json)
    print("\n== parts (estimate on an H200 / limit / took)")
    for name, p in parts.items():
        print(f"  {name:<12} {p['status']:<18} est {p['estimate_s']:>4}s  limit {p['limit_s']:>4}s  "
              f"took {p['seconds']:>4}s")
    if tests:
        print(f"\n== CUDA tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped")
        for name, t in tests["tests"].items():
            if t["outcome"] == "failed":
                print(f"  FAILED {name}: {t.get('detail', '')}")
    print("\n== figures")
    for line in figure_lines(results):
        print("  " + line)
    rows = bm.target_rows(results)
    bm.record(a.json, "targets", "rows", {"rows": rows})
    print("\n== targets\n" + bm.format_targets(rows))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env", help="record the device, versions and the measured ceilings")
    e.add_argument("--json", required=True)
    e.add_argument("--device", default=None)
    e.add_argument("--toy", action="store_true", help="mark the run as toy shapes")
    s = sub.add_parser("summary", help="fold parts and test results into the JSON and print the tables")
    s.add_argument("--json", required=True)
    s.add_argument("--parts", default=None)
    s.add_argument("--junit", default=None)
    a = p.parse_args(argv)
    env(a) if a.cmd == "env" else summary(a)


if __name__ == "__main__":
    main()
