"""Rejection sampling keeps the best of N samples by the reward (with every sample's score beside it), and
train/rejection.py runs its rounds: samples, the kept answers as SFT data, train/sft.py on them."""

import json
import os
import subprocess
import sys

import torch

from minillama.checkpoints import load_model
from minillama.inference.engine import EngineConfig
from minillama.inference.generate import generate
from minillama.inference.sampling import SamplingParams
from minillama.tokenizer.tokenizer import load_tokenizer
from minillama.training.grpo import load_prompts
from minillama.training.rejection import RejectionConfig, best_of_n
from minillama.training.rewards import load_rewards
from sft_helpers import REPO, tiny_checkpoint, write_jsonl


def letters(prompt="", completion="", **_):
    """The fraction of the completion's characters that are lowercase ASCII letters."""
    return sum("a" <= c <= "z" for c in completion) / max(len(completion), 1)


def test_best_of_n_keeps_the_highest_reward_sample_of_each_prompt(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "model")
    tok, model = load_tokenizer(str(ckpt)), load_model(str(ckpt), dtype=torch.float32)
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "answer": "x"} for i in range(3)])
    prompts, _ = load_prompts(str(data), tok, 256, False, "--data")
    rewards = load_rewards("test_rejection:letters")
    cfg = RejectionConfig(n=6, max_new_tokens=10, temperature=1.0, top_p=1.0, seed=3)
    kept = best_of_n(model, tok, prompts, rewards, cfg)
    # the same draws, made directly: every sample's text and score
    ids = [p.ids for p in prompts for _ in range(cfg.n)]
    new = generate(model, ids, cfg.max_new_tokens, SamplingParams(1.0, 1.0), stop_ids=tok.stop_ids,
                   config=EngineConfig(seed=3))
    texts = [tok.decode([t for t in c if t < tok.vocab_size]) for c in new]
    for i, rec in enumerate(kept):
        mine = texts[i * cfg.n:(i + 1) * cfg.n]
        scores = [letters(completion=t) for t in mine]
        assert rec["rewards"] == scores
        assert rec["reward"] == max(scores) and rec["messages"][-1]["content"] == mine[scores.index(max(scores))]
        assert rec["messages"][:-1] == prompts[i].messages
    assert len(set(texts)) > len(prompts)  # N different samples per prompt: there was a choice to make


def test_rejection_runs_its_rounds_and_trains_sft_on_the_kept_answers(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "model")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(4)])
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "train" / "rejection.py"), "--model", str(ckpt), "--data", str(data),
           "--out", str(out), "--rounds", "2", "--n", "3", "--max_new_tokens", "6", "--reward",
           "test_rejection:letters", "--", "--max_steps", "1", "--batch_size", "4", "--lora_rank", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for r in (1, 2):
        lines = [json.loads(x) for x in (out / f"round_{r}" / "best.jsonl").read_text().splitlines()]
        assert len(lines) == 4 and all(x["reward"] == max(x["rewards"]) and len(x["rewards"]) == 3 for x in lines)
        assert (out / f"round_{r}" / "sft" / "final" / "adapter_config.json").is_file()
    assert "round 2: 4 prompts x 3 samples" in proc.stdout
