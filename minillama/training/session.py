"""What every training recipe in train/ does around its step loop, written once: SIGTERM handling, opening the run
(--out checks, process group, --resume resolution, --overwrite), restoring a checkpoint, the run's config.json and
step log, saving, stopping on a non-finite step, and the final export.

The helpers that take `run` read a RunCore: a recipe's Run dataclass extends it with its own data.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..distributed import cleanup, init_distributed
from ..dtypes import dtype_name, parse_dtype
from ..files import atomic_write, disk_full_names
from . import config
from .fsdp import ensure_process_group
from .loop import BatchSplit, Schedule, StepLog, TrainState
from .metrics import MetricsWriter, ProgressBar, default_peak_tflops, read_metrics
from .plot import write_loss_png
from .resume import (check_out_dir, export_final, load_checkpoint, load_rng_state, remove_run_outputs,
                     resolve_resume, save_checkpoint)


@dataclass(kw_only=True)
class RunCore:
    """What every recipe's loop touches (built once by its start_run; core_fields fills it)."""

    args: object
    info: object  # DistInfo
    out: Path
    lora: bool
    model: object  # the Transformer (LoRA applied)
    root: object  # the FSDP-sharded loss wrapper around model
    optimizer: object
    trainable: list  # the parameters the optimizer updates (gradient clipping)
    split: BatchSplit
    schedule: Schedule
    total_steps: int
    state: TrainState
    log: StepLog
    aux_coef: float  # Mixtral's router load-balancing loss weight; 0 for dense models
    last_saved: object = None  # the newest checkpoint dir


def core_fields(args, info, model, root, optimizer, split, schedule, total_steps: int, state: TrainState,
                log: StepLog, resume_from: Optional[Path]) -> dict:
    """RunCore's fields as keywords, for Run(**core_fields(...), <the recipe's own fields>)."""
    return dict(args=args, info=info, out=Path(args.out), lora=args.lora_rank > 0, model=model, root=root,
                optimizer=optimizer, trainable=[p for p in root.parameters() if p.requires_grad], split=split,
                schedule=schedule, total_steps=total_steps, state=state, log=log,
                aux_coef=args.router_aux_loss_coef if model.args.n_experts else 0.0, last_saved=resume_from)


class Stop:
    """Set by SIGTERM (or --stop_at_step); the loop saves a checkpoint at the end of the step and exits."""

    requested = False

    @classmethod
    def handler(cls, signum, frame):
        cls.requested = True


def run_recipe(train: Callable[[object], int], args) -> int:
    """train(args) with SIGTERM finishing the step in flight, saving and exiting 0; the process group torn down
    after every rank is out of its collectives."""
    previous = signal.signal(signal.SIGTERM, Stop.handler)
    try:
        code = train(args)
        if dist.is_initialized():
            dist.barrier()  # no rank tears the group down while another is still inside a collective
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
        Stop.requested = False
        cleanup()


def open_run(args):
    """Before any data or model: --out checked, the process group joined, the compute dtype chosen, --resume
    resolved and --overwrite applied. -> (info, compute_dtype, msg, resume_from); msg logs on rank 0."""
    out = Path(args.out)
    inputs = {"--ckpt": args.ckpt, "--data": args.data, "--eval_data": args.eval_data, "--config": args.config}
    check_out_dir(out, args.resume, args.overwrite, inputs)  # never a previous run (or a model) lost by accident
    if args.cpu_offload and not ((args.device or "cuda").startswith("cuda") and torch.cuda.is_available()):
        raise ValueError("--cpu_offload moves GPU parameters to CPU memory; it needs --device cuda")
    info = init_distributed(args.device)
    ensure_process_group(info.device)
    compute_dtype = parse_dtype(args.dtype) or (torch.bfloat16 if info.device.type == "cuda" else torch.float32)
    msg = ProgressBar(0, enabled=info.is_rank0)
    resume_from = resolve_resume(args.resume, out, msg.message) if args.resume else None
    if args.resume and resume_from is None:
        msg.message(f"--resume: no checkpoint in {out} yet; starting a fresh run")
    if args.overwrite:  # before anything reads OUT (a DPO run's reference log-probs)
        gone = remove_run_outputs(out) if info.is_rank0 else []
        if gone:
            msg.message(f"--overwrite: removed the previous run's {', '.join(gone)} from {out}")
        dist.barrier()
    return info, compute_dtype, msg, resume_from


