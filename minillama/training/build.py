"""What a training run is built from: the tokenized data, and the model (loaded, LoRA applied or unfrozen, wrapped
with the loss, sharded by FSDP2) with its optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..args import rope_settings
from ..checkpoints import detect_format, load_model
from ..checkpoints.quantized import read_quant_config
from ..lora.layers import REFERENCE_ADAPTER, apply_lora, set_trainable
from ..lora.peft import load_adapter
from ..lora.slots import adapter_names
from ..quant import NF4Weight
from ..tokenizer.tokenizer import load_tokenizer
from .data import check_data_file, load_jsonl, report_bad_lines
from .fsdp import apply_fsdp, checkpoint_activations, compile_blocks, fsdp_has_work
from .loss import CausalLMLoss
from .optim import build_optimizer
from .plan_memory import HOST_RESIDENT_PER_PLANNED, RESERVE, ActivationChoice, Setup, choose_activations, free_bytes
from .schedule import BatchSplit
from ..perf import param_counts
from .config import ModelConfig, TrainConfig
from .session import ModelParts


@dataclass
class Datasets:
    """The tokenizer and the tokenized train and (optional) eval sets."""

    tok: object
    train: list
    eval: Optional[list]


def load_data(cfg: TrainConfig, log, load=load_jsonl, what: tuple[str, str] = ("data", "eval data")) -> Datasets:
    """The tokenizer and the tokenized train (and eval) samples; per-file stats and bad lines go to rank 0's log.

    load(path, tok, seq_len, drop_long, flag): data.load_jsonl (SFT samples) or preference_data.load_pairs."""
    ckpt = cfg.model.ckpt
    if not Path(ckpt).exists():
        hint = " (create it: python weights/prepare_smollm2.py)" if "smollm2-135m-instruct" in ckpt else ""
        raise FileNotFoundError(f"--ckpt {ckpt} does not exist{hint}")
    flags = ((what[0], "--data", cfg.data.data), (what[1], "--eval_data", cfg.data.eval_data))
    for _, flag, path in flags:  # a bad path fails before the tokenizer is read
        if path:
            check_data_file(path, flag)
    tok = load_tokenizer(ckpt)
    out = []
    for name, flag, path in flags:
        if not path:
            out.append(None)
            continue
        samples, stats = load(path, tok, cfg.data.seq_len, cfg.data.drop_long, flag)
        if log.enabled:
            report_bad_lines(stats)
        log.message(f"{name}: {stats.summary()}")
        out.append(samples)
    return Datasets(tok=tok, train=out[0], eval=out[1])


def pad_id_of(tok) -> int:
    """The id padded rows are filled with: the tokenizer's pad, else its eos, else 0 (the loss and attention mask
    padding out whichever it is)."""
    return tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)


def load_device(m: ModelConfig, info) -> torch.device:
    """Where the checkpoint is read to before sharding.

    On GPU the full model goes to CPU memory first: fully_shard then moves one block at a time to the GPU and keeps
    only this rank's shard there, so no rank ever holds the whole model in GPU memory. The cost: while loading, each
    rank holds a CPU copy of the whole model in the load dtype (8 ranks x 16 GB for Llama 3 8B in bf16).
    QLoRA quantizes on the GPU as tensors arrive (CPU quantization of a 47B model is slow): while loading, every
    rank holds the whole NF4 base on its GPU (~0.52 bytes/weight, ~24 GB for Mixtral 8x7B) with the full-precision
    layer weights passing through one at a time; fully_shard then keeps 1/N of it per rank (the NF4 arrays are
    frozen parameters) and frees the rest.
    """
    if info.device.type == "cuda" and not m.quantize:
        return torch.device("cpu")
    return info.device


def report_rope(m: ModelConfig, model_args, longest: int, log) -> None:
    """The RoPE the run trains with, and a warning when rows are longer than the model's context."""
    if m.rope_theta is not None or m.rope_scaling is not None or m.max_seq_len is not None:
        log.message(f"RoPE: {rope_settings(model_args)}")
    scaling = model_args.rope_scaling
    if longest > model_args.max_seq_len and not (scaling and scaling["rope_type"] == "dynamic"):
        log.message(f"warning: rows of up to {longest} tokens are longer than the model's context of "
                    f"{model_args.max_seq_len}; pass --max_seq_len (and a --rope_theta / --rope_scaling that reaches "
                    "it) to record the longer context")


