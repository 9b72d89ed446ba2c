"""Seeing a run: a rank-0 progress bar on stderr, metrics.jsonl, MFU and peak memory, and StepLog, which writes a
step's or an eval's record to both."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..perf import train_flops
from ..util.files import atomic_write, disk_full_names

# dense bf16 tensor-core peaks (TFLOP/s) by device name; MFU is against these unless --peak_tflops says otherwise
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "A10G": 125.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0}


def default_peak_tflops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak from PEAK_TFLOPS, or None (CPU, unknown GPU: MFU is not shown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class SavedActivations:
    """Bytes autograd keeps for backward while active: a forward's activation memory, measured, not estimated.

    Parameters (full or gathered by FSDP) are not activations and are left out; tensors sharing storage count once."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.storages = enabled, {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t) if enabled else None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter) and t.device.type != "meta":
            storage = t.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self):
        if self._hooks is not None:
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        if self._hooks is not None:
            self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class ProgressBar:
    """One redrawn stderr line on a terminal; otherwise a plain line every `every` steps (logs stay readable)."""

    def __init__(self, total: int, start: int = 0, every: int = 10, enabled: bool = True, file=None):
        self.total, self.start, self.every, self.enabled = total, start, every, enabled
        self.file = file or sys.stderr
        self.tty = enabled and self.file.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, fields: dict) -> None:
        if not self.enabled:
            return
        done = step - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else 0.0
        width = 20
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        text = " ".join(f"{k} {v}" for k, v in fields.items())
        line = f"step {step}/{self.total} [{bar}] {text} eta {_fmt_time(eta)}"
        if self.tty:
            self.file.write("\r\033[K" + line)
            if step == self.total:
                self.file.write("\n")
        elif step % self.every == 0 or step == self.total or step == self.start + 1:
            self.file.write(line + "\n")
        self.file.flush()

    def message(self, text: str) -> None:
        """A line that does not get overwritten by the bar."""
        if self.enabled:
            self.file.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.file.flush()


class MetricsWriter:
    """metrics.jsonl: one JSON object per optimizer step (and per eval), appended and flushed as it happens."""

    def __init__(self, path: Path, resume_step: Optional[int] = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and self.path.is_file():
            # steps after the checkpoint we resume from will be run again: drop their old records
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= resume_step:
                    kept.append(line)
        atomic_write(self.path, "".join(k + "\n" for k in kept))
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        if self.enabled:
            with disk_full_names(self.path, "; the last checkpoint is whole: free some space and continue with "
                                            "--resume"):
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl (bad lines ignored: a run killed mid-write leaves half a line)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class StepLog:
    """Rank 0's view of the run: metrics.jsonl records, the progress bar, and one-off messages."""

    def __init__(self, metrics: MetricsWriter, bar: ProgressBar, model_args, device, world_size: int, lora: bool,
                 peak_tflops: Optional[float], moe: bool):
        self.metrics, self.bar = metrics, bar
        self.model_args, self.device, self.world_size, self.lora = model_args, device, world_size, lora
        self.peak, self.moe = peak_tflops, moe

    def step(self, step: int, epoch: int, r) -> dict:
        """metrics.jsonl's record of a finished step (r: trainer.StepResult) and its progress line."""
        record = {"step": step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm, "tokens": r.tokens,
                  "tokens_per_s": r.tokens / r.seconds, "nonpad_frac": r.tokens / max(r.padded, 1), "epoch": epoch,
                  "time_s": r.seconds, "peak_mem_gb": peak_memory_gb(self.device)}
        record.update(r.extra)
        if self.moe:
            record["aux_loss"] = r.aux_loss
        if r.activation_mb is not None:
            record["activation_mb"] = r.activation_mb
        if self.peak:
            flops = train_flops(self.model_args, r.tokens, r.doc_len_sq / max(r.tokens, 1), lora=self.lora)
            record["mfu"] = flops / r.seconds / (self.peak * 1e12 * self.world_size)
        self.metrics.write(record)
        fields = {"loss": f"{r.loss:.4f}", "lr": f"{r.lr:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}"}
        if "rewards/accuracies" in r.extra:
            fields["acc"] = f"{r.extra['rewards/accuracies']:.2f}"
            fields["margin"] = f"{r.extra['rewards/margins']:.3f}"
        if "mfu" in record:
            fields["mfu"] = f"{record['mfu']:.1%}"
        fields["mem"] = f"{record['peak_mem_gb']:.1f}G"
        self.bar.update(step, fields)
        return record

    def eval(self, step: int, metrics: dict, final: bool = False) -> None:
        """An eval record: "loss" as eval_loss, the other metrics with an eval_ prefix, shown after the loss."""
        extra = {k: v for k, v in metrics.items() if k != "loss"}
        loss = metrics["loss"]
        self.metrics.write({"step": step, "eval_loss": loss, **{f"eval_{k}": v for k, v in extra.items()}})
        shown = "".join(f", {k} {v:.4f}" for k, v in extra.items() if k in ("rewards/accuracies", "pref_accuracy"))
        self.bar.message(f"eval loss {loss:.4f}{shown}" if final else f"step {step}: eval loss {loss:.4f}{shown}")

    def record(self, record: dict, text: str) -> None:
        """Any other record (evaluation by generation's scores) and its line."""
        self.metrics.write(record)
        self.bar.message(text)

    def message(self, text: str) -> None:
        self.bar.message(text)

    def close(self) -> None:
        self.metrics.close()
