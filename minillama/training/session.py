"""What every training recipe does around its step loop, written once: SIGTERM caught (Stop), the run opened (--out
checks, process group, --resume resolution, --overwrite), the state restored from a checkpoint, OUT/config.json and
the step log started, checkpoints saved, and the end of a run (stopped, a non-finite step, or final/ exported).

A recipe builds a Run with start_run; the loop (trainer.py) and these helpers read it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..util.distributed import DistInfo, cleanup, init_distributed
from ..util.dtypes import dtype_name, parse_dtype
from ..util.files import atomic_write, disk_full_names
from ..util.plot import write_loss_png
from .config import TrainConfig
from .fsdp import ensure_process_group
from .metrics import MetricsWriter, ProgressBar, StepLog, default_peak_tflops, read_metrics
from .resume import (check_out_dir, export_final, load_training_state, load_rng_state, remove_run_outputs,
                     resolve_resume, save_training_state)
from .schedule import BatchSplit, Schedule, TrainState


class Stop:
    """SIGTERM's flag. The loop reads `requested` itself at every step boundary (never a copy taken earlier), so
    the checkpoint comes at the end of the step in flight; the handler says at once that the signal arrived."""

    def __init__(self):
        self.requested = False

    def handler(self, signum, frame) -> None:
        first, self.requested = not self.requested, True  # set before anything that could fail
        if first:
            rank = os.environ.get("RANK")
            who = f"rank {rank}: " if rank not in (None, "0") else ""
            text = f"{who}SIGTERM received: saving a checkpoint at the end of this step, then exiting\n"
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
            except RuntimeError:  # the signal interrupted a write to stderr (the progress bar), which cannot reenter
                os.write(2, text.encode())


@contextmanager
def training_session() -> Iterator[Stop]:
    """SIGTERM sets the yielded Stop for the duration; afterwards the process group is torn down once every rank
    is out of its collectives (a barrier first, unless leaving by an exception)."""
    stop = Stop()
    previous = signal.signal(signal.SIGTERM, stop.handler)
    try:
        yield stop
        if dist.is_initialized():
            dist.barrier()  # no rank tears the group down while another is still inside a collective
    finally:
        signal.signal(signal.SIGTERM, previous)
        cleanup()


@dataclass
class Opened:
    """A run before its data and model: the process group joined, the compute dtype chosen, --resume resolved."""

    info: DistInfo
    compute_dtype: torch.dtype
    log: ProgressBar  # rank 0's messages until the step log exists
    resume_from: Optional[Path]  # the verified step_N to continue from, or None
    stop: Stop


def open_run(cfg: TrainConfig, stop: Stop) -> Opened:
    """Before any data or model: --out checked, the process group joined, the compute dtype chosen, --resume
    resolved and --overwrite applied."""
    out = Path(cfg.out)
    inputs = {"--ckpt": cfg.model.ckpt, "--data": cfg.data.data, "--eval_data": cfg.data.eval_data,
              "--config": cfg.flags.get("config")}
    check_out_dir(out, cfg.resume, cfg.overwrite, inputs)  # never a previous run (or a model) lost by accident
    if cfg.model.cpu_offload and not ((cfg.device or "cuda").startswith("cuda") and torch.cuda.is_available()):
        raise ValueError("--cpu_offload moves GPU parameters to CPU memory; it needs --device cuda")
    info = init_distributed(cfg.device)
    ensure_process_group(info.device)
    compute_dtype = parse_dtype(cfg.model.dtype) or (torch.bfloat16 if info.device.type == "cuda" else torch.float32)
    msg = ProgressBar(0, enabled=info.is_rank0)
    resume_from = resolve_resume(cfg.resume, out, msg.message) if cfg.resume else None
    if cfg.resume and resume_from is None:
        msg.message(f"--resume: no checkpoint in {out} yet; starting a fresh run")
    if cfg.overwrite:  # before anything reads OUT (a DPO run's reference log-probs)
        gone = remove_run_outputs(out) if info.is_rank0 else []
        if gone:
            msg.message(f"--overwrite: removed the previous run's {', '.join(gone)} from {out}")
        dist.barrier()
    return Opened(info=info, compute_dtype=compute_dtype, log=msg, resume_from=resume_from, stop=stop)


@dataclass
class ModelParts:
    """What build_model makes: the model (LoRA applied), the FSDP-sharded loss wrapper around it, and AdamW."""

    model: torch.nn.Module  # the Transformer
    root: torch.nn.Module  # CausalLMLoss / SequenceLogprobs around model, the FSDP root
    optimizer: torch.optim.Optimizer


@dataclass(kw_only=True)
class Run:
    """Everything the loop touches, built once by start_run."""

    cfg: TrainConfig
    info: DistInfo
    model: torch.nn.Module
    root: torch.nn.Module
    optimizer: torch.optim.Optimizer
    split: BatchSplit
    schedule: Schedule
    total_steps: int
    state: TrainState
    log: StepLog
    stop: Stop
    dp_rank: int  # which share of each global batch's rows this rank takes (ranks of a context group share one)
    last_saved: Optional[Path] = None  # the newest checkpoint dir
    stopping: bool = False  # set at a step boundary: SIGTERM or --stop_at_step
    generation: Optional[object] = None  # GenerationEval (--eval_generate), set by the recipe's setup
    steps_here: int = 0  # steps this process has taken (a resumed run starts at 0)
    trainable: list = field(default_factory=list)  # the parameters the optimizer updates (gradient clipping)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def aux_coef(self) -> float:
        """Mixtral's router load-balancing loss weight; 0 for dense models."""
        return self.cfg.model.router_aux_loss_coef if self.model.args.n_experts else 0.0