def nf4_bytes(model) -> tuple[int, int]:
    """(bytes of the NF4 base this rank holds, bytes of the whole NF4 base): FSDP2 shards its flat parameters."""
    local = total = 0
    for m in model.modules():
        if isinstance(m, NF4Weight):
            for p in m.parameters():
                total += p.numel() * p.element_size()
                shard = p.to_local() if isinstance(p, DTensor) else p
                local += shard.numel() * shard.element_size()
    return local, total


def nf4_memory_line(model, info) -> str:
    """What each rank holds of the NF4 base (a collective: every rank calls it)."""
    local, total = nf4_bytes(model)
    per_rank = torch.zeros(info.world_size, dtype=torch.float64, device=info.device)
    per_rank[info.rank] = local
    dist.all_reduce(per_rank)
    shares = [int(b) for b in per_rank.tolist()]
    return (f"NF4 base: {total / 2**30:.3f} GiB in all, per rank {', '.join(f'{b / 2**30:.3f}' for b in shares)} "
            f"GiB (bytes: {total} in all, per rank {' '.join(map(str, shares))}; FSDP shards it over "
            f"{info.world_size} processes)")


def bytes_per_param(master_bf16: bool) -> str:
    """The optimizer-side memory of one trained parameter (sharded by FSDP: divide by the process count)."""
    if master_bf16:
        return "8 bytes per trained parameter (bf16 weight 2 + gradient 2 + AdamW m 2 + v 2)"
    return "16 bytes per trained parameter (fp32 master weight 4 + gradient 4 + AdamW m 4 + v 4)"


def free_budget(info) -> int:
    """Planned bytes a training step may use on this rank's device (the least any rank has): the free memory less
    plan_memory.RESERVE, and on the host divided by HOST_RESIDENT_PER_PLANNED."""
    free = torch.tensor([float(free_bytes(info.device))], dtype=torch.float64, device=info.device)
    if dist.is_initialized():
        dist.all_reduce(free, op=dist.ReduceOp.MIN)  # every rank makes the same choice
    budget = max(int(free.item()) - RESERVE, 0)
    return budget if info.device.type == "cuda" else int(budget / HOST_RESIDENT_PER_PLANNED)


