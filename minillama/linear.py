"""The model's bias-free linear layer, with the kernel choice for decoding a few rows on a CPU.

A decode step multiplies 1-16 rows of input by each weight. torch's products are far from the memory's speed there:
MKL's sgemm leaves its memory-bound path from 3-4 rows (on the project's Intel Xeon, 30 layers of SmolLM2-135M's
float32 weights at two threads: 1 row 20 ms, 4 rows 26-46, 16 rows 33-54), and oneDNN's bf16 product streams
13-16 GB/s where a plain read streams 25-30, paying ~24 us per call. So on a CPU, outside autograd, 1 to
cpu_kernels.MAX_ROWS rows of float32 or bfloat16 go through minillama's own kernel (cpu_kernels.small_linear: each
weight read once for all rows, bf16 widened exactly to float32): the same 30 layers in bf16 take 12-14 ms at 1 row
(F.linear 24) and 16 ms at 4 (F.linear 30). Its result is the same product to float32 rounding (a different
summation order, like any change of BLAS kernel), and a row's result does not depend on how many rows come with it.

Where the kernel cannot be built (no compiler, no AVX2), the earlier choices stand: on an AMD CPU 2-4 float32 rows
as (W @ x.T).T, which MKL keeps near its one-row cost there (WEIGHT_LEFT; on the Intel Xeon it is 1.5-2x slower
than the plain product); and bf16 on a CPU without native bf16 arithmetic (no AVX512-BF16 or AMX), from 4 rows up,
converted to float32 one weight matrix at a time (oneDNN's bf16 product costs about as much per row as a whole
float32 one there: 4 rows 2.2x, 256 rows 8.4x slower than the conversion).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels

SMALL_ROWS = (2, 4)  # the rows (tokens) of input for which the weight-left product is taken, inclusive
UPCAST_ROWS = 4  # bf16 without native bf16: from this many rows on, multiply in float32
NATIVE_BF16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)() or \
    getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


WEIGHT_LEFT = cpu_kernels.cpuinfo("vendor_id") == "AuthenticAMD"  # take (W @ x.T).T for SMALL_ROWS float32 rows (measured there only)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), taking minillama's kernel for a few float32/bf16 rows on a CPU (else (weight @ x.T).T
    for 2-4 float32 rows on an AMD CPU), and multiplying bf16 rows in float32 on a CPU without native bf16.
    (..., in) -> (..., out)"""
    if (bias is None and x.device.type == "cpu" and x.dtype == weight.dtype
            and type(weight) in (torch.Tensor, nn.Parameter)  # not a DTensor (tensor parallel, FSDP) or a subclass
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        if weight.is_contiguous() and cpu_kernels.takes(x):
            return cpu_kernels.product(x, weight)  # (..., out)
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if x.dtype == torch.float32 and WEIGHT_LEFT and SMALL_ROWS[0] <= rows <= SMALL_ROWS[1]:
            x2 = x.reshape(rows, x.shape[-1])  # (M, in)
            return torch.mm(weight, x2.t()).t().contiguous().view(*x.shape[:-1], weight.shape[0])  # (..., out)
        if x.dtype == torch.bfloat16 and rows >= UPCAST_ROWS and not NATIVE_BF16:
            return F.linear(x.float(), weight.float()).to(torch.bfloat16)  # (..., out)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict names) whose forward goes through linear() above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
