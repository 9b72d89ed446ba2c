"""Plan a fine-tuning run's memory per GPU before starting it (train/sft.py's and train/dpo.py's layout and flags;
the command line is minillama/tools/plan_memory.py).

Per rank, for FSDP2 over --gpus processes (one unit per block, the root holds embedding, norm and output; one
process computing in its parameters' own dtypes runs without FSDP, as the trainer does: fsdp.fsdp_has_work):
  weights      each parameter's shard (1/N): NF4 for a QLoRA base's layer linears, the compute dtype for the rest
               of a LoRA base, fp32 (or --master_dtype bf16) master weights for full fine-tuning, fp32 LoRA
               factors; plus what FSDP all-gathers in the compute dtype: the root for the whole step and two
               blocks at a time (the one running and the next, prefetched)
  gradients    the trained parameters' gradient shards, plus one block's unsharded gradients (and their fp32
               reduce-scatter copy) in flight (without FSDP: every gradient, accumulated in place)
  optimizer    AdamW's moments m and v of the trained parameters' shards
  activations  what backward keeps for one micro-batch: each block's saved tensors, counted at the run's shapes
               by running the real layers (LoRA/DoRA included) on the meta device, attention counted as a flash
               kernel keeps it (q, k, v, output, log-sum-exp); with --activation_checkpointing each block's input
               plus one block recomputed in backward; and the gradients flowing through the block being
               differentiated
  logits       the chunked loss: --loss_chunk positions x the vocabulary in float32 (logits, log-softmax, gradient;
               a frozen head, LoRA's, keeps one float32 buffer, its gradient formed in forward: loss.frozen_head)
The peak is the largest of three moments: the loss (every activation alive), the backward of the last block, and
the optimizer step. Every position counts as learned (continued pre-training, the worst case); MoE routing
is taken as balanced. --reserve GiB of --gpu_memory are kept free for the CUDA context, kernel workspaces and the
allocator's fragmentation. Checked against the peak a CPU run allocates at tiny shapes (tests/test_plan_memory.py).

The trainer asks it too (choose_activations): a run whose micro-batch would not fit the memory it finds free gets
activation checkpointing, and on a GPU where even that does not fit, its checkpointed block inputs kept in host
memory (offload_activations).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..args import PRESETS, ModelArgs
from ..attention import AttnMask
from ..lora.layers import apply_lora
from ..model import RMSNorm, Transformer, TransformerBlock
from ..rope import rope_cos_sin
from .fsdp import fsdp_has_work

GIB = 2**30
RESERVE = 2 * GIB  # kept free of the plan: CUDA context or Python's own, kernel workspaces, fragmentation
# A CPU run's resident peak over its planned peak: glibc keeps the holes freed tensors leave in its heap (measured
# 1.53x at 1K and 1.57x at 4K tokens, SmolLM2 LoRA, float32, train/bench.py --cases smollm2-lora)
HOST_RESIDENT_PER_PLANNED = 1.6
_QUANTIZED = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
              "feed_forward.w3", "feed_forward.experts.w1", "feed_forward.experts.w2", "feed_forward.experts.w3")


def model_args(model: str) -> ModelArgs:
    """A preset's shapes, or a checkpoint dir's config (no weight is read)."""
    if model in PRESETS:
        return ModelArgs.from_name(model)
    if Path(model).exists():
        from ..checkpoints.checkpoint import plan_checkpoint
        return plan_checkpoint(model).args
    raise ValueError(f"--model {model}: neither a preset ({', '.join(sorted(PRESETS))}) nor an existing checkpoint dir")


@dataclass
class Setup:
    """What the plan depends on, resolved from the flags."""

    args: ModelArgs
    gpus: int
    seq_len: int
    lora_rank: int
    lora_targets: list
    use_dora: bool
    quantize: bool
    checkpointing: bool
    cpu_offload: bool
    compute: torch.dtype
    master_bf16: bool
    loss_chunk: int
    offload_activations: bool = False  # checkpointed block inputs kept in host memory (needs checkpointing)

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def fsdp(self) -> bool:
        """Whether the trainer shards with FSDP2 (fsdp_has_work: several processes, a cast, or host offload)."""
        return fsdp_has_work(self.gpus, self.compute != torch.float32 and not self.master_bf16, self.cpu_offload)

    @property
    def frozen_head(self) -> bool:
        """LoRA leaves the output layer frozen (unless it adapts lm_head): the loss keeps no logits for backward."""
        return self.lora and "lm_head" not in self.lora_targets

    @property
    def c(self) -> int:
        """Bytes per element in the compute dtype (the dtype FSDP gathers floating parameters in)."""
        return self.compute.itemsize


def meta_model(s: Setup) -> Transformer:
    """The model as the run builds it (LoRA/DoRA applied), on the meta device: shapes and dtypes, no memory."""
    with torch.device("meta"):
        model = Transformer(s.args)
        if s.lora:
            apply_lora(model, s.lora_rank, 2.0 * s.lora_rank, targets=s.lora_targets, use_dora=s.use_dora)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
    return model


def _quantized(name: str, s: Setup) -> bool:
    module = name.rsplit(".", 1)[0] if name.endswith(".weight") else name
    return s.quantize and any(module.endswith(q) for q in _QUANTIZED) and name.startswith("layers.")


def stored_bytes(name: str, p: torch.Tensor, s: Setup) -> int:
    """Bytes a parameter takes when stored (sharded) as the run keeps it."""
    from ..quant import nf4_nbytes
    if _quantized(name, s):
        return nf4_nbytes(tuple(p.shape))
    if p.requires_grad:
        return p.numel() * (2 if s.master_bf16 else 4)  # LoRA factors and fp32 master weights: float32
    return p.numel() * s.c  # a LoRA base in the compute dtype


def gathered_bytes(name: str, p: torch.Tensor, s: Setup) -> int:
    """Bytes of the parameter as FSDP all-gathers it for compute (floating parameters in the compute dtype)."""
    from ..quant import nf4_nbytes
    return nf4_nbytes(tuple(p.shape)) if _quantized(name, s) else p.numel() * s.c


def _named(module: nn.Module, prefix: str = ""):
    for n, p in module.named_parameters():
        yield f"{prefix}{n}", p


@dataclass
class MemoryPlan:
    """Per-rank bytes by category for one micro-batch size, and the peak."""

    micro_batch: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    peak: int
    detail: dict = field(default_factory=dict)


# ---- activations, counted on the meta device ----
class _FlashSaves(torch.autograd.Function):
    """What a flash-attention kernel keeps for backward: q, k, v, its output and a float32 log-sum-exp per query."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the plan only counts what forward keeps
        raise NotImplementedError


