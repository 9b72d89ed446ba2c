"""Plan a fine-tuning run's memory per GPU before starting it (train/sft.py's and train/dpo.py's layout and flags):

    minillama-plan-memory --model mixtral-8x7b --gpus 4 --gpu_memory 48 --seq_len 12288 \\
        --lora_rank 64 --quantize nf4 --activation_checkpointing

What each line of the plan counts: minillama/training/plan_memory.py.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..args import PRESETS
from ..training.plan_memory import (GIB, Setup, describe, largest_micro_batch, meta_model, model_args,
                                   plan)
from ..util.cli import HelpFormatter, positive_int, run
from ..util.dtypes import DTYPE_NAMES, parse_dtype


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="minillama-plan-memory", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", "--ckpt", dest="model", required=True,
                   help=f"a preset ({', '.join(sorted(PRESETS))}) or a checkpoint dir")
    p.add_argument("--gpus", type=positive_int, default=1, help="FSDP processes (GPUs) the run shards over")
    p.add_argument("--gpu_memory", type=float, default=80.0, help="GiB of memory per GPU")
    p.add_argument("--reserve", type=float, default=2.0,
                   help="GiB per GPU kept free: CUDA context, kernel workspaces, fragmentation")
    p.add_argument("--seq_len", type=positive_int, default=8192, help="tokens per row, as train/sft.py's --seq_len")
    p.add_argument("--micro_batch_size", type=int, default=0, help="rows per forward per rank; 0 = the largest that fits")
    p.add_argument("--lora_rank", type=int, default=16, help="0 = full fine-tuning")
    p.add_argument("--lora_targets", nargs="+", default=["all-linear"], help="as train/sft.py's")
    p.add_argument("--use_dora", action="store_true", help="DoRA: a magnitude vector per adapted linear")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="QLoRA: an NF4 base (needs --lora_rank)")
    p.add_argument("--activation_checkpointing", action="store_true", help="keep each block's input only")
    p.add_argument("--cpu_offload", action="store_true", help="FSDP2 CPU offload: shards and AdamW on the host")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16", help="compute dtype")
    p.add_argument("--master_dtype", choices=["float32", "bfloat16"], default="float32",
                   help="full fine-tuning: fp32 master weights and moments, or all bf16")
    p.add_argument("--loss_chunk", type=positive_int, default=1024, help="positions per chunk of the output layer")
    return p.parse_args(argv)


def setup_from(a: argparse.Namespace) -> Setup:
    """The flags as the planner's Setup (checked together)."""
    master_bf16 = a.master_dtype == "bfloat16"
    if a.quantize and a.lora_rank <= 0:
        raise ValueError("--quantize nf4 trains LoRA adapters on a frozen NF4 base: give --lora_rank > 0")
    if master_bf16 and a.lora_rank > 0:
        raise ValueError("--master_dtype bfloat16 is for full fine-tuning (--lora_rank 0)")
    compute = torch.bfloat16 if master_bf16 else parse_dtype(a.dtype)
    return Setup(model_args(a.model), a.gpus, a.seq_len, a.lora_rank, a.lora_targets, a.use_dora,
                 bool(a.quantize), a.activation_checkpointing, a.cpu_offload, compute, master_bf16, a.loss_chunk)


def main(argv=None) -> int:
    a = parse_args(argv)
    s = setup_from(a)
    model = meta_model(s)
    budget = int((a.gpu_memory - a.reserve) * GIB)
    what = (f"{'QLoRA' if s.quantize else 'DoRA' if s.use_dora else 'LoRA'} r={s.lora_rank}" if s.lora
            else f"full fine-tuning, {'bf16' if s.master_bf16 else 'fp32'} master weights")
    print(f"{a.model}: {s.args.n_layers} layers, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params; "
          f"{what}; {str(s.compute).removeprefix('torch.')} compute; FSDP over {s.gpus} GPU(s)")
    best, p = largest_micro_batch(s, budget, model)
    if a.micro_batch_size > 0:  # the plan at the asked size, with the verdict for it
        p = plan(s, a.micro_batch_size, model)
        if p.peak > budget:
            table = describe(s, p, budget, a.gpu_memory, 0).rsplit("\n", 1)[0]
            print(f"{table}\nverdict: does not fit at micro-batch {a.micro_batch_size}; "
                  + (f"the largest micro-batch that fits is {best}" if best else "not even 1 row fits"
                     + ("" if s.checkpointing else "; try --activation_checkpointing")))
            return 0
    print(describe(s, p, budget, a.gpu_memory, best))
    return 0


def cli(argv=None) -> int:
    return run(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())
