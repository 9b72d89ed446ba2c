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
shown on GPUs with a known bf16 peak. SIGTERM: a line says at once that it arrived; the step in flight finishes, a
checkpoint is written at that step's end, exit 0 (under torchrun the agent waits ~30 s before SIGKILL). A
non-finite loss or gradient norm stops before the optimizer step, keeping the last checkpoint.
--eval_generate N: at every --eval_every step and at the end, greedy answers to the first N --eval_data prompts,
scored (exact match, --eval_regex, --reward pkg.module:function) into OUT/samples/ and metrics.jsonl (gen/*).
Long context: --rope_theta / --rope_scaling / --max_seq_len change the model's RoPE and context (recorded in the
exported model or beside the adapter); --context_parallel C splits every row over C processes (world = data x C
processes; minillama/training/context_parallel.py); --trainable embed norm trains embeddings and norms beside LoRA
(LongLoRA). The first step prints the activation memory per process (what autograd saves for backward).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minillama.util.cli import run as run_cli  # noqa: E402
from minillama.tools import train_flags  # noqa: E402
from minillama.training.build import build_model, load_data, pad_id_of  # noqa: E402
from minillama.training.config import TrainConfig  # noqa: E402
from minillama.training.generation_eval import GenerationEval  # noqa: E402
from minillama.training.context_parallel import check_supported, context_group  # noqa: E402
from minillama.training.schedule import BatchSplit, Schedule  # noqa: E402
from minillama.training.session import Run, open_run, save, start_run, stop_on_nonfinite, training_session  # noqa: E402
from minillama.training.sft import SFT, Feed  # noqa: E402
from minillama.training.trainer import (clip_gradients, eval_due, evaluate, finish, log_step,  # noqa: E402
                                        save_due, steps)


def parse_args(argv=None):
    return train_flags.parse_args(argv, description=__doc__)


def main(argv=None) -> int:
    cfg = train_flags.train_config(parse_args(argv))
    with training_session() as stop:  # SIGTERM: the step in flight finishes, a checkpoint is saved, exit 0
        run, recipe = setup(cfg, stop)
        for step in steps(run, recipe):  # the next global batch at the run's position, its lr set
            for mb in step.micro_batches():  # this rank's rows, a micro-batch at a time
                out = recipe.forward(run.root, mb, step.counts)  # forward: ce_sum / the batch's learned tokens
                out.loss.backward()  # backward: gradients accumulate over the micro-batches
                step.add(out)
            grad_norm = clip_gradients(run.trainable, cfg.optim.grad_clip)
            result = step.result(grad_norm)  # every rank's sums -> the step's loss and counts
            if not result.finite:
                return stop_on_nonfinite(run, result.loss, result.grad_norm)  # no step: the weights stay as they were
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            log_step(run, step, result)
            if step.first:
                run.log.message(f"activation memory (saved for backward, first micro-batch): "
                                f"{result.activation_mb:.1f} MiB per process (largest)")
            if eval_due(run):
                evaluate(run, recipe)  # the held-out loss; with --eval_generate, answers generated and scored
            if save_due(run):  # every --save_every, and at the first boundary after a SIGTERM
                save(run)
        return finish(run, recipe)  # final eval, the last checkpoint, final/ and loss.png (or: stopped)


def setup(cfg: TrainConfig, stop) -> tuple[Run, SFT]:
    """Process group, data, model + optimizer, and the state: fresh, or restored from --resume."""
    opened = open_run(cfg, stop)  # --out and --resume checked before any loading
    info, d, msg = opened.info, cfg.data, opened.log
    data = load_data(cfg, msg)
    generation = GenerationEval.build(cfg.generation, d.eval_data, data.tok)  # --eval_generate's prompts
    cp = context_group(cfg.context_parallel)
    dp_size = info.world_size // cfg.context_parallel
    split = BatchSplit.make(d.batch_size, dp_size, d.micro_batch_size)
    lengths = [len(s.ids) for s in data.train]
    schedule = Schedule(lengths, d.batch_size, d.seq_len, d.pack, cfg.seed)
    msg.message(f"batches: {len(schedule.plan(0))} per epoch of {d.batch_size} rows "
                f"({'packed' if d.pack else 'padded'}, {dp_size} data-parallel x {split.accumulation} "
                f"micro-steps of {split.micro_batch_size} rows"
                f"{f', each row split over {cfg.context_parallel} processes' if cp else ''}); non-pad fraction "
                f"{schedule.nonpad_fraction(split.micro_batch_size):.1%}; "
                f"{schedule.total_steps(cfg.max_steps, cfg.epochs)} steps")
    longest = min(d.seq_len, sum(lengths)) if d.pack else max(lengths)
    parts = build_model(cfg, info, opened.compute_dtype, msg, longest=longest)
    if cp is not None:
        check_supported(parts.model.args, cfg.model.router_aux_loss_coef)
    run = start_run(cfg, opened, parts, split, schedule)
    run.generation = generation
    feed = Feed(info.device, pad_id_of(data.tok), run.dp_rank, cp, parts.model.args.sliding_window)
    recipe = SFT(samples=data.train, eval_samples=data.eval, split=split, feed=feed, pack=d.pack, seq_len=d.seq_len,
                 aux_coef=run.aux_coef)
    return run, recipe


if __name__ == "__main__":
    sys.exit(run_cli(main))
