"""torchrun plumbing shared by train/ and generate/: process group set-up and rank-0 helpers.

Parallelism (FSDP, tensor parallel) is applied from outside the model; this file only knows about processes.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


# nccl for GPU tensors, plus gloo for CPU ones (FSDP CPU offload, CPU-side gathers), which nccl cannot carry
CUDA_BACKEND = "cuda:nccl,cpu:gloo"


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group (nccl + gloo on CUDA, gloo on CPU); a plain `python` run is world size 1.

    device: "cuda", "cpu" or None (CUDA when available). Each process takes cuda:LOCAL_RANK.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
        dev = torch.device("cuda", local_rank if device == "cuda" else torch.device(device).index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = CUDA_BACKEND if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, dev)


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup():
    """Destroy the process groups, then free what still holds them (FSDP / tensor-parallel device meshes) so each
    backend joins its threads now: left to interpreter shutdown, gloo aborts at random ("terminate called without
    an active exception", exit -6) after a run that otherwise succeeded."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()