def _attend_as_flash(q, k, v, attn):
    # GQA: the flash kernels read the grouped k/v as they are (attention.attend makes no repeated copies)
    return _FlashSaves.apply(q, k, v)


def _balanced_dispatch(experts, x, weights, expert_idx):
    """moe.dispatch with every expert given an equal share of the token-slots (the routing of real data is
    unknowable on the meta device): the same gathers, per-expert matmuls and scatter."""
    k, E = expert_idx.shape[1], experts.n_experts
    n_slots = x.shape[0] * k
    token_of_slot = torch.arange(n_slots, device=x.device) // k
    out = torch.zeros_like(x)
    share = math.ceil(n_slots / E)
    for e in range(E):
        tokens = token_of_slot[e * share:(e + 1) * share]
        if tokens.numel():
            y = experts.expert_forward(e, x[tokens])
            out = out.index_add(0, tokens, (y * weights.flatten()[e * share:(e + 1) * share, None]).to(x.dtype))
    return out


@contextmanager
def _meta_kernels():
    """Swap attention and MoE dispatch for meta-friendly twins that keep what the GPU kernels keep."""
    from .. import model, moe
    from ..lora import experts as lora_experts
    patched = [(model, "attend", _attend_as_flash)] + [(m, "dispatch", _balanced_dispatch) for m in (moe, lora_experts)]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patched]
    try:
        for m, name, fn in patched:
            setattr(m, name, fn)
        yield
    finally:
        for m, name, fn in saved:
            setattr(m, name, fn)


