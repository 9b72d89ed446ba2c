"""Training checkpoints that resume exactly: sharded weights + optimizer (torch.distributed.checkpoint), data
position, step and every rank's RNG state, written atomically, with a `latest` pointer updated last.

Layout of OUT/step_N/:  dcp/ (the sharded state, any world size can read it back), train_state.json,
rng/rank{r}.pt, and for LoRA runs adapter/ (a PEFT adapter, usable directly). OUT/latest holds "step_N".
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor

from ..files import atomic_write, read_json, replace_dir, write_json
from ..lora import lora_modules

LATEST = "latest"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    # only this rank's own GPU (a CPU run leaves CUDA uninitialized: asking would start a context on GPU 0)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, list):  # older checkpoints: every visible device's state
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda)


def _model_and_optim_state(root: nn.Module, optimizer, lora: bool) -> dict:
    model_sd, optim_sd = get_state_dict(root, optimizer, options=_options(lora))
    if lora:  # buffers (an NF4 base's packed weights) come from --model too
        trainable = {n for n, p in root.named_parameters() if p.requires_grad}
        model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    return {"model": model_sd, "optim": optim_sd}


def _options(lora: bool) -> StateDictOptions:
    # LoRA: the frozen base comes from --model on resume; only adapters and their optimizer state are saved.
    # Loading then cannot be strict about the (absent) frozen keys; dcp.load still fails on any missing adapter key.
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def save_lora_adapter(model: nn.Module, out_dir: Path, base: Optional[str], rank0: bool) -> None:
    """Gather every LoRA factor and whole trained module (a collective: all ranks call this) and write a PEFT
    adapter on rank 0."""
    from ..adapter import save_adapter

    swapped, full = [], {}
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is None or not (name.startswith("lora_") or p.requires_grad):
                continue
            if id(p) not in full:  # a tied weight is gathered once and stays one tensor
                t = p.full_tensor() if isinstance(p, DTensor) else p
                full[id(p)] = nn.Parameter(t.detach(), requires_grad=p.requires_grad)
            swapped.append((m, name, p))
            m._parameters[name] = full[id(p)]  # plain tensors while save_adapter reads them
    try:
        if rank0:
            save_adapter(model, out_dir, base_model_name_or_path=base)
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def export_final(root: nn.Module, model: nn.Module, out: Path, base: str, rank0: bool, lora: bool) -> Path:
    """OUT/final: a PEFT adapter (LoRA) or a Hugging Face model (full fine-tuning, gathered on rank 0)."""
    from ..checkpoints import save_hf
    from ..model import Transformer

    final = Path(out) / "final"
    if lora:
        save_lora_adapter(model, final, base, rank0)
        return final
    state = full_state_dict(root)
    if rank0:
        state = {k.removeprefix("model."): v for k, v in state.items()}
        with torch.device("meta"):
            plain = Transformer(model.args)
        missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
        if unexpected or [k for k in missing if not (k == "output.weight" and model.args.tie_embeddings)]:
            raise RuntimeError(f"export_final: state dict mismatch: missing {missing}, unexpected {unexpected}")
        plain.tie_weights()
        save_hf(plain, final, tokenizer_src=base, overwrite=True)
    dist.barrier()
    return final


def full_state_dict(root: nn.Module) -> dict:
    """Every parameter gathered to full tensors on CPU, on rank 0 (a collective; other ranks get {})."""
    return get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(out: Path, step: int, root: nn.Module, optimizer, train_state: dict, lora: bool, rank: int,
                    base: Optional[str] = None, keep: int = 0) -> Path:
    """Write OUT/step_N atomically on all ranks (shared file system), then point OUT/latest at it."""
    final = out / f"step_{step}"
    tmp = out / f".step_{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    dcp.save(_model_and_optim_state(root, optimizer, lora), checkpoint_id=str(tmp / "dcp"))
    torch.save(rng_state(), tmp / "rng" / f"rank{rank}.pt")
    if lora:
        save_lora_adapter(root.model, tmp / "adapter", base, rank == 0)
    dist.barrier()
    if rank == 0:
        write_json(tmp / "train_state.json", {**train_state, "step": step})
        replace_dir(tmp, final)
        atomic_write(out / LATEST, final.name)  # last: a crash before this leaves the previous checkpoint current
        if keep > 0:
            for old in sorted(out.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def resolve_resume(resume: str, out: Path) -> Optional[Path]:
    """--resume value -> a step dir: "latest" reads OUT/latest (None if there is none yet, a fresh start)."""
    if resume == LATEST:
        pointer = out / LATEST
        if not pointer.is_file():
            return None
        path = out / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / "train_state.json").is_file() or not (path / "dcp").is_dir():
        raise FileNotFoundError(f"--resume {resume}: {path} is not a training checkpoint (expected train_state.json "
                                "and dcp/ from a previous run's OUT/step_N)")
    return path


def load_checkpoint(path: Path, root: nn.Module, optimizer, lora: bool) -> dict:
    """Restore weights and optimizer from OUT/step_N; returns its train_state (RNG: see load_rng_state)."""
    state = _model_and_optim_state(root, optimizer, lora)
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(lora))
    return read_json(path / "train_state.json")


def load_rng_state(path: Path, rank: int) -> bool:
    """Restore this rank's RNG streams from OUT/step_N (False if the checkpoint has none for this rank)."""
    rng_file = path / "rng" / f"rank{rank}.pt"
    if not rng_file.is_file():
        return False
    set_rng_state(torch.load(rng_file, weights_only=False))
    return True
