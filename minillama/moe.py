"""Mixtral's sparse mixture-of-experts FFN: top-k routing, per-expert dispatch of only the routed tokens.

Shape letters: N tokens (B*T flattened), D model dim, F expert hidden dim, E experts, k experts per token.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .swiglu import silu_mul


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their weights (softmax over the chosen k, in float32). (N, E) -> (N, k) x2"""
    top_logits, top_idx = torch.topk(router_logits.float(), top_k, dim=-1)
    return F.softmax(top_logits, dim=-1), top_idx


def grouped_mm_ok(device: torch.device, dtype: torch.dtype, *weights) -> bool:
    """Whether torch._grouped_mm can multiply rows (M, in) of `dtype` on `device` by each stacked weight (E, out, in).

    It runs on CPU in any float dtype, on CUDA in bfloat16 on Hopper (sm90) and newer; every row must start on a
    16-byte boundary (a LoRA rank of 2 in float32 does not), and all tensor operands share the rows' dtype. Under
    torch.compile only bfloat16 traces (its shape function checks for it, on every device).
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return False
    if device.type == "cuda":
        # get_device_properties, not get_device_capability: torch.compile folds the first to a constant (dynamo's
        # constant-fold list, torch 2.11); the second is not on it and could split the compiled decode step
        if dtype != torch.bfloat16 or torch.cuda.get_device_properties(device).major < 9:
            return False
    elif device.type != "cpu":
        return False
    size = dtype.itemsize
    for w in weights:  # a tensor, or an NF4Weight (dequantized to the rows' dtype when used)
        if not getattr(w, "groupable", True):  # weight_only.QuantizedStack: int8/int4 experts run one at a time
            return False
        if isinstance(w, torch.Tensor) and w.dtype != dtype:
            return False
        if w.shape[-1] * size % 16 or w.shape[-2] * size % 16:
            return False
    return True


def grouped_linear(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of xs grouped by expert (offsets: (E,) int32 running ends) times each group's w[e]^T. -> (M, out)"""
    return torch._grouped_mm(xs, w.transpose(1, 2), offs=offsets)


class ExpertStack(Protocol):
    """What `dispatch` needs from an expert module (Experts, QuantizedExperts, lora.LoRAExperts).

    n_experts: E. expert_forward(e, x): expert e on its routed tokens (n, D) -> (n, D), the per-expert loop.
    grouped_ok(x): whether grouped_forward can run for x's device/dtype. grouped_forward(xs, offsets): every
    expert at once on token-slots sorted by expert (M, D) -> (M, D), offsets (E,) int32 running ends.
    """

    n_experts: int

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor: ...

    def grouped_ok(self, x: torch.Tensor) -> bool: ...

    def grouped_forward(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor: ...


def dispatch(experts: ExpertStack, x: torch.Tensor, weights: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's chosen experts. x (N, D), weights/expert_idx (N, k) -> (N, D)"""
    k = expert_idx.shape[1]
    flat_expert = expert_idx.flatten()  # (N*k,)
    order = torch.argsort(flat_expert, stable=True)  # token-slots grouped by expert
    token_of_slot = order // k
    slot_weights = weights.flatten()[order, None]  # (N*k, 1)
    # tokens per expert; scatter_add keeps the shape static (bincount's depends on the data) for torch.compile
    counts = torch.zeros(experts.n_experts, dtype=torch.long, device=x.device)
    counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))  # (E,)
    out = torch.zeros_like(x)
    if experts.grouped_ok(x):
        # one grouped GEMM per weight over all experts; offsets stay on the device (no host sync)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        y = experts.grouped_forward(x[token_of_slot], offsets)  # (N*k, D)
        return out.index_add_(0, token_of_slot, (y * slot_weights).to(x.dtype))
    if torch.compiler.is_compiling():
        # the loop syncs with the host and slices by each expert's count: under torch.compile it runs between two
        # graphs, eagerly, instead of recompiling the rest of the layer for every new set of counts
        return torch.compiler.disable(_expert_loop)(experts, x, counts, token_of_slot, slot_weights, out)
    return _expert_loop(experts, x, counts, token_of_slot, slot_weights, out)