def saved_bytes(fn, inputs: tuple, exclude: set) -> tuple[int, int]:
    """(bytes backward keeps after fn(*inputs), bytes of the largest single saved tensor), unique storages only;
    storages in `exclude` (parameters, shared inputs) are not counted."""
    seen, biggest = {}, 0

    def pack(t):
        nonlocal biggest
        key = t.untyped_storage()._cdata
        if key not in exclude:
            seen[key] = t.untyped_storage().nbytes()
            biggest = max(biggest, seen[key])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values()), biggest


def block_activations(model: Transformer, s: Setup, micro_batch: int) -> dict:
    """Bytes one block keeps for backward at (micro_batch, seq_len), and the sizes its backward works with."""
    B, T, D = micro_batch, s.seq_len, s.args.dim
    block: TransformerBlock = model.layers[0]
    block = block.to(s.compute)  # FSDP gathers floating parameters in the compute dtype (LoRA factors too)
    x = torch.empty(B, T, D, device="meta", dtype=s.compute, requires_grad=True)
    cos, sin = rope_cos_sin(model.inv_freq_bits.new_empty(s.args.head_dim // 2, dtype=torch.float32),
                            torch.arange(T, device="meta"))
    exclude = {p.untyped_storage()._cdata for p in block.parameters()}
    exclude |= {t.untyped_storage()._cdata for t in (cos, sin)}
    inputs = (x, cos, sin, AttnMask(causal_only=True))
    with _meta_kernels():
        kept, biggest = saved_bytes(lambda *a: block(*a), inputs, exclude)
        # recomputed under checkpointing, the block's input is the one the checkpoint already keeps
        recomputed, _ = saved_bytes(lambda *a: block(*a), inputs, exclude | {x.untyped_storage()._cdata})
    norm = RMSNorm(D).to(device="meta", dtype=s.compute)
    final_norm, _ = saved_bytes(norm, (x,), {norm.weight.untyped_storage()._cdata})
    return {"block": kept, "recomputed": recomputed, "biggest": biggest, "final_norm": final_norm,
            "row": B * T * D * s.c}


def activation_bytes(model: Transformer, s: Setup, micro_batch: int) -> tuple[int, int, dict]:
    """(what the forward leaves for backward, what is alive at the last block's backward, parts)."""
    a = block_activations(model, s, micro_batch)
    L, N = s.args.n_layers, micro_batch * s.seq_len
    head = a["final_norm"] + N * (s.args.dim * s.c + 16)  # final norm, the loss's learned states + indices
    if s.checkpointing and s.offload_activations:  # the inputs wait in host memory; one comes back at a time
        blocks, recompute = a["row"], a["recomputed"]
    elif s.checkpointing:  # each block's input; in backward one block's saved tensors come back at a time
        blocks, recompute = L * a["row"], a["recomputed"]
    else:
        blocks, recompute = L * a["block"], 0
    # gradients flowing through the block being differentiated: the gradient of its output and of its input, and
    # the largest intermediate's gradient (with its float32 copy when the block computes in half precision)
    flowing = 2 * a["row"] + a["biggest"] * (1 if s.c == 4 else 3)
    last_block = blocks + recompute + flowing  # the head's tensors are freed by then
    return blocks + head, last_block, {**a, "alive": blocks + head, "recompute": recompute, "flowing": flowing}


def logits_bytes(s: Setup, micro_batch: int) -> int:
    """One loss chunk: logits in the compute dtype and float32, the log-softmax, their gradients (recomputed in
    backward); a frozen head: its float32 logits turned into their gradient in place, and that in the compute dtype."""
    chunk = min(s.loss_chunk, micro_batch * s.seq_len)
    half = s.c if s.c != 4 else 0
    return chunk * s.args.vocab_size * (4 + half if s.frozen_head else 4 * 3 + 2 * half)


# ---- the plan ----
def plan(s: Setup, micro_batch: int, model: Transformer = None) -> MemoryPlan:
    """Per-rank bytes of one training step at this micro-batch size, by category at its peak moment.

    Three moments compete: the loss (every activation alive, no gradient yet but the logits'), the backward of the
    last block (activations, that block's recomputation and gradients in flight, its parameters gathered with the
    next one prefetched, the output layer's gradient) and the optimizer step (every gradient shard, AdamW's
    temporaries, no activations)."""
    model = model or meta_model(s)
    N, off = s.gpus, 0 if s.cpu_offload else 1
    params = list(_named(model))
    stored = sum(stored_bytes(n, p, s) for n, p in params)
    trained = [(n, p) for n, p in params if p.requires_grad]
    n_trained = sum(p.numel() for _, p in trained)
    grad_b = 2 if s.master_bf16 else 4  # gradient shards have the parameters' dtype
    in_flight = s.c + (4 if s.c != 4 else 0)  # an unsharded gradient and its float32 reduce-scatter copy
    blocks = [sum(gathered_bytes(f"layers.{i}.{n}", p, s) for n, p in _named(layer))
              for i, layer in enumerate(model.layers)]
    root = sum(gathered_bytes(n, p, s) for n, p in params if not n.startswith("layers."))
    block_trained = max(sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in model.layers)
    head_trained = sum(p.numel() for n, p in trained if n.startswith(("output.", "norm.")))
    shards = off * stored // N
    optimizer = off * n_trained * (4 if s.master_bf16 else 8) // N
    alive, last_block, parts = activation_bytes(model, s, micro_batch)
    logits = logits_bytes(s, micro_batch)
    if s.fsdp:  # the root stays gathered; two blocks at a time; one block's gradients in flight to their shards
        root_gathered, blocks_gathered = root, 2 * max(blocks)
        backward_grads = (block_trained + head_trained) * in_flight
    else:  # plain modules: nothing gathered, every gradient accumulated in place by the last block's backward
        root_gathered = blocks_gathered = 0
        backward_grads = n_trained * grad_b
    moments = {
        "the loss": (shards + root_gathered, 0, alive, logits),
        "the last block's backward": (shards + root_gathered + blocks_gathered, backward_grads, last_block, 0),
        "the optimizer step": (shards, off * n_trained * grad_b // N * 2, 0, 0),  # grads + AdamW's temporaries
    }
    when, (weights, gradients, activations, logit) = max(moments.items(), key=lambda kv: sum(kv[1]))
    peak = weights + gradients + optimizer + activations + logit
    return MemoryPlan(micro_batch, weights, gradients, optimizer, activations, logit, peak,
                {**parts, "when": when, "gathered": root_gathered + blocks_gathered, "stored": stored,
                 "n_trained": n_trained, "last_block": last_block, "logits_chunk": logits,
                 "moments": {k: sum(v) + optimizer for k, v in moments.items()}})


def free_bytes(device: torch.device) -> int:
    """Memory this process may still fill: the GPU's free memory, or the host's available memory shared among the
    processes torchrun started on this host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux: the free pages, without the reclaimable cache
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return free // int(os.environ.get("LOCAL_WORLD_SIZE", 1))


@dataclass
class ActivationChoice:
    """How a run keeps its activations, and the log line that says why."""

    checkpointing: bool
    offload: bool
    why: str


def choose_activations(s: Setup, micro_batch: int, budget: int, device_type: str) -> ActivationChoice:
    """Activation checkpointing when the plan of a micro-batch does not fit `budget` bytes without it (or
    s.checkpointing: the flag forced it); on a GPU, the checkpointed block inputs offloaded to host memory when even
    that does not fit."""
    rows, model = f"a micro-batch of {micro_batch} x {s.seq_len} tokens", meta_model(s)
    plain = plan(replace(s, checkpointing=False, offload_activations=False), micro_batch, model)
    if plain.peak <= budget and not s.checkpointing:
        return ActivationChoice(False, False, f"memory plan: {rows} peaks at {plain.peak / GIB:.2f} GiB of the "
                                              f"{budget / GIB:.2f} GiB it may use; no activation checkpointing needed")
    checkpointed = plan(replace(s, checkpointing=True, offload_activations=False), micro_batch, model)
    why = ("activation checkpointing on (--activation_checkpointing)" if s.checkpointing else
           f"activation checkpointing on: {rows} would peak at {plain.peak / GIB:.2f} GiB, over the "
           f"{budget / GIB:.2f} GiB it may use; checkpointed {checkpointed.peak / GIB:.2f} GiB")
    if checkpointed.peak <= budget or device_type != "cuda":
        return ActivationChoice(True, False, why)
    offloaded = plan(replace(s, checkpointing=True, offload_activations=True), micro_batch, model)
    return ActivationChoice(True, True, f"{why}; still over, so each block's checkpointed input waits in host "
                                        f"memory: {offloaded.peak / GIB:.2f} GiB")


def largest_micro_batch(s: Setup, budget: int, model: Transformer, limit: int = 4096) -> tuple[int, MemoryPlan]:
    """The largest micro-batch whose peak fits the budget (0 if not even one row), and the plan at it."""
    best, best_plan, lo, hi = 0, plan(s, 1, model), 1, limit
    if best_plan.peak > budget:
        return 0, best_plan
    while lo <= hi:  # the peak grows with the micro-batch
        mid = (lo + hi) // 2
        p = plan(s, mid, model)
        if p.peak <= budget:
            best, best_plan, lo = mid, p, mid + 1
        else:
            hi = mid - 1
    return best, best_plan


def describe(s: Setup, p: MemoryPlan, budget: int, gpu_memory: float, best: int) -> str:
    """The per-GPU table at the peak moment, and the verdict."""
    d = p.detail
    rows = [("weights", p.weights, f"shards {d['stored'] / GIB:.2f} GiB / {s.gpus}"
                                   f"{' on the host' if s.cpu_offload else ''} + gathered for compute"),
            ("gradients", p.gradients, f"of {d['n_trained'] / 1e6:.1f}M trained parameters"),
            ("optimizer", p.optimizer, "AdamW m, v shards" + (" (on the host)" if s.cpu_offload else "")),
            ("activations", p.activations, f"micro-batch {p.micro_batch} x {s.seq_len} tokens"
                                           f"{', checkpointed' if s.checkpointing else ''}"),
            ("logits", p.logits, f"loss chunk {min(s.loss_chunk, p.micro_batch * s.seq_len)} x "
                                 f"{s.args.vocab_size} vocabulary, float32")]
    out = [f"{'per GPU':<12} {'GiB':>9}   at {d['when']}"] + [f"{k:<12} {v / GIB:9.2f}   {why}" for k, v, why in rows]
    out.append(f"{'peak':<12} {p.peak / GIB:9.2f}   of {gpu_memory:g} GiB ({gpu_memory - budget / GIB:g} reserved); "
               + ", ".join(f"{k}: {v / GIB:.2f}" for k, v in d["moments"].items()))
    if best == 0:
        out.append("verdict: does not fit, not even a micro-batch of 1 row"
                   + ("" if s.checkpointing else "; try --activation_checkpointing")
                   + ("" if s.quantize or not s.lora else "; try --quantize nf4")
                   + "; or more --gpus")
    else:
        out.append(f"verdict: fits; the largest micro-batch that fits is {best} row(s) of {s.seq_len} tokens")
    return "\n".join(out)