def restore_state(args, resume_from: Optional[Path], root, optimizer, info, msg) -> TrainState:
    """A fresh TrainState, or the checkpoint's (weights, optimizer and, on the same process count, each rank's
    RNG stream, so dropout continues exactly)."""
    state, saved = TrainState(), {}
    if resume_from is not None:
        saved = load_checkpoint(resume_from, root, optimizer, args.lora_rank > 0)
        state = TrainState.from_json(saved)
        msg.message(f"resumed from {resume_from} at step {state.step}")
    torch.manual_seed(args.seed * 1000 + info.rank + 1)  # LoRA dropout streams differ per rank
    if resume_from is not None and saved.get("world_size") == info.world_size:
        load_rng_state(resume_from, info.rank)
    return state


def start_log(args, info, split, total_steps: int, compute_dtype, model, state: TrainState, resumed: bool) -> StepLog:
    """Write OUT/config.json (the resolved flags) and open the per-step log (metrics.jsonl + progress bar)."""
    out = Path(args.out)
    if info.is_rank0:
        atomic_write(out / "config.json", config.saved_flags(
            args, world_size=info.world_size, accumulation_steps=split.accumulation,
            micro_batch_size=split.micro_batch_size, total_steps=total_steps, compute_dtype=dtype_name(compute_dtype)))
    return StepLog(MetricsWriter(out / "metrics.jsonl", resume_step=state.step if resumed else 0,
                                 enabled=info.is_rank0),
                   ProgressBar(total_steps, start=state.step, every=args.log_every, enabled=info.is_rank0),
                   model.args, info.device, info.world_size, args.lora_rank > 0,
                   args.peak_tflops or default_peak_tflops(info.device), moe=bool(model.args.n_experts))


def save(run: RunCore) -> None:
    hint = (f"; nothing half-written is left: free some space and continue from {run.last_saved} with --resume"
            if run.last_saved else "; nothing half-written is left: free some space and run again")
    with disk_full_names(run.out / f"step_{run.state.step}", hint):
        run.last_saved = save_checkpoint(run.out, run.state.step, run.root, run.optimizer,
                                         run.state.to_json(run.info.world_size), run.lora, run.info.rank,
                                         run.args.ckpt, run.args.keep)


def maybe_save(run: RunCore, stop: bool) -> None:
    """A checkpoint when stopping, and every --save_every steps (the last step saves in finish)."""
    a, step = run.args, run.state.step
    if stop or (a.save_every and step % a.save_every == 0 and step < run.total_steps):
        save(run)


def stop_on_nonfinite(run: RunCore, result) -> int:
    what = f"loss is {result.loss}" if not math.isfinite(result.loss) else f"gradient norm is {result.grad_norm}"
    run.log.message(f"step {run.state.step + 1}: {what}; stopping without an optimizer step. Last good checkpoint: "
                    f"{run.last_saved or 'none'} (lower --lr, check the data)")
    run.log.close()
    return 1


def stopped(run: RunCore) -> int:
    run.log.message(f"stopped at step {run.state.step}; checkpoint {run.last_saved}; continue with --resume")
    run.log.close()
    return 0


def export(run: RunCore) -> None:
    """The last checkpoint, final/ (PEFT adapter or HF model) and loss.png."""
    save(run)
    with disk_full_names(run.out / "final", f"; the last checkpoint {run.last_saved} is whole: free some space and "
                                            "finish with --resume"):
        final = export_final(run.root, run.model, run.out, run.args.ckpt, run.info.is_rank0, run.lora)
    run.log.close()
    if run.info.is_rank0:
        png = write_loss_png(run.out / "loss.png", read_metrics(run.out / "metrics.jsonl"))
        run.log.message(f"done: {run.state.step} steps, {run.state.tokens_seen} tokens; {final} "
                        f"({'PEFT adapter' if run.lora else 'HF model'}), {run.last_saved}, {png}")
