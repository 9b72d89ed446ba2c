"""GRPO: online RL from reward functions, with the rollouts sampled in this process by minillama's engine from the
current policy (LoRA adapters live, nothing merged, no server); LoRA, QLoRA or full fine-tuning, one or many processes.

    torchrun --nproc_per_node 1 train/grpo.py                  # the demo: SmolLM2 learns the review format
    torchrun --nproc_per_node 1 train/grpo.py --data math.jsonl --reward minillama.training.rewards:exact_answer
    torchrun ... train/grpo.py --reward my.rewards:length,minillama.training.rewards:format_reward \\
        --reward_weights 0.2 1.0 --num_generations 8 --beta 0.0
    torchrun ... train/grpo.py --out OUT --resume              # continue exactly (the rollouts are seeded by step)

Data: JSONL prompts, {"prompt": text or messages, ...any fields} or chat records (the turns before the last
assistant message are the prompt; that message is the reference). --batch_size counts prompts per step (all
processes); each gets --num_generations completions. Rewards: --reward pkg.module:function[,...] (each called as
f(prompt=, completion=, reference=, **the line's other fields) -> float; a directory is a reward model trained by
train/dpo.py --loss reward), summed with --reward_weights;
minillama/training/rewards.py ships format_reward (the review headings, or the line's "headings") and exact_answer
(the line's "answer", else the reference). The loss, advantages and KL are TRL's GRPOTrainer's (see
minillama/training/grpo.py); the reference is the base model with the adapters off (LoRA) or a frozen copy of the
starting weights (full fine-tuning, --beta > 0).
Under several processes each rank samples its own prompts' completions; FSDP's sharded layers gather their weights
in lockstep, so generation then runs exactly --max_new_tokens steps on every rank (cut at the first stop after).
Each step logs reward (mean), reward_std, rewards/<function>, kl, clip_ratio, completion_length, terminated (the
fraction that stopped) to metrics.jsonl; OUT/grpo.png plots them, OUT/rollouts.jsonl keeps every --log_every
step's scored completions (rank 0's). --eval_generate N scores greedy answers to N --eval_data prompts with the
same rewards (gen/reward). Outputs otherwise as train/sft.py.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minillama.util.cli import REPO, run as run_cli  # noqa: E402
from minillama.util.files import atomic_write  # noqa: E402
from minillama.util.plot import write_metrics_png  # noqa: E402
from minillama.checkpoints import load_model  # noqa: E402
from minillama.tools import train_flags  # noqa: E402
from minillama.training.build import build_model, load_data, pad_id_of  # noqa: E402
from minillama.training.config import TrainConfig  # noqa: E402
from minillama.training.generation_eval import EvalPrompt, GenerationEval  # noqa: E402
from minillama.training.grpo import GRPO, LOSS_TYPES, GRPOConfig, TokenLogprobs, load_prompts  # noqa: E402
from minillama.training.metrics import read_metrics  # noqa: E402
from minillama.training.rewards import load_rewards  # noqa: E402
from minillama.training.schedule import BatchSplit, Schedule  # noqa: E402
from minillama.training.session import Run, open_run, save, start_run, stop_on_nonfinite, training_session  # noqa: E402
from minillama.training.trainer import (clip_gradients, eval_due, evaluate, finish, log_step,  # noqa: E402
                                        save_due, steps)

PLOTTED = ("reward", "reward_std", "kl", "completion_length", "clip_ratio", "gen/reward")


def add_grpo_args(p) -> None:
    """train/grpo.py's own flags and defaults on top of train/sft.py's."""
    g = p.add_argument_group("GRPO")
    g.add_argument("--reward_weights", type=float, nargs="+", default=None,
                   help="one weight per --reward function (default 1 each)")
    g.add_argument("--num_generations", type=int, default=4, help="G: completions sampled per prompt")
    g.add_argument("--max_new_tokens", type=int, default=96, help="completion length cap")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    g.add_argument("--top_p", type=float, default=1.0, help="rollout nucleus sampling")
    g.add_argument("--beta", type=float, default=0.04, help="KL weight to the reference (0: none, no ref pass)")
    g.add_argument("--epsilon", type=float, default=0.2, help="ratio clip: 1 - epsilon")
    g.add_argument("--epsilon_high", type=float, default=None, help="ratio clip: 1 + epsilon_high (default epsilon)")
    g.add_argument("--loss_type", choices=LOSS_TYPES, default="dapo",
                   help="dapo: mean over all completion tokens (TRL's default); grpo: per-completion mean, then mean")
    g.add_argument("--no_scale_rewards", action="store_true", help="advantages not divided by the group's std")
    p.set_defaults(data=str(REPO / "train" / "data" / "reviews.jsonl"),
                   eval_data=str(REPO / "train" / "data" / "reviews_eval.jsonl"), out="out/grpo", batch_size=4,
                   seq_len=512, warmup_steps=0, weight_decay=0.0, log_every=1,
                   reward="minillama.training.rewards:format_reward")


def parse_args(argv=None):
    args = train_flags.parse_args(argv, description=__doc__, extend=add_grpo_args, default_lr=(5e-4, 1e-6))
    if args.num_generations < 2:
        raise ValueError(f"--num_generations {args.num_generations}: GRPO compares at least 2 completions per prompt")
    if args.max_new_tokens < 1 or args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise ValueError("--max_new_tokens must be >= 1, --temperature > 0 and --top_p in (0, 1]")
    if args.beta < 0 or args.epsilon < 0 or (args.epsilon_high is not None and args.epsilon_high < 0):
        raise ValueError("--beta, --epsilon and --epsilon_high must be >= 0")
    if args.pack or args.context_parallel != 1:
        raise ValueError("--pack and --context_parallel are train/sft.py's; GRPO rows are one completion each")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = train_flags.train_config(args)
    grpo = GRPOConfig(num_generations=args.num_generations, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, beta=args.beta, epsilon=args.epsilon,
                      epsilon_high=args.epsilon_high, loss_type=args.loss_type,
                      scale_rewards=not args.no_scale_rewards, seed=args.seed)
    rewards = load_rewards(args.reward, args.reward_weights)
    with training_session() as stop:  # SIGTERM: the step in flight finishes, a checkpoint is saved, exit 0
        run, recipe = setup(cfg, grpo, rewards, stop)
        if run.generation is not None and run.state.step == 0:
            evaluate(run, recipe)  # where the held-out score starts
        for step in steps(run, recipe):  # count(): G completions per prompt sampled, scored, reference log-probs
            for mb in step.micro_batches():
                out = recipe.forward(run.root, mb, step.counts)  # forward: policy log-probs -> clipped PG + beta KL
                out.loss.backward()
                step.add(out)
            grad_norm = clip_gradients(run.trainable, cfg.optim.grad_clip)
            result = step.result(grad_norm)  # every rank's sums -> loss, reward mean/std, KL, clip ratio, length
            if not result.finite:
                return stop_on_nonfinite(run, result.loss, result.grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            log_step(run, step, result)
            keep_rollouts(run, recipe)
            if eval_due(run):
                evaluate(run, recipe)  # with --eval_generate: greedy answers scored by the same rewards
            if save_due(run):
                save(run)
        code = finish(run, recipe)
        if code == 0 and run.info.is_rank0:
            png = write_metrics_png(run.out / "grpo.png", read_metrics(run.out / "metrics.jsonl"), PLOTTED)
            run.log.message(f"GRPO curves: {png}")
        return code


def keep_rollouts(run: Run, recipe: GRPO) -> None:
    """Every --log_every steps, rank 0's scored completions appended to OUT/rollouts.jsonl."""
    step, every = run.state.step, max(run.cfg.log_every, 1)
    if run.info.is_rank0 and (step % every == 0 or step == run.total_steps):
        path = run.out / "rollouts.jsonl"
        old = path.read_text() if path.is_file() else ""
        new = "".join(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n" for s in recipe.samples)
        atomic_write(path, old + new)


def setup(cfg: TrainConfig, grpo: GRPOConfig, rewards, stop) -> tuple[Run, GRPO]:
    """Process group, prompts, model + optimizer, the reference, and the state: fresh or restored."""
    opened = open_run(cfg, stop)
    info, d, msg = opened.info, cfg.data, opened.log
    data = load_data(cfg, msg, load=load_prompts, what=("prompts", "eval prompts"))
    generation = None
    if cfg.generation.n:  # held-out answers scored by the training rewards: gen/reward
        if not data.eval:
            raise ValueError("--eval_generate answers held-out prompts: give --eval_data")
        held = [EvalPrompt(p.messages, p.reference, p.fields, p.line) for p in data.eval[:cfg.generation.n]]
        generation = GenerationEval(cfg.generation, held, data.tok, rewards)
    split = BatchSplit.make(d.batch_size, info.world_size, d.micro_batch_size)
    schedule = Schedule([len(p.ids) for p in data.train], d.batch_size, d.seq_len, False, cfg.seed)
    msg.message(f"GRPO: {d.batch_size} prompts x {grpo.num_generations} completions per step "
                f"({info.world_size} processes x {split.accumulation} micro-steps); rewards "
                f"{', '.join(f'{w:g} x {n}' for n, w in zip(rewards.names, rewards.weights))}; "
                f"{schedule.total_steps(cfg.max_steps, cfg.epochs)} steps")
    parts = build_model(cfg, info, opened.compute_dtype, msg, wrap=TokenLogprobs)
    ref_root = None
    if grpo.beta != 0.0 and not cfg.lora.enabled:  # full fine-tuning: the starting weights, frozen, unsharded
        m = cfg.model
        ref = load_model(m.ckpt, device=info.device, dtype=opened.compute_dtype, max_seq_len=m.max_seq_len,
                         rope_theta=m.rope_theta, rope_scaling=m.rope_scaling)
        ref_root = TokenLogprobs(ref.requires_grad_(False), cfg.model.loss_chunk).eval()
        msg.message("reference: a frozen copy of the starting weights")
    recipe = GRPO(prompts=data.train, rewards=rewards, cfg=grpo, model=parts.model, tok=data.tok, split=split,
                  device=info.device, pad_id=pad_id_of(data.tok), world_size=info.world_size, rank=info.rank,
                  ref_root=ref_root)
    run = start_run(cfg, opened, parts, split, schedule)
    run.generation = generation
    recipe.state = run.state
    recipe.first_forward(run.root)
    return run, recipe


if __name__ == "__main__":
    sys.exit(run_cli(main))
