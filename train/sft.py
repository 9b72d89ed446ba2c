"""Supervised fine-tuning with FSDP2: LoRA, QLoRA (NF4 base) or full fine-tuning, on one or many processes.

    torchrun --nproc_per_node 1 train/sft.py                      # LoRA: embedded SmolLM2 + train/data/reviews.jsonl
    torchrun --nproc_per_node 8 train/sft.py --model llama3-8b-dir --data chat.jsonl --pack --seq_len 8192
    torchrun --nproc_per_node 2 train/sft.py --lora_rank 0 --lr 2e-5  # full fine-tuning
    python train/sft.py --config run.toml --max_steps 10              # flags override the file's keys
    torchrun --nproc_per_node 8 train/sft.py --pack --seq_len 65536 --context_parallel 4 --rope_theta 4e6 \\
        --max_seq_len 65536 --trainable embed norm               # long rows: each split over 4 processes
    torchrun ... train/sft.py --out OUT --resume                      # continue from OUT/latest with the run's
                                                                  # saved flags (OUT/config.json; new ones win;
                                                                  # any number of processes)
    torchrun ... train/sft.py --out OUT --overwrite                   # start over in a used OUT

A non-empty --out is refused unless --resume or --overwrite says what to do with the run there.

Outputs in --out: config.json (resolved flags), metrics.jsonl (one record per step), loss.png, step_N/ (resumable
checkpoints: sharded weights + optimizer + data position + RNG, safetensors and JSON with a SHA-256 manifest, no
pickle; LoRA runs also hold a PEFT adapter/), latest, and final/ (LoRA: a PEFT adapter; full fine-tuning: a Hugging
Face model dir).
The loss of a step is the mean over every learned token of the whole global batch (all ranks, all micro-batches),
so it does not depend on the number of processes or of accumulation steps.

Choices: AdamW (betas 0.9/0.95) with weight decay on matrices only (linear, embedding, expert, router and LoRA A/B;
not norms/biases); linear warmup then cosine decay to --min_lr_ratio (10%) of --lr; grad-norm clipping at 1.0.
Mixtral: router load-balancing loss (HF's formula, padding excluded) weighted by --router_aux_loss_coef 0.02 (the
value in Mixtral's released config.json), computed per micro-batch and averaged. Compute in bf16 on GPU (FSDP2
MixedPrecisionPolicy, fp32 gradient reduction) with fp32 master weights for trained parameters; a LoRA run keeps
its frozen base in the compute dtype and its adapters in fp32. MFU = model FLOPs (minillama.util.perf: 3x
forward for full fine-tuning, 2x for LoRA, causal attention per document) / time / (--peak_tflops x processes),
shown on GPUs with a known bf16 peak. SIGTERM: the step in flight finishes, a checkpoint is written, exit 0 (under
torchrun the agent waits ~30 s before SIGKILL). A non-finite loss or gradient norm stops before the optimizer step,
keeping the last checkpoint.
Long context: --rope_theta / --rope_scaling / --max_seq_len change the model's RoPE and context (recorded in the
exported model or beside the adapter); --context_parallel C splits every row over C processes (world = data x C
processes; minillama/training/context_parallel.py); --trainable embed norm trains embeddings and norms beside LoRA
(LongLoRA). The first step prints the activation memory per process (what autograd saves for backward).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minillama.util.cli import run as run_cli  # noqa: E402
from minillama.training import config  # noqa: E402
from minillama.training.build import build_model, load_data, pad_id_of  # noqa: E402
from minillama.training.context_parallel import check_supported, context_group  # noqa: E402
from minillama.training.loop import BatchSplit, Feed, Schedule, evaluate, train_step  # noqa: E402
from minillama.training.optim import lr_at  # noqa: E402
from minillama.training.session import (RunCore, Stop, core_fields, export, maybe_save, open_run,  # noqa: E402
                                        restore_state, run_recipe, start_log, stop_on_nonfinite, stopped)


def parse_args(argv=None):
    return config.parse_args(argv, description=__doc__)


def main(argv=None) -> int:
    return run_recipe(train, parse_args(argv))


@dataclass(kw_only=True)
class Run(RunCore):
    """Everything the loop touches; built once by start_run."""

    samples: list
    eval_samples: object
    feed: Feed  # device, padding, this rank's share of the rows (and its context-parallel shard)


def train(args) -> int:
    """The recipe: data, model, optional resume, the step loop, final checkpoint + export. Returns the exit code."""
    run = start_run(args)
    first_step = run.state.step + 1  # its activation memory is measured and printed
    while run.state.step < run.total_steps:
        batch = run.schedule.next_batch(run.state)
        lr = lr_at(run.state.step + 1, args.lr, args.warmup_steps, run.total_steps, args.min_lr_ratio)
        first = run.state.step + 1 == first_step
        result = train_step(run.root, run.optimizer, run.trainable, run.samples, batch, run.split, run.feed, lr,
                            args.pack, args.grad_clip, run.aux_coef, Stop.requested, measure=first)
        if not result.finite:
            return stop_on_nonfinite(run, result)
        if first:
            run.log.message(f"activation memory (saved for backward, first micro-batch): "
                            f"{result.activation_mb:.1f} MiB per process (largest)")
        run.state.advance(result.tokens)
        run.log.step(run.state.step, run.state.epoch, result)
        maybe_eval(run)
        stop = result.stop_requested or run.state.step == args.stop_at_step
        maybe_save(run, stop)
        if stop:
            return stopped(run)
    finish(run)
    return 0


def start_run(args) -> Run:
    """Process group, data, model + optimizer, and the state: fresh, or restored from --resume."""
    info, compute_dtype, msg, resume_from = open_run(args)  # --out and --resume checked before any loading

    tok, samples, eval_samples = load_data(args, msg)
    cp = context_group(args.context_parallel)
    dp_size = info.world_size // args.context_parallel
    split = BatchSplit.make(args.batch_size, dp_size, args.micro_batch_size)
    schedule = Schedule([len(s.ids) for s in samples], args.batch_size, args.seq_len, args.pack, args.seed)
    total_steps = schedule.total_steps(args.max_steps, args.epochs)
    msg.message(f"batches: {len(schedule.plan(0))} per epoch of {args.batch_size} rows "
                f"({'packed' if args.pack else 'padded'}, {dp_size} data-parallel x {split.accumulation} "
                f"micro-steps of {split.micro_batch_size} rows"
                f"{f', each row split over {args.context_parallel} processes' if cp else ''}); non-pad fraction "
                f"{schedule.nonpad_fraction(split.micro_batch_size):.1%}; {total_steps} steps")

    lengths = [len(s.ids) for s in samples]
    longest = min(args.seq_len, sum(lengths)) if args.pack else max(lengths)
    model, root, optimizer = build_model(args, info, compute_dtype, msg, longest=longest)
    if cp is not None:
        check_supported(args, model.args)
    state = restore_state(args, resume_from, root, optimizer, info, msg)
    log = start_log(args, info, split, total_steps, compute_dtype, model, state, resume_from is not None)
    pad_id = pad_id_of(tok)
    feed = Feed(info.device, pad_id, info.rank // args.context_parallel, cp, model.args.sliding_window)
    return Run(**core_fields(args, info, model, root, optimizer, split, schedule, total_steps, state, log, resume_from),
               samples=samples, eval_samples=eval_samples, feed=feed)


def run_eval(run: Run) -> float:
    return evaluate(run.root, run.eval_samples, run.split, run.args.seq_len, run.args.pack, run.feed)


def maybe_eval(run: Run) -> None:
    a, step = run.args, run.state.step
    if run.eval_samples and a.eval_every and step % a.eval_every == 0 and step < run.total_steps:
        run.log.eval(step, run_eval(run))


def finish(run: Run) -> None:
    """Final eval, then the last checkpoint, final/ (PEFT adapter or HF model) and the loss curve."""
    if run.eval_samples:
        run.log.eval(run.state.step, run_eval(run), final=True)
    export(run)


if __name__ == "__main__":
    sys.exit(run_cli(main))
