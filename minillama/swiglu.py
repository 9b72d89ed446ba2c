"""SwiGLU's gate, silu(a) * b, with a backward that keeps only a and b.

Autograd would also keep silu(a) (the product's other factor), one more (tokens, hidden_dim) tensor per layer for the
whole of backward: SmolLM2's 30 layers x 1K tokens in float32 hold 180 MB of it. Backward recomputes silu(a) from a
instead, with the same kernels autograd runs, so the gradients are bitwise the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:  # silu'(a) * grad * b, written over the product: one (N, F) temporary, not two
            grad_a = grad * b
            torch.ops.aten.silu_backward.grad_input(grad_a, a, grad_input=grad_a)
        if ctx.needs_input_grad[1]:
            grad_b = F.silu(a).mul_(grad)
        return grad_a, grad_b


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for same-shaped a, b; when a gradient is wanted, without keeping silu(a) for backward."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _SiluMul.apply(a, b)
    return F.silu(a) * b  # inference: the plain ops (what torch.compile sees)