def _expert_loop(experts: ExpertStack, x: torch.Tensor, counts: torch.Tensor, token_of_slot: torch.Tensor,
                 slot_weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """dispatch's per-expert loop: each expert on its routed tokens, added into out (N, D) with the slots' weights.
    counts (E,), token_of_slot (N*k,) sorted by expert, slot_weights (N*k, 1)."""
    start = 0
    for e, n in enumerate(counts.tolist()):  # a loop over experts, never over tokens
        if n == 0:
            continue
        tokens = token_of_slot[start:start + n]
        y = experts.expert_forward(e, x[tokens])  # (n, D)
        out.index_add_(0, tokens, (y * slot_weights[start:start + n]).to(x.dtype))
        start += n
    return out


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights: w1/w3 (E, F, D), w2 (E, D, F)."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=0.02)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its routed tokens. (n, D) -> (n, D)"""
        return F.linear(silu_mul(F.linear(x, self.w1[e]), F.linear(x, self.w3[e])), self.w2[e])

    def grouped_ok(self, x: torch.Tensor) -> bool:
        return grouped_mm_ok(x.device, x.dtype, self.w1, self.w2, self.w3)

    def grouped_forward(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Every expert on its slots at once. xs (M, D) sorted by expert -> (M, D)"""
        h = silu_mul(grouped_linear(xs, self.w1, offsets), grouped_linear(xs, self.w3, offsets))  # (M, F)
        return grouped_linear(h, self.w2, offsets)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        return dispatch(self, x, weights, expert_idx)


class QuantizedExperts(nn.Module):
    """Experts whose frozen stacks w1/w3 (E, F, D) and w2 (E, D, F) are quantized: quant.NF4Weight or
    weight_only.QuantizedStack, each multiplying by matrix e with `.linear(x, e)`. Filled one stack at a time as they
    load (quant.set_nf4_, weight_only.set_quantized_). The grouped path runs where every stack is groupable (NF4:
    `.grouped_linear(xs, offsets)` dequantizes one stack at a time); int8/int4 stacks run the per-expert loop."""

    def __init__(self, w1: Optional[nn.Module] = None, w2: Optional[nn.Module] = None,
                 w3: Optional[nn.Module] = None):
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3

    @property
    def n_experts(self) -> int:
        return self.w1.shape[0]

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its routed tokens. (n, D) -> (n, D)"""
        return self.w2.linear(silu_mul(self.w1.linear(x, e), self.w3.linear(x, e)), e)

    def grouped_ok(self, x: torch.Tensor) -> bool:
        return grouped_mm_ok(x.device, x.dtype, self.w1, self.w2, self.w3)

    def grouped_forward(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Every expert on its slots at once. xs (M, D) sorted by expert -> (M, D)"""
        h = silu_mul(self.w1.grouped_linear(xs, offsets), self.w3.grouped_linear(xs, offsets))  # (M, F)
        return self.w2.grouped_linear(h, offsets)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        return dispatch(self, x, weights, expert_idx)


class MoEFeedForward(nn.Module):
    """Router (`gate`) + experts. Keeps the last router logits for the trainer's load-balancing loss."""

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, n_experts_per_tok: int):
        super().__init__()
        self.top_k = n_experts_per_tok
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.experts = Experts(n_experts, dim, hidden_dim)
        self.router_logits: Optional[torch.Tensor] = None  # (N, E), from the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        router_logits = self.gate(x)  # (N, E)
        if not torch.is_grad_enabled() or torch._C._current_graph_task_id() == -1:
            # not inside backward (checked only with grad on: inference, compiled decoding too, never recomputes):
            # a checkpointed block recomputed there would otherwise replace the forward's
            # logits (which the loss already used) by the recomputation's, whose graph keeps that block's saved
            # tensors alive until the next step: every MoE block's attention activations, piling up in backward
            self.router_logits = router_logits
        weights, expert_idx = route(router_logits, self.top_k)
        return self.experts(x, weights, expert_idx).reshape(shape)


def load_balancing_loss(router_logits: list[torch.Tensor], n_experts: int, top_k: int,
                        token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch-Transformer auxiliary loss as Mixtral/HF compute it: E * sum_e(frac_tokens_e * mean_prob_e).

    router_logits: one (N, E) tensor per MoE layer; token_mask (N,) bool/0-1 drops padding from the statistics.
    """
    logits = torch.cat([r.float() for r in router_logits], dim=0)  # (L*N, E)
    probs = F.softmax(logits, dim=-1)
    _, chosen = torch.topk(probs, top_k, dim=-1)
    chosen_onehot = F.one_hot(chosen, n_experts).float()  # (L*N, k, E)
    if token_mask is None:
        tokens_per_expert = chosen_onehot.mean(dim=0)  # (k, E)
        prob_per_expert = probs.mean(dim=0)  # (E,)
    else:
        m = token_mask.float().repeat(len(router_logits))  # (L*N,)
        tokens_per_expert = (chosen_onehot * m[:, None, None]).sum(0) / m.sum()
        prob_per_expert = (probs * m[:, None]).sum(0) / m.sum()
    return n_experts * (tokens_per_expert * prob_per_expert[None]).sum()