def choose_activation_memory(cfg: TrainConfig, info, args, compute_dtype, longest: int,
                             budget: int) -> ActivationChoice:
    """Whether this run checkpoints (and offloads) activations: --activation_checkpointing, or the memory plan of
    one micro-batch of its longest rows against the budget."""
    m, lora = cfg.model, cfg.lora
    dp = info.world_size // cfg.context_parallel
    rows = BatchSplit.make(cfg.data.batch_size, dp, cfg.data.micro_batch_size).micro_batch_size
    tokens = max(1, (longest or cfg.data.seq_len) // cfg.context_parallel)  # a context group splits each row
    s = Setup(args, info.world_size, tokens, lora.rank if lora.enabled else 0, list(lora.targets), lora.use_dora,
              bool(m.quantize), m.activation_checkpointing, m.cpu_offload, compute_dtype, m.master_bf16, m.loss_chunk)
    return choose_activations(s, rows, budget, info.device.type)


def build_model(cfg: TrainConfig, info, compute_dtype, log, wrap=CausalLMLoss, longest: int = 0) -> ModelParts:
    """Load the checkpoint, add LoRA (or unfreeze everything), wrap with the loss, shard with FSDP2 (when it has work:
    fsdp.fsdp_has_work), make AdamW.

    longest: the longest row the run will train on (for the context warning, and for the memory plan, which turns
    on activation checkpointing when a micro-batch of such rows would not fit: choose_activation_memory). The root
    is the FSDP-sharded wrap(model, loss_chunk): CausalLMLoss for SFT, loss.SequenceLogprobs for preference tuning."""
    m, lora, opt = cfg.model, cfg.lora, cfg.optim
    budget = free_budget(info)  # before the weights arrive: the plan counts them
    torch.manual_seed(cfg.seed)  # same LoRA init on every rank before sharding
    # LoRA: the frozen base may live in the compute dtype (no master copy needed), the adapters stay float32;
    # full fine-tuning keeps float32 master weights unless --master_dtype bfloat16
    load_dtype = compute_dtype if lora.enabled or m.master_bf16 else torch.float32
    fmt, ckpt_dir = detect_format(m.ckpt)
    saved = read_quant_config(ckpt_dir)["quantize"] if fmt == "quantized" else None
    if saved not in (None, m.quantize):  # the flags make a saved NF4 base --quantize nf4; int8/int4 have no backward
        raise ValueError(f"--ckpt {m.ckpt} holds {saved} weights saved by minillama-convert --quantize: "
                         + ("train it with --quantize nf4" if saved == "nf4" else
                            "they are for inference; train from the float checkpoint it was made from"))
    model = load_model(m.ckpt, device=load_device(m, info), dtype=load_dtype, quantize=m.quantize,
                       max_seq_len=m.max_seq_len, rope_theta=m.rope_theta, rope_scaling=m.rope_scaling)
    report_rope(m, model.args, longest, log)
    if lora.enabled:
        apply_lora(model, lora.rank, lora.alpha, lora.dropout, targets=list(lora.targets), use_dora=lora.use_dora)
        if lora.init_adapter:  # its factors replace the fresh ones (still trainable); modules it lacks keep B = 0
            load_adapter(model, lora.init_adapter, name=adapter_names(model)[0])
            load_adapter(model, lora.init_adapter, name=REFERENCE_ADAPTER)  # a frozen copy: the reference policy
            log.message(f"adapter starts from {lora.init_adapter} (also the frozen reference of DPO/KTO/GRPO)")
        if lora.modules_to_save:
            whole = set_trainable(model, list(lora.modules_to_save))
            for p in (p for n, p in model.named_parameters() if n in whole):
                p.data = p.data.float()  # trained whole modules get float32 master weights, like the adapters
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = param_counts(model.args)["total"]  # counted from the shapes: NF4 weights are buffers
    choice = choose_activation_memory(cfg, info, model.args, compute_dtype, longest, budget)
    log.message(choice.why)
    if m.compile:  # before checkpointing, which then recomputes the compiled forward
        compile_blocks(model)
    if choice.checkpointing:
        checkpoint_activations(model, offload=choice.offload)
    root = wrap(model, m.loss_chunk).train()
    mixed = compute_dtype != torch.float32 and not m.master_bf16  # bf16 master weights already are the compute dtype
    if fsdp_has_work(info.world_size, mixed, m.cpu_offload):
        apply_fsdp(root, param_dtype=compute_dtype if mixed else None, cpu_offload=m.cpu_offload, device=info.device,
                   reduce_dtype=torch.float32 if m.master_bf16 else None)
    else:
        root.to(info.device)  # one process in the parameters' own dtypes: plain modules (see fsdp_has_work)
    optimizer = build_optimizer(root, opt.lr, opt.weight_decay, opt.betas, lora_plus_ratio=lora.plus_ratio,
                                master_dtype=torch.bfloat16 if m.master_bf16 else torch.float32)
    if m.quantize:
        log.message(nf4_memory_line(model, info))
    what = (f"{'DoRA' if lora.use_dora else 'LoRA'} r={lora.rank} on {' '.join(lora.targets)}"
            f"{f', LoRA+ B lr x{lora.plus_ratio:g}' if lora.plus_ratio else ''}" if lora.enabled else "full")
    what += f" + whole {' '.join(lora.modules_to_save)}" if lora.modules_to_save else ""
    log.message(f"model: {m.ckpt} ({model.args.family}, {n_total / 1e6:.1f}M params), {what}"
                f"{' NF4 base' if m.quantize else ''}: {n_trainable / 1e6:.2f}M trainable; "
                f"{str(compute_dtype).removeprefix('torch.')} compute on {info.device}; "
                f"{bytes_per_param(m.master_bf16)}")
    return ModelParts(model=model, root=root, optimizer=optimizer)
