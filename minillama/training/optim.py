"""AdamW with weight decay on matrices only, LoRA+ learning rates for the B factors, and the warmup + cosine
learning-rate schedule (which scales every group's rate by its lr_scale)."""

from __future__ import annotations

import math

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
                    eps: float = 1e-8, lora_plus_ratio: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (works on FSDP2's sharded DTensor parameters)."""
    groups = param_groups(model, weight_decay, lora_plus_ratio)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
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