def start_run(cfg: TrainConfig, opened: Opened, parts: ModelParts, split: BatchSplit, schedule: Schedule) -> Run:
    """The run's state (fresh, or restored from --resume), OUT/config.json and the step log."""
    info = opened.info
    total_steps = schedule.total_steps(cfg.max_steps, cfg.epochs)
    state = restore_state(cfg, opened, parts)
    log = start_log(cfg, opened, split, total_steps, parts.model, state)
    return Run(cfg=cfg, info=info, model=parts.model, root=parts.root, optimizer=parts.optimizer, split=split,
               schedule=schedule, total_steps=total_steps, state=state, log=log, stop=opened.stop,
               dp_rank=info.rank // cfg.context_parallel, last_saved=opened.resume_from,
               trainable=[p for p in parts.root.parameters() if p.requires_grad])


def restore_state(cfg: TrainConfig, opened: Opened, parts: ModelParts) -> TrainState:
    """A fresh TrainState, or the checkpoint's (weights, optimizer and, on the same process count, each rank's
    RNG stream, so dropout continues exactly)."""
    state, saved, resume_from, info = TrainState(), {}, opened.resume_from, opened.info
    if resume_from is not None:
        saved = load_training_state(resume_from, parts.root, parts.optimizer, cfg.lora.enabled)
        state = TrainState.from_json(saved)
        opened.log.message(f"resumed from {resume_from} at step {state.step}")
    torch.manual_seed(cfg.seed * 1000 + info.rank + 1)  # LoRA dropout streams differ per rank
    if resume_from is not None and saved.get("world_size") == info.world_size:
        load_rng_state(resume_from, info.rank)
    return state


def start_log(cfg: TrainConfig, opened: Opened, split: BatchSplit, total_steps: int, model,
              state: TrainState) -> StepLog:
    """Write OUT/config.json (the resolved flags and what the run derived) and open the step log (metrics.jsonl +
    progress bar)."""
    out, info = Path(cfg.out), opened.info
    if info.is_rank0:
        resolved = dict(world_size=info.world_size, accumulation_steps=split.accumulation,
                        micro_batch_size=split.micro_batch_size, total_steps=total_steps,
                        compute_dtype=dtype_name(opened.compute_dtype))
        atomic_write(out / "config.json", json.dumps({**cfg.flags, **resolved}, indent=2) + "\n")
    resumed = opened.resume_from is not None
    return StepLog(MetricsWriter(out / "metrics.jsonl", resume_step=state.step if resumed else 0,
                                 enabled=info.is_rank0),
                   ProgressBar(total_steps, start=state.step, every=cfg.log_every, enabled=info.is_rank0),
                   model.args, info.device, info.world_size, cfg.lora.enabled,
                   cfg.peak_tflops or default_peak_tflops(info.device), moe=bool(model.args.n_experts))


def save(run: Run) -> None:
    """OUT/step_N now (every rank takes part); a full disk is one line that says how to go on."""
    hint = (f"; nothing half-written is left: free some space and continue from {run.last_saved} with --resume"
            if run.last_saved else "; nothing half-written is left: free some space and run again")
    with disk_full_names(run.out / f"step_{run.state.step}", hint):
        run.last_saved = save_training_state(run.out, run.state.step, run.root, run.optimizer,
                                         run.state.to_json(run.info.world_size), run.cfg.lora.enabled,
                                         run.cfg.model.ckpt, run.cfg.keep)


def stop_on_nonfinite(run: Run, loss: float, grad_norm: float) -> int:
    """A non-finite loss or gradient norm: no optimizer step, the last checkpoint stays current; exit code 1."""
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
    run.log.message(f"step {run.state.step + 1}: {what}; stopping without an optimizer step. Last good checkpoint: "
                    f"{run.last_saved or 'none'} (lower --lr, check the data)")
    run.log.close()
    return 1


def stopped(run: Run) -> int:
    run.log.message(f"stopped at step {run.state.step}; checkpoint {run.last_saved}; continue with --resume")
    run.log.close()
    return 0


def export(run: Run) -> None:
    """The last checkpoint, final/ (PEFT adapter or HF model) and loss.png."""
    save(run)
    lora = run.cfg.lora.enabled
    with disk_full_names(run.out / "final", f"; the last checkpoint {run.last_saved} is whole: free some space and "
                                            "finish with --resume"):
        final = export_final(run.root, run.model, run.out, run.cfg.model.ckpt, run.info.is_rank0, lora)
    run.log.close()
    if run.info.is_rank0:
        png = write_loss_png(run.out / "loss.png", read_metrics(run.out / "metrics.jsonl"))
        run.log.message(f"done: {run.state.step} steps, {run.state.tokens_seen} tokens; {final} "
                        f"({'PEFT adapter' if lora else 'HF model'}), {run.last_saved}, {png}")
