"""Tensor parallelism for inference, applied from outside the model (Megatron-style splits via DTensor).

Per layer: wq/wk/wv and w1/w3 are split by output rows (ColwiseParallel), wo and w2 by input columns
(RowwiseParallel, one all-reduce each), so every rank keeps n_heads/tp query heads, n_kv_heads/tp kv heads and
hidden_dim/tp FFN columns. MoE experts are split the same way along their hidden dim (every rank holds a slice
of every expert; the router is replicated, so all ranks route identically) and summed with one all-reduce.
The untied output projection is split over the vocabulary and all-gathered; the embedding (and a tied output)
is replicated. Activations between layers are plain replicated tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..linear import Linear

__all__ = ["apply_tensor_parallel", "tp_mesh"]


def tp_mesh(device: torch.device) -> DeviceMesh:
    """A 1-D mesh over every process of the (already initialised) default group."""
    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("tp",))


def _check_divisible(model: nn.Module, tp: int) -> None:
    args = model.args
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "hidden_dim": args.hidden_dim}
    if not args.tie_embeddings:
        sizes["vocab_size"] = args.vocab_size
    bad = {k: v for k, v in sizes.items() if v % tp}
    if bad:
        raise ValueError(f"tensor parallel over {tp} processes needs these sizes divisible by {tp}: {bad} "
                         "(run with a --nproc_per_node that divides them)")
    for name, m in model.named_modules():
        if any(name.endswith(s) for s in (".wq", ".wk", ".wv", ".wo", ".w1", ".w2", ".w3", "output")):
            if type(m) not in (nn.Linear, Linear) and not name.endswith("experts"):
                raise ValueError(f"tensor parallel: {name} is a {type(m).__name__}, expected a plain nn.Linear "
                                 "(merge LoRA adapters and load without quantization first)")


def _all_reduce_output(module, inputs, output):
    dist.all_reduce(output, group=module.tp_group)
    return output


@torch.no_grad()
def _shard_experts(experts: nn.Module, mesh: DeviceMesh) -> None:
    """Keep this rank's slice of every expert's hidden dim: w1/w3 (E, F/tp, D), w2 (E, D, F/tp)."""
    tp, rank = mesh.size(), mesh.get_local_rank()
    f = experts.w1.shape[1] // tp
    rows = slice(rank * f, (rank + 1) * f)
    experts.w1 = nn.Parameter(experts.w1[:, rows].clone(), requires_grad=False)
    experts.w3 = nn.Parameter(experts.w3[:, rows].clone(), requires_grad=False)
    experts.w2 = nn.Parameter(experts.w2[:, :, rows].clone(), requires_grad=False)
    experts.tp_group = mesh.get_group()
    # each rank's output is a partial sum over its hidden slice; the all-reduce completes it
    experts.register_forward_hook(_all_reduce_output)


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Split model over the 1-D mesh in place (every rank must hold the same full weights); returns it.

    Drops any KV cache: the next setup_cache allocates per-rank kv heads.
    """
    tp = mesh.size()
    if tp == 1:
        return model
    _check_divisible(model, tp)
    model.clear_cache()
    for layer in model.layers:
        plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel()}
        if model.args.n_experts:
            _shard_experts(layer.feed_forward.experts, mesh)
        else:
            plan.update({"feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                         "feed_forward.w2": RowwiseParallel()})
        parallelize_module(layer, mesh, plan)
        # Attention reshapes by its head counts: each rank now has a share of the heads
        layer.attention.n_heads //= tp
        layer.attention.n_kv_heads //= tp
    if not model.args.tie_embeddings:
        # vocab-split logits, gathered so every rank samples from the full distribution
        parallelize_module(model, mesh, {"output": ColwiseParallel(output_layouts=Replicate())})
    return model
