"""Floors for speed claims: bytes a decode step must move, FLOPs a forward/backward must do, and the device's
measured copy bandwidth and matmul peak. Benchmarks report results as fractions of these."""

from __future__ import annotations

import time
from typing import Callable

import torch

from .args import ModelArgs


def param_counts(args: ModelArgs) -> dict[str, int]:
    """Parameter counts: total, per-token active (MoE uses top-k experts), embedding table and output head."""
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    ffn_one = 3 * args.dim * args.hidden_dim
    n_exp = max(args.n_experts, 1)
    active_exp = args.n_experts_per_tok if args.n_experts else 1
    router = args.dim * args.n_experts if args.n_experts else 0
    norms = 2 * args.dim
    embed = args.vocab_size * args.dim
    head = 0 if args.tie_embeddings else args.vocab_size * args.dim
    layer_total = attn + ffn_one * n_exp + router + norms
    layer_active = attn + ffn_one * active_exp + router + norms
    return {
        "total": args.n_layers * layer_total + embed + head + args.dim,
        "active": args.n_layers * layer_active + args.vocab_size * args.dim + args.dim,  # head matmul always runs
        "embed": embed,
        "layers_active": args.n_layers * layer_active,
    }


def decode_bytes_per_step(args: ModelArgs, batch: int, context: int, bytes_per_param: int = 2,
                          bytes_per_cache: int = 2) -> int:
    """Minimum bytes one decode step reads: every weight used (MoE: the experts a batch can touch) + the KV cache.

    The embedding lookup reads one row per token, so the table itself is not counted (unless tied to the head).
    """
    p = param_counts(args)
    if args.n_experts:  # a batch touches at most min(E, batch * k) experts per layer
        touched = min(args.n_experts, batch * args.n_experts_per_tok)
        per_layer = (args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
                     + 3 * args.dim * args.hidden_dim * touched + args.dim * args.n_experts + 2 * args.dim)
        weights = args.n_layers * per_layer + args.vocab_size * args.dim
    else:
        weights = p["layers_active"] + args.vocab_size * args.dim
    kv = 2 * args.n_layers * batch * context * args.n_kv_heads * args.head_dim
    return weights * bytes_per_param + kv * bytes_per_cache


def stored_weight_bytes(model) -> int:
    """Bytes of the weights one dense decode step reads, as the model stores them (int8/int4 codes and scales
    included; the embedding table only where it is the head)."""
    head = getattr(model.output, "weight", None)
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name == "inv_freq_bits" or ".cache." in name:
            continue
        if name == "tok_embeddings.weight" and head is not model.tok_embeddings.weight:
            continue
        total += t.numel() * t.element_size()
    return total


def forward_flops(args: ModelArgs, tokens: int, seq_len: int) -> float:
    """Matmul FLOPs of a forward over `tokens` tokens in causal documents of length seq_len (2 per MAC)."""
    p = param_counts(args)
    matmul = 2 * tokens * p["active"]
    # scores + weighted sum: 2 matmuls of (T x hd) by (hd x T) per head, halved by causality
    attention = 2 * 2 * args.n_layers * args.n_heads * args.head_dim * tokens * seq_len / 2
    return matmul + attention


def train_flops(args: ModelArgs, tokens: int, seq_len: int, lora: bool = False) -> float:
    """Model FLOPs of one training step (the MFU convention: recomputation from checkpointing is not counted).

    Full fine-tuning: forward + backward = 3x forward. LoRA: frozen weights need no weight gradients, so the
    backward is about one forward (input gradients) = 2x forward (adapter FLOPs are negligible).
    """
    f = forward_flops(args, tokens, seq_len)
    return f * (2.0 if lora else 3.0)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Median wall seconds of fn() after warm-up, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_copy_bandwidth(device: torch.device, mbytes: int = 1024) -> float:
    """Device memory bandwidth in bytes/s from a large tensor copy (read + write counted)."""
    n = mbytes * 2**20 // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, warmup=2, iters=10)
    return 2 * src.numel() * src.element_size() / seconds


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Achievable dense matmul FLOP/s for an n x n x n product in dtype."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    seconds = time_fn(lambda: a @ b, device, warmup=2, iters=5)
    return 2 * n**3 / seconds
