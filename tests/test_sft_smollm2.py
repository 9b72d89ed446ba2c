"""The default recipe on the real SmolLM2-135M-Instruct: a short LoRA run on train/data/reviews.jsonl writes a PEFT
adapter that generate/chat.py --adapter loads."""

import json
import os
import subprocess
import sys

from sft_helpers import REPO, metrics, run_sft


def test_default_recipe_writes_an_adapter_chat_loads(smollm2_dir, tmp_path):
    out = tmp_path / "run"
    # the defaults (LoRA r=16 on all linears, train/data/reviews.jsonl), cut to 2 small steps for CI
    run_sft(["--model", str(smollm2_dir), "--out", str(out), "--max_steps", "2", "--batch_size", "2",
             "--seq_len", "256", "--save_every", "1", "--eval_max_new_tokens", "8"], nproc=1, timeout=600)
    recs = metrics(out)
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(0 < r["loss"] < 10 for r in train)
    # the default run evaluates on the shipped train/data/reviews_eval.jsonl (here only at the end: 2 steps < 4)
    assert [(r["step"], 0 < r["eval_loss"] < 10) for r in recs if "eval_loss" in r] == [(2, True)]
    assert json.loads((out / "config.json").read_text())["eval_data"].endswith("train/data/reviews_eval.jsonl")
    # and answers its 6 held-out prompts, scored by the review format's reward (the demo's generation curve)
    gen = [r for r in recs if "gen/reward" in r]
    assert [r["step"] for r in gen] == [2] and 0 <= gen[0]["gen/reward"] <= 1
    assert len((out / "samples" / "step_2.jsonl").read_text().splitlines()) == 6
    cfg = json.loads((out / "final" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32 and "down_proj" in cfg["target_modules"]
    assert cfg["base_model_name_or_path"] == str(smollm2_dir)
    assert (out / "latest").read_text() == "step_2" and (out / "step_1" / "adapter").is_dir()
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    chat = subprocess.run([sys.executable, str(REPO / "generate" / "chat.py"), "--ckpt", str(smollm2_dir),
                           "--adapter", str(out / "final"), "--prompt", "Review the city of Rome.",
                           "--temperature", "0", "--max_new_tokens", "8", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()
