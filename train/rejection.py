"""Rejection sampling: R rounds of (best of N samples per prompt by the reward -> SFT on the kept answers).

    python train/rejection.py                                       # the demo: SmolLM2, the review prompts
    python train/rejection.py --model DIR --data prompts.jsonl --rounds 3 --n 16 \\
        --reward minillama.training.rewards:exact_answer -- --max_steps 50 --lr 5e-4   # after --: train/sft.py's

Round r samples --n answers per prompt of --data from the model of round r-1 (round 1: --model, with --adapter if
given; later rounds: --model with the previous round's final/ adapter, or its full model), seeded by --seed and the
round; scores them with --reward (pkg.module:function[,...], weighted by --reward_weights; see
minillama/training/rewards.py); writes OUT/round_r/best.jsonl (one chat record per prompt: the best answer, "reward",
every sample's "rewards", the best one's "scores"); then runs train/sft.py --model MODEL --data that file --out
OUT/round_r/sft plus the flags after `--`. Each round fine-tunes --model afresh on its own kept answers. Prompts as
train/grpo.py reads them ({"prompt", ...fields} or chat records).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minillama.checkpoints import load_model  # noqa: E402
from minillama.lora.peft import load_adapter  # noqa: E402
from minillama.tokenizer.tokenizer import load_tokenizer  # noqa: E402
from minillama.training.grpo import load_prompts  # noqa: E402
from minillama.training.rejection import RejectionConfig, best_of_n, write_records  # noqa: E402
from minillama.training.rewards import load_rewards  # noqa: E402
from minillama.util.cli import REPO, run as run_cli  # noqa: E402

DEMO_MODEL = REPO / "weights" / "smollm2-135m-instruct"


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    sft_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--ckpt", dest="ckpt", default=str(DEMO_MODEL), help="the base model dir")
    p.add_argument("--adapter", default=None, help="a PEFT adapter on --model for round 1's samples")
    p.add_argument("--data", default=str(REPO / "train" / "data" / "reviews.jsonl"), help="prompts (JSONL)")
    p.add_argument("--out", default="out/rejection")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--reward", default="minillama.training.rewards:format_reward",
                   help="pkg.module:function[,...]: f(prompt=, completion=, reference=, **line fields) -> float; a "
                        "directory is a reward model (train/dpo.py --loss reward's final/)")
    p.add_argument("--reward_weights", type=float, nargs="+", default=None)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--seq_len", type=int, default=1024, help="prompts longer than this are dropped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.n < 1 or args.max_new_tokens < 1:
        raise ValueError("--rounds, --n and --max_new_tokens must be >= 1")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise ValueError("--temperature must be > 0 and --top_p in (0, 1]: best of N needs N different samples")
    return args, sft_args


def main(argv=None) -> int:
    args, sft_args = parse_args(argv)
    rewards = load_rewards(args.reward, args.reward_weights)
    tok = load_tokenizer(args.ckpt)
    prompts, stats = load_prompts(args.data, tok, args.seq_len, False, "--data")
    print(f"prompts: {stats.summary()}", flush=True)
    out, adapter = Path(args.out), args.adapter
    for r in range(1, args.rounds + 1):
        model = policy(args.ckpt, adapter, args.device)
        cfg = RejectionConfig(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed * 1000 + r)
        records = best_of_n(model, tok, prompts, rewards, cfg)
        del model
        data = write_records(out / f"round_{r}" / "best.jsonl", records)
        mean_all = sum(sum(x["rewards"]) for x in records) / (len(records) * args.n)
        mean_best = sum(x["reward"] for x in records) / len(records)
        print(f"round {r}: {len(records)} prompts x {args.n} samples; mean reward {mean_all:.3f}, of the kept "
              f"{mean_best:.3f}; {data}", flush=True)
        sft_out = out / f"round_{r}" / "sft"
        cmd = [sys.executable, str(REPO / "train" / "sft.py"), "--model", args.ckpt, "--data", str(data),
               "--out", str(sft_out), "--eval_data", "", "--device", args.device, "--overwrite", *sft_args]
        print("round {}: {}".format(r, " ".join(cmd)), flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(f"round {r}: train/sft.py failed (its output is above)")
        adapter = str(sft_out / "final")
    return 0


def policy(ckpt: str, adapter: str | None, device: str):
    """The model that samples: --model, with the previous round's final/ (a PEFT adapter, or a whole model)."""
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        return load_model(adapter, device=device, dtype=torch.float32)  # full fine-tuning's final/
    model = load_model(ckpt, device=device, dtype=torch.float32)
    if adapter is not None:
        load_adapter(model, adapter)
    return model


if __name__ == "__main__":
    sys.exit(run_cli(main))
