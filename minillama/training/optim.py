"""AdamW with weight decay on matrices only, LoRA+ learning rates for the B factors, AdamW for pure bf16 training
(stochastic rounding, no fp32 master weights), and the warmup + cosine learning-rate schedule (which scales every
group's rate by its lr_scale)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def is_lora_b(name: str) -> bool:
    """A LoRA B factor: lora_b on a linear, lora_w1_b / lora_w2_b / lora_w3_b on Mixtral's experts."""
    leaf = name.rpartition(".")[2]
    return leaf.startswith("lora_") and leaf.endswith("_b")


def param_groups(model: nn.Module, weight_decay: float, lora_plus_ratio: float = 0.0) -> list[dict]:
    """Trainable parameters split into decayed (ndim >= 2: linear/expert/router/embedding matrices and LoRA A/B)
    and not decayed (ndim < 2: norm gains, biases, DoRA magnitudes), the rule of Meta's and nanoGPT's trainers.

    lora_plus_ratio > 0 (LoRA+, Hayou et al. 2024; LLaMA-Factory's loraplus_lr_ratio): the LoRA B factors get
    their own group whose learning rate is lora_plus_ratio times the others' (lr_scale, applied by set_lr).
    """
    decay, no_decay, lora_b = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            if lora_plus_ratio > 0 and is_lora_b(name):
                lora_b.append(p)
            else:
                (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay and not lora_b:
        raise ValueError("the model has no trainable parameters (LoRA not applied, or everything frozen)")
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    if lora_plus_ratio > 0:
        if not lora_b:
            raise ValueError("--lora_plus_ratio: the model has no LoRA B factors to give a higher learning rate")
        groups.append({"params": lora_b, "weight_decay": weight_decay, "lr_scale": float(lora_plus_ratio)})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                    eps: float = 1e-8, lora_plus_ratio: float = 0.0,
                    master_dtype: torch.dtype = torch.float32) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (works on FSDP2's sharded DTensor parameters); master_dtype bfloat16:
    AdamWBF16 (bf16 weights and moments, stochastic rounding)."""
    groups = param_groups(model, weight_decay, lora_plus_ratio)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    if master_dtype == torch.bfloat16:
        return AdamWBF16(groups, lr=lr, betas=betas, eps=eps)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup from lr/warmup to lr over warmup_steps,
    then cosine decay to min_lr_ratio * lr at total_steps."""
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate for this step, times each group's lr_scale (LoRA+'s B factors)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def stochastic_round_bf16(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """float32 -> bfloat16, rounding up with probability equal to the fraction the rounding drops.

    bf16 keeps the top 16 bits of a float32: adding a uniform random 16-bit integer to the low bits before cutting
    them off rounds up exactly when the dropped fraction exceeds the random draw (Gupta et al. 2015), so the
    rounded value is the float32 value on average."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    finite = torch.isfinite(x)
    rounded = ((bits + noise) & -65536).view(torch.float32)  # -65536 = 0xFFFF0000: keep the top 16 bits
    return torch.where(finite, rounded, x.float()).to(torch.bfloat16)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (a view: writing it writes the parameter), or t itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class AdamWBF16(torch.optim.Optimizer):
    """AdamW for bfloat16 weights without float32 master copies: the moments m, v are kept in bfloat16 too, each
    step's arithmetic runs in float32, and the new weight is stochastically rounded to bfloat16, so an update far
    below a weight's bf16 spacing (2^-8 of its magnitude) still moves it on average; round-to-nearest would drop it.
    8 bytes per trained parameter (weight, gradient, m, v) instead of 16 with float32 master weights and moments.
    Works on FSDP2's sharded DTensor parameters (the states are DTensors too, so checkpoints shard them)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.bfloat16:
                    raise ValueError(f"AdamWBF16 updates bfloat16 parameters; got one in {p.dtype}")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                w, g = _local(p), _local(p.grad).float()
                m, v = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                m32 = m.float().mul_(b1).add_(g, alpha=1 - b1)
                v32 = v.float().mul_(b2).addcmul_(g, g, value=1 - b2)
                w32 = w.float().mul_(1 - group["lr"] * group["weight_decay"])
                denom = (v32 / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                w32.addcdiv_(m32, denom, value=-group["lr"] / (1 - b1 ** t))
                m.copy_(m32)
                v.copy_(v32)
                w.copy_(stochastic_round_bf16(w32))
