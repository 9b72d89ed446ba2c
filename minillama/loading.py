"""Model + tokenizer (+ adapter) ready for inference, in one process or split by tensor parallelism under torchrun.

    loaded = load_for_inference("Meta-Llama-3.1-8B-Instruct/", adapter="out/final")
    loaded.model, loaded.tok, loaded.dist, loaded.tp_group

One process: the model is loaded straight onto the device. Under torchrun with N > 1 processes, each rank reads the
checkpoint on the CPU (safetensors are memory-mapped, so the OS shares the pages), is split by tensor parallelism,
then moves its shard to its device. Bad input raises ValueError / FileNotFoundError naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .distributed import DistInfo, init_distributed
from .dtypes import parse_dtype


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


def _apply_adapters(model: nn.Module, adapters: dict, must_merge: bool, log) -> None:
    """One adapter is merged in (decoding then costs no more than the base model); several stay side by side,
    the first in use (lora.set_adapter / set_row_adapters choose)."""
    from .adapter import load_adapter
    from .lora import merge_lora
    if len(adapters) > 1 and must_merge:
        raise ValueError(f"{len(adapters)} adapters ({', '.join(adapters)}): tensor parallel needs one adapter, merged "
                         "into the weights; run a single process to serve several")
    for name, path in adapters.items():
        load_adapter(model, path, name=name)
    if len(adapters) > 1:
        log(f"[adapters {', '.join(adapters)} loaded side by side]")
        return
    try:
        merge_lora(model)
    except ValueError as e:
        if must_merge:
            raise ValueError(f"adapter {path}: tensor parallel needs the adapter merged, but: {e}") from None
        log(f"[adapter kept unmerged: {e}]")


@dataclass
class Loaded:
    model: nn.Module
    tok: object
    dist: DistInfo
    tp_group: Optional[object]  # the tensor-parallel process group, None in a single process


def load_for_inference(ckpt: Union[str, Path], tokenizer: Union[str, Path, None] = None, adapter=None,
                       quantize: Optional[str] = None, dtype=None, device: Optional[str] = None,
                       chat_format: Optional[str] = None, log=None) -> Loaded:
    """Join torchrun (if any), load tokenizer + model (+ adapters), split it over the processes; eval mode.

    adapter: a PEFT adapter dir, or {name: dir} for several. dtype None: bfloat16 on CUDA, float32 elsewhere.
    device None: CUDA when available.
    """
    from .checkpoints import load_model
    from .tokenizer import load_tokenizer
    log = log or (lambda msg: None)
    try:
        info = init_distributed(device)
    except RuntimeError as e:  # no CUDA, or a device string torch does not know
        raise ValueError(f"device {device}: {e}") from None
    dtype = parse_dtype(dtype) or (torch.bfloat16 if info.device.type == "cuda" else torch.float32)
    tp = info.world_size > 1
    if tp and quantize:
        raise ValueError("quantize nf4 cannot be combined with tensor parallelism (run a single process)")
    tok = load_tokenizer(tokenizer or ckpt, chat_format=chat_format)
    model = load_model(ckpt, device="cpu" if tp else info.device, dtype=dtype, quantize=quantize)
    if adapter:
        _apply_adapters(model, adapter if isinstance(adapter, dict) else {"default": adapter}, must_merge=tp, log=log)
    group = None
    if tp:
        from .tensor_parallel import apply_tensor_parallel, tp_mesh
        unwrap_merged_lora(model)
        mesh = tp_mesh(info.device)
        try:
            apply_tensor_parallel(model, mesh)
        except ValueError as e:
            raise ValueError(f"{ckpt}: {e}") from None
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
