"""FSDP2 from outside the model: a process group even for one process, per-block torch.compile and activation
checkpointing, fully_shard (when it has work: several processes, a compute dtype to cast to, or host offload).

Each TransformerBlock is its own FSDP unit (all-gathered for its forward/backward, resharded after); the root unit
is the CausalLMLoss wrapper, which owns tok_embeddings, norm and output, so the output layer (tied to the
embedding or not) stays gathered while the chunked loss runs.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.autograd.graph import save_on_cpu
from torch.utils.checkpoint import checkpoint

from ..util.distributed import CUDA_BACKEND
from ..model import TransformerBlock


def ensure_process_group(device: torch.device) -> None:
    """A one-process group when not launched by torchrun, so one code path (FSDP) serves every world size."""
    if dist.is_initialized():
        return
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # init_process_group binds to one indexed device only
        device = torch.device("cuda", torch.cuda.current_device())
    backend = CUDA_BACKEND if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)


def fsdp_has_work(world_size: int, mixed_precision: bool, cpu_offload: bool) -> bool:
    """Whether fully_shard does anything for this run: shard over several processes, cast parameters to a compute
    dtype, or keep them on the host. One process computing in its parameters' own dtypes skips it: there FSDP2 only
    copied each block's parameters into and out of its buffers and ran its hooks and a DTensor optimizer step
    (issue 21 measured SmolLM2 LoRA on a CPU slower with it, and 280 MB larger). Checkpoints do not notice: saved
    pieces are boxes of the global tensor either way."""
    return world_size > 1 or mixed_precision or cpu_offload


def compile_blocks(model: nn.Module) -> None:
    """torch.compile every TransformerBlock's training forward (regional compilation, as torchtitan does): dynamo
    treats a block's parameters as inputs, so one compiled graph serves all blocks, and inductor fuses what runs
    between the matrix products (RMSNorm, RoPE, SwiGLU, LoRA's scaling, the residual adds).

    Forwards that read or write a KV cache (generation during training: evaluation, GRPO rollouts) stay eager, and
    packed rows' attention runs between two graphs (attention.attend, while compiling), so batches with different
    document spans do not recompile. Applied before checkpoint_activations (which then recomputes the compiled
    forward) and before fully_shard (whose hooks stay outside the graph). Wrapping `forward` on the instance leaves
    parameter names, and so checkpoints, unchanged.
    """
    for block in model.modules():
        if isinstance(block, TransformerBlock):
            eager = block.forward
            compiled = torch.compile(eager)

            def forward(x, cos, sin, attn, step=None, _eager=eager, _compiled=compiled):
                return (_compiled if step is None else _eager)(x, cos, sin, attn, step)

            block.forward = forward


def checkpoint_activations(model: nn.Module, offload: bool = False) -> None:
    """Per-block activation checkpointing (non-reentrant): keep each block's input, recompute its inside in backward.
    offload (GPU): the kept inputs wait in pinned host memory until their block's backward (save_on_cpu sees only
    what the checkpoint saves, which is the block's inputs).

    Wrapping `forward` on the instance (not the module) leaves parameter names, and so checkpoints, unchanged.
    """
    for block in model.modules():
        if isinstance(block, TransformerBlock):
            inner = block.forward

            def forward(*args, _inner=inner, **kwargs):
                with save_on_cpu(pin_memory=True) if offload else nullcontext():
                    return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            block.forward = forward


def apply_fsdp(root: nn.Module, param_dtype: Optional[torch.dtype] = None, cpu_offload: bool = False,
               reshard_after_forward: bool = True, device: Optional[torch.device] = None,
               reduce_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """fully_shard every TransformerBlock, then the root, over all processes on `device`'s type (default: where the
    parameters are). param_dtype: compute dtype (e.g. bf16) with fp32 grad reduction; None computes in the
    parameters' own dtype. Gradients are summed across ranks, not averaged: the trainer already divides by the
    global token count. reduce_dtype: the gradients' reduce-scatter dtype (default float32 with param_dtype, else
    the parameters' own; pure bf16 training passes float32).

    Parameters may arrive on CPU: fully_shard moves each unit's parameters to the device as it shards them, so only
    one unsharded block is ever on the GPU (with cpu_offload the shards then go back to CPU)."""
    # an explicit mesh: fully_shard's default picks CUDA whenever it exists, even for a --device cpu run
    device = torch.device(device) if device is not None else next(root.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype,
                              reduce_dtype=reduce_dtype or (torch.float32 if param_dtype else None))
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in root.modules():
        if isinstance(block, TransformerBlock):
            fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload,
                        reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=mesh, mp_policy=mp, offload_policy=offload)
    for module in root.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM/AVG
    return root
