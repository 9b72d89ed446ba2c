"""What every generate/ script (and the trainer) shares: flags, checkpoint resolution, model + tokenizer loading.

    model, tok, dist_info, tp_group = load_for_inference(args)   # after add_model_args / add_sampling_args

One process: the model is loaded straight onto the device. Under torchrun with N > 1 processes, each rank reads the
checkpoint on the CPU (safetensors are memory-mapped, so the OS shares the pages), is split by tensor parallelism,
then moves its shard to its device.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .chat_format import FORMATS
from .distributed import DistInfo, init_distributed

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CKPT = REPO / "weights" / "smollm2-135m-instruct"
FETCH_COMMAND = "python weights/prepare_smollm2.py"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Which checkpoint, adapter, dtype and device."""
    p.add_argument("--ckpt", default=None, help="checkpoint dir (HF or Meta/Mistral layout); "
                   f"default: {DEFAULT_CKPT.relative_to(REPO)}/ (fetch with `{FETCH_COMMAND}`)")
    p.add_argument("--ckpt_dir", default=None, help="Meta-style alias of --ckpt")
    p.add_argument("--tokenizer_path", default=None, help="tokenizer file or dir (default: the checkpoint dir)")
    p.add_argument("--adapter", default=None, help="LoRA adapter dir (PEFT layout) to apply on top")
    p.add_argument("--quantize", default=None, choices=["nf4"], help="load the weights in NF4 (single process)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    p.add_argument("--chat_format", default=None, choices=FORMATS,
                   help="force a chat format (default: the checkpoint's, from its chat template or family)")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step (GPU)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.6, top_p: float = 0.9,
                      max_new_tokens: int = 256) -> None:
    """--max_seq_len, --max_new_tokens and the sampling knobs (HF order: penalty, temperature, top-k, top-p)."""
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="cap on prompt + answer tokens (default: the model's context)")
    p.add_argument("--max_new_tokens", "--max_gen_len", type=int, default=max_new_tokens,
                   help="most tokens to generate per answer (--max_gen_len: Meta's name)")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=top_p)
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="1 = off (CTRL/HF penalty)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The generate() keyword arguments the sampling flags describe."""
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, seed=args.seed, compile=args.compile,
                max_seq_len=args.max_seq_len)


def context_limit(args: argparse.Namespace, model: nn.Module) -> int:
    """--max_seq_len checked against the model's context (default: all of it)."""
    limit = args.max_seq_len or model.args.max_seq_len
    if limit > model.args.max_seq_len:
        raise SystemExit(f"--max_seq_len {limit} exceeds the model's context of {model.args.max_seq_len} tokens")
    if args.max_new_tokens >= limit:
        raise SystemExit(f"--max_new_tokens {args.max_new_tokens} must be below --max_seq_len {limit}")
    return limit


def parse_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """A --dtype name; None means bfloat16 on CUDA and float32 elsewhere."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def resolve_checkpoint(args: argparse.Namespace) -> tuple[Path, Path]:
    """(checkpoint dir, tokenizer path) from --ckpt / --ckpt_dir / --tokenizer_path, or the default SmolLM2 dir."""
    if args.ckpt and args.ckpt_dir and Path(args.ckpt) != Path(args.ckpt_dir):
        raise SystemExit(f"--ckpt {args.ckpt} and --ckpt_dir {args.ckpt_dir} disagree; give one")
    given = args.ckpt or args.ckpt_dir
    ckpt = Path(given) if given else DEFAULT_CKPT
    if not ckpt.exists():
        if given is None:
            raise SystemExit(f"no --ckpt given and the default model {ckpt} is missing; fetch it with:\n"
                             f"    {FETCH_COMMAND}")
        raise SystemExit(f"checkpoint {ckpt} does not exist")
    tokenizer = Path(args.tokenizer_path) if args.tokenizer_path else ckpt
    if not tokenizer.exists():
        raise SystemExit(f"--tokenizer_path {tokenizer} does not exist")
    return ckpt, tokenizer


def unwrap_merged_lora(model: nn.Module) -> None:
    """Swap merged LoRALinear layers back to nn.Linear so tensor parallelism can split them."""
    from .lora import LoRALinear
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear) and m.merged:
            with torch.device("meta"):
                lin = nn.Linear(m.in_features, m.out_features, bias=False)
            lin.weight = m.weight
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, lin)


def _apply_adapter(model: nn.Module, path: str, must_merge: bool, log) -> None:
    from .adapter import load_adapter
    from .lora import merge_lora
    load_adapter(model, path)
    try:
        merge_lora(model)  # folded in: decoding then costs no more than the base model
    except ValueError as e:
        if must_merge:
            raise SystemExit(f"--adapter {path}: tensor parallel needs the adapter merged, but: {e}")
        log(f"[adapter kept unmerged: {e}]")


@dataclass
class Loaded:
    model: nn.Module
    tok: object
    dist: DistInfo
    tp_group: Optional[object]  # the tensor-parallel process group, None in a single process


def load_for_inference(args: argparse.Namespace, log=None) -> Loaded:
    """Join torchrun (if any), load tokenizer + model (+ adapter), split it over the processes; eval mode."""
    from .checkpoint import load_model
    from .tokenizer import load_tokenizer
    log = log or (lambda msg: None)
    ckpt, tok_path = resolve_checkpoint(args)
    try:
        info = init_distributed(args.device)
    except RuntimeError as e:  # no CUDA, or a device string torch does not know
        raise SystemExit(f"--device {args.device}: {e}")
    dtype = parse_dtype(args.dtype, info.device)
    tp = info.world_size > 1
    if tp and args.quantize:
        raise SystemExit("--quantize nf4 cannot be combined with tensor parallelism (run a single process)")
    try:  # a bad path or file is the user's to fix: say which, without a traceback
        tok = load_tokenizer(tok_path, chat_format=args.chat_format)
        model = load_model(ckpt, device="cpu" if tp else info.device, dtype=dtype, quantize=args.quantize)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if args.adapter:
        _apply_adapter(model, args.adapter, must_merge=tp, log=log)
    group = None
    if tp:
        from .tensor_parallel import apply_tensor_parallel, tp_mesh
        unwrap_merged_lora(model)
        mesh = tp_mesh(info.device)
        try:
            apply_tensor_parallel(model, mesh)
        except ValueError as e:
            raise SystemExit(f"{ckpt}: {e}")
        model.to(info.device)
        group = mesh.get_group()
    if tok.vocab_size > model.args.vocab_size:
        log(f"[warning: tokenizer has {tok.vocab_size} tokens, the model {model.args.vocab_size}]")
    return Loaded(model.eval(), tok, info, group)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's obj on every rank (e.g. a line read from stdin); a no-op in one process."""
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank0_print(info: DistInfo, *a, **kw) -> None:
    if info.is_rank0:
        print(*a, **kw, flush=True)

