"""tests/gpu_check.sh (the one-command GPU run) end to end at toy shapes on CPU: every part runs, and its results
file holds every section the GPU run fills, with finite numbers, so no Python error waits for the GPU."""

import json
import math
import os
import subprocess
import sys

from sft_helpers import REPO

DECODE_IMPLS = ("ours", "ours_compile", "hf", "hf_static")
PARTS = ("env", "correctness", "decode", "workload", "hf_decode", "lora", "moe", "int4_decode", "hf_static", "full_ft")


def numbers(record: dict, where: str):
    """Every number in a record (nested too), asserting each is finite."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from numbers(value, f"{where}.{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isfinite(value), f"{where}.{key} = {value}"
            yield value


def test_gpu_check_runs_every_part_at_toy_shapes_and_fills_every_section(tmp_path):
    env = {**os.environ, "GPU_CHECK_TOY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "GPU_CHECK_BUDGET_S": "900"}
    proc = subprocess.run(["bash", str(REPO / "tests" / "gpu_check.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    log = (tmp_path / "gpu_check.log").read_text()
    assert "== targets" in log and "EXTRAPOLATED, not measured" in log
    profile = (tmp_path / "profile.txt").read_text()  # where the time went, for each headline figure
    for title in ("==== decode ours ", "==== decode ours_compile ", "==== train lora minillama", "==== moe layer"):
        assert title in profile, title

    assert {name: p["status"] for name, p in results["parts"].items()} == {name: "ok" for name in PARTS}
    assert results["env"]["device"]["toy"] is True and results["env"]["device"]["copy_GBps"] > 0
    # the CUDA tests were collected and skipped (no GPU here), none failed
    tests = results["correctness"]["pytest -m cuda"]
    assert tests["failed"] == 0 and tests["skipped"] == len(tests["tests"]) >= 10

    decode = results["decode"]
    assert {k.split("|")[0] for k in decode} == set(DECODE_IMPLS) | {"ours+int4"}
    for key, r in decode.items():
        assert r["tokens_per_s"] > 0 and r["prefill_ms"] > 0 and r["pct_bandwidth"] > 0, key
        list(numbers(r, f"decode[{key}]"))
    assert set(results["train"]) == {"lora|minillama", "lora|HF + peft", "full|minillama", "full|HF"}
    assert set(results["moe"]) == {"minillama", "HF", "HF grouped_mm"}
    for section in ("train", "moe"):
        for key, r in results[section].items():
            assert r["tokens_per_s"] > 0 and r["mfu_pct"] > 0, (section, key)
            list(numbers(r, f"{section}[{key}]"))
    work = results["workload"]["run"]
    assert work["prompts"] == 6 and work["output_tokens_per_s"] > 0 and work["prompt_tokens_per_s"] > 0
    assert work["extrapolated_minutes"] > 0 and work["extrapolated_job"]["prompts"] == 20
    list(numbers(work, "workload"))

    rows = results["targets"]["rows"]["rows"]
    assert len(rows) == 10
    # every target has a value at toy shapes except the memory ratio (no allocator statistics on CPU)
    missing = [r["figure"] for r in rows if r["value"] is None]
    assert missing == ["LoRA packed rows: peak memory / HF + peft's"], missing
    assert all(isinstance(r["pass"], bool) for r in rows if r["value"] is not None)
