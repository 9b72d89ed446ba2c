"""The model's bias-free linear layer, with one kernel choice for decoding a few rows on a CPU.

A decode step of 2-4 rows is a matrix product with 2-4 rows of input. MKL's sgemm, asked for x @ W.T with so few
rows, does not stay on its memory-bound path: on this project's 2-core AMD EPYC a float32 decode step's matmuls of
SmolLM2-135M cost 1.4x (one thread) to 1.9x (two threads) more at 4 rows than at 1, while (W @ x.T).T, the same
product with the weight as the left operand, costs 1.35x less at one thread and 2.3x less at two (measured over 30
layers' worth of distinct weights, so they stream from memory as in a real step). From 8 rows up the two are within
noise of each other or the plain product wins, and bfloat16 on a CPU without native bf16 gets nothing from it, so
the switch is for float32, 2-4 rows, on CPU, outside autograd. The result is the same product to float32 rounding
(a different summation order), like any change of BLAS kernel. It is MKL's behaviour on AMD CPUs only: on the
project's 2-core Intel Xeon the weight-left product is the slower one (the same 30 layers at two threads: 2 rows
35-40 ms against 17-20, 4 rows 36-39 against 23-34), so the switch is taken where the CPU's vendor is AMD
(WEIGHT_LEFT).

bfloat16 on a CPU without native bf16 arithmetic (no AVX512-BF16 or AMX, as here): oneDNN's bf16 product costs
about as much per row as a whole float32 product (measured over the same 30 layers, one thread: 4 rows 2.2x, 32
rows 5.4x, 256 rows 8.4x slower than converting input and weight to float32, multiplying there and rounding the
result back). From 4 rows up linear() does that: the same float32 accumulation a bf16 GEMM does, one weight matrix
converted at a time (never a float32 copy of the model); 1-3 rows (decoding) stay in bf16, where reading half the
bytes is what counts.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

SMALL_ROWS = (2, 4)  # the rows (tokens) of input for which the weight-left product is taken, inclusive
UPCAST_ROWS = 4  # bf16 without native bf16: from this many rows on, multiply in float32
NATIVE_BF16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)() or \
    getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def cpu_vendor() -> str:
    """The CPU's vendor id ('GenuineIntel', 'AuthenticAMD'; Linux /proc/cpuinfo), '' where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


WEIGHT_LEFT = cpu_vendor() == "AuthenticAMD"  # take (W @ x.T).T for SMALL_ROWS float32 rows (measured there only)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), taking (weight @ x.T).T for a few float32 rows on an AMD CPU, and multiplying bf16
    rows in float32 on a CPU without native bf16. (..., in) -> (..., out)"""
    if (bias is None and x.device.type == "cpu" and x.dtype == weight.dtype
            and type(weight) in (torch.Tensor, nn.Parameter)  # not a DTensor (tensor parallel, FSDP) or a subclass
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
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
