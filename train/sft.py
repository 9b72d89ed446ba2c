"""Supervised fine-tuning with FSDP2: LoRA, QLoRA (NF4 base) or full fine-tuning, on one or many processes.

    torchrun --nproc_per_node 1 train/sft.py                      # LoRA: embedded SmolLM2 + train/data/reviews.jsonl
    torchrun --nproc_per_node 8 train/sft.py --model llama3-8b-dir --data chat.jsonl --pack --seq_len 8192
    torchrun --nproc_per_node 2 train/sft.py --lora_rank 0 --lr 2e-5  # full fine-tuning
    python train/sft.py --config run.toml --max_steps 10              # flags override the file's keys
    torchrun ... train/sft.py --out OUT --resume                      # continue from OUT/latest with the run's
                                                                  # saved flags (OUT/config.json; new ones win;
                                                                  # any number of processes)

Outputs in --out: config.json (resolved flags), metrics.jsonl (one record per step), loss.png, step_N/ (resumable
checkpoints: sharded weights + optimizer + data position + RNG; LoRA runs also hold a PEFT adapter/), latest, and
final/ (LoRA: a PEFT adapter; full fine-tuning: a Hugging Face model dir).
The loss of a step is the mean over every learned token of the whole global batch (all ranks, all micro-batches),
so it does not depend on the number of processes or of accumulation steps.

Choices: AdamW (betas 0.9/0.95) with weight decay on matrices only (linear, embedding, expert, router and LoRA A/B;
not norms/biases); linear warmup then cosine decay to --min_lr_ratio (10%) of --lr; grad-norm clipping at 1.0.
Mixtral: router load-balancing loss (HF's formula, padding excluded) weighted by --router_aux_loss_coef 0.02 (the
value in Mixtral's released config.json), computed per micro-batch and averaged. Compute in bf16 on GPU (FSDP2
MixedPrecisionPolicy, fp32 gradient reduction) with fp32 master weights for trained parameters; a LoRA run keeps
its frozen base in the compute dtype and its adapters in fp32. MFU = model FLOPs (minillama.perf.train_flops: 3x
forward for full fine-tuning, 2x for LoRA, causal attention per document) / time / (--peak_tflops x processes),
shown on GPUs with a known bf16 peak. SIGTERM: the step in flight finishes, a checkpoint is written, exit 0 (under
torchrun the agent waits ~30 s before SIGKILL). A non-finite loss or gradient norm stops before the optimizer step,
keeping the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minillama import Transformer, load_model, save_hf  # noqa: E402
from minillama.data import load_jsonl, report_bad_lines  # noqa: E402
from minillama.distributed import init_distributed  # noqa: E402
from minillama.fsdp import apply_fsdp, checkpoint_blocks, ensure_process_group  # noqa: E402
from minillama.lora import apply_lora  # noqa: E402
from minillama.loss import CausalLMLoss  # noqa: E402
from minillama.metrics import MetricsWriter, ProgressBar, default_peak_tflops, peak_memory_gb, read_metrics  # noqa
from minillama.optim import build_optimizer, lr_at, set_lr  # noqa: E402
from minillama.packing import collate, padded_tokens, plan_epoch  # noqa: E402
from minillama.perf import param_counts, train_flops  # noqa: E402
from minillama.plot import write_loss_png  # noqa: E402
from minillama.resume import (full_state_dict, load_checkpoint, load_rng_state, resolve_resume,  # noqa: E402
                              save_checkpoint, save_lora_adapter, write_atomic)
from minillama.tokenizer import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", help="a .toml/.json/.yaml file whose keys are flag names; CLI flags override it")
    p.add_argument("--model", default=str(REPO / "weights" / "smollm2-135m-instruct"),
                   help="checkpoint dir (HF or Meta) that minillama.load_model reads")
    p.add_argument("--data", default=str(REPO / "train" / "data" / "reviews.jsonl"), help="training JSONL")
    p.add_argument("--eval_data", default=None, help="JSONL for the eval loss")
    p.add_argument("--eval_every", type=int, default=0, help="eval every N steps (0: only at the end)")
    p.add_argument("--out", default="out/sft", help="output dir")
    # schedule
    p.add_argument("--max_steps", type=int, default=0, help="optimizer steps; 0 = --epochs passes over the data")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=8, help="global batch in rows (all ranks, all micro-steps)")
    p.add_argument("--micro_batch_size", type=int, default=0, help="rows per forward per rank; 0 = no accumulation")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3 LoRA, 2e-5 full)")
    p.add_argument("--warmup_steps", type=int, default=2)
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine decays to this fraction of --lr")
    p.add_argument("--weight_decay", type=float, default=0.1, help="on matrices only (not norms/biases)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--grad_clip", type=float, default=1.0, help="max global grad norm (0: off)")
    # data
    p.add_argument("--seq_len", type=int, default=8192, help="max tokens per row (packed) or per sample")
    p.add_argument("--pack", action="store_true", help="pack whole samples into rows of --seq_len (with doc_ids)")
    p.add_argument("--drop_long", action="store_true", help="drop samples longer than --seq_len instead of cutting")
    p.add_argument("--loss_chunk", type=int, default=1024, help="positions per chunk of the output projection")
    # what is trained
    p.add_argument("--lora_rank", type=int, default=16, help="0 = full fine-tuning")
    p.add_argument("--lora_alpha", type=float, default=32.0)
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--lora_targets", nargs="+", default=["all-linear"],
                   help="PEFT names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj lm_head experts "
                        "router, or all-linear")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="QLoRA: NF4 base weights (needs --lora_rank)")
    p.add_argument("--router_aux_loss_coef", type=float, default=0.02, help="Mixtral load-balancing loss weight")
    # systems
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="compute dtype (default bfloat16 on cuda, float32 on cpu); master weights stay float32")
    p.add_argument("--activation_checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--cpu_offload", action="store_true", help="FSDP2 CPUOffloadPolicy: params/grads/optimizer on CPU")
    p.add_argument("--peak_tflops", type=float, default=None, help="for MFU (default: the device's bf16 peak)")
    p.add_argument("--seed", type=int, default=0)
    # checkpoints
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep", type=int, default=2, help="keep the last N step_* checkpoints (0: all)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from OUT/latest (no value) or a given OUT/step_N dir")
    p.add_argument("--stop_at_step", type=int, default=0, help="save and exit after this step, as on SIGTERM")
    p.add_argument("--log_every", type=int, default=10, help="progress line every N steps when stderr is no tty")
    return p


def read_config_file(path: str) -> dict:
    """Flag values from a .toml, .json or .yaml/.yml file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {file} does not exist")
    if file.suffix == ".toml":
        import tomllib

        return tomllib.loads(file.read_text())
    if file.suffix == ".json":
        return json.loads(file.read_text())
    if file.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {file}: YAML needs PyYAML (pip install pyyaml); or use .toml/.json") from None
        return yaml.safe_load(file.read_text()) or {}
    raise ValueError(f"--config {file}: expected a .toml, .json, .yaml or .yml file")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--out", default=parser.get_default("out"))
    pre.add_argument("--resume", nargs="?", const="latest", default=None)
    known, _ = pre.parse_known_args(argv)
    saved = Path(known.out) / "config.json"
    if known.resume and not known.config and saved.is_file():
        # resuming picks up the run's own flags (model, data, lr, ...); flags given now still win. Batch splitting
        # is re-derived for the current process count (the loss does not depend on it).
        values = json.loads(saved.read_text())
        valid = {a.dest for a in parser._actions} - {"help", "config", "resume", "out", "micro_batch_size",
                                                      "stop_at_step"}
        parser.set_defaults(**{k: v for k, v in values.items() if k in valid})
    if known.config:
        values = {k.replace("-", "_"): v for k, v in read_config_file(known.config).items()}
        valid = {a.dest for a in parser._actions} - {"help", "config"}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"--config {known.config}: unknown keys {unknown}; valid keys: {', '.join(sorted(valid))}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-3 if args.lora_rank > 0 else 2e-5
    if args.quantize and args.lora_rank <= 0:
        parser.error("--quantize nf4 trains LoRA adapters on a frozen NF4 base: give --lora_rank > 0")
    return args


class Stop:
    """Set by SIGTERM (or --stop_at_step); the loop saves a checkpoint at the end of the step and exits."""

    requested = False

    @classmethod
    def handler(cls, signum, frame):
        cls.requested = True


def rank_rows(batch, rank, world_size):
    """This rank's contiguous share of a global batch's rows."""
    per_rank = len(batch) // world_size
    return batch[rank * per_rank:(rank + 1) * per_rank]


def forward_backward(root, samples, rows, micro, pad_id, pack, device, global_count, aux_scale, aux_coef):
    """Forward + backward over this rank's micro-batches. Returns this rank's [sum of token losses, sum of aux losses,
    real tokens, padded tokens, sum of squared document lengths]."""
    totals = [0.0, 0.0, 0, 0, 0]
    for m in range(0, len(rows), micro):
        mb = collate(samples, rows[m:m + micro], pad_id, pack)
        doc_ids = mb.doc_ids.to(device) if mb.doc_ids is not None else None
        ce_sum, aux = root(mb.tokens.to(device), mb.targets.to(device), doc_ids, mb.real.to(device))
        loss = ce_sum / global_count + aux_coef * aux * aux_scale
        loss.backward()
        totals[0] += ce_sum.item()
        totals[1] += aux.item()
        totals[2] += mb.n_real
        totals[3] += mb.tokens.numel()
        totals[4] += sum(n * n for n in mb.doc_lengths)
    return totals


@torch.no_grad()
def evaluate(root, samples, args, info, pad_id) -> float:
    """Mean token loss over the whole eval set (every rank takes its share of each batch)."""
    root.eval()
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    micro = args.micro_batch_size
    for batch in plan_epoch([len(s.ids) for s in samples], args.batch_size, args.seq_len, args.pack, 0, 0):
        rows = rank_rows(batch, info.rank, info.world_size)
        for m in range(0, len(rows), micro):
            mb = collate(samples, rows[m:m + micro], pad_id, args.pack)
            doc_ids = mb.doc_ids.to(info.device) if mb.doc_ids is not None else None
            ce_sum, _ = root(mb.tokens.to(info.device), mb.targets.to(info.device), doc_ids, mb.real.to(info.device))
            total[0] += ce_sum.double()
            total[1] += int((mb.targets != -100).sum())
    dist.all_reduce(total)
    root.train()
    return (total[0] / total[1].clamp(min=1)).item()


def export_final(root, model: Transformer, args, info, lora: bool) -> Path:
    """OUT/final: a PEFT adapter (LoRA) or a Hugging Face model (full fine-tuning, gathered on rank 0)."""
    final = Path(args.out) / "final"
    if lora:
        save_lora_adapter(model, final, args.model, info.is_rank0)
        return final
    state = full_state_dict(root)
    if info.is_rank0:
        state = {k.removeprefix("model."): v for k, v in state.items()}
        with torch.device("meta"):
            plain = Transformer(model.args)
        missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
        if unexpected or [k for k in missing if not (k == "output.weight" and model.args.tie_embeddings)]:
            raise RuntimeError(f"export_final: state dict mismatch: missing {missing}, unexpected {unexpected}")
        plain.tie_weights()
        save_hf(plain, final, tokenizer_src=args.model, overwrite=True)
    dist.barrier()
    return final


def load_data(args, log):
    """The tokenizer and the tokenized train (and eval) samples; per-file stats and bad lines go to rank 0's log."""
    if not Path(args.model).exists():
        hint = " (create it: python weights/prepare_smollm2.py)" if "smollm2-135m-instruct" in args.model else ""
        raise FileNotFoundError(f"--model {args.model} does not exist{hint}")
    tok = load_tokenizer(args.model)
    out = []
    for name, path in (("data", args.data), ("eval data", args.eval_data)):
        if not path:
            out.append(None)
            continue
        samples, stats = load_jsonl(path, tok, args.seq_len, args.drop_long)
        if log.enabled:
            report_bad_lines(stats)
        log.message(f"{name}: {stats.summary()}")
        out.append(samples)
    return tok, out[0], out[1]


def load_device(args, info) -> torch.device:
    """Where the checkpoint is read to before sharding.

    On GPU the full model goes to CPU memory first: fully_shard then moves one block at a time to the GPU and keeps
    only this rank's shard there, so no rank ever holds the whole model in GPU memory. The cost: while loading, each
    rank holds a CPU copy of the whole model in the load dtype (8 ranks x 16 GB for Llama 3 8B in bf16).
    QLoRA quantizes on the GPU as tensors arrive (CPU quantization of a 47B model is slow): every rank keeps the
    whole NF4 base on its GPU (~0.5 bytes/weight, replicated: FSDP shards parameters, not the 4-bit buffers, and
    CPU offload moves only parameters); the full-precision layer weights pass through one at a time.
    """
    if info.device.type == "cuda" and not args.quantize:
        return torch.device("cpu")
    return info.device


def build_model(args, info, compute_dtype, log):
    """Load the checkpoint, add LoRA (or unfreeze everything), wrap with the loss, shard with FSDP2, make AdamW."""
    lora = args.lora_rank > 0
    torch.manual_seed(args.seed)  # same LoRA init on every rank before sharding
    # LoRA: the frozen base may live in the compute dtype (no master copy needed), the adapters stay float32
    load_dtype = compute_dtype if lora else torch.float32
    model = load_model(args.model, device=load_device(args, info), dtype=load_dtype, quantize=args.quantize)
    if lora:
        apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, targets=args.lora_targets)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = param_counts(model.args)["total"]  # counted from the shapes: NF4 weights are buffers
    if args.activation_checkpointing:
        checkpoint_blocks(model)
    root = CausalLMLoss(model, args.loss_chunk).train()
    apply_fsdp(root, param_dtype=compute_dtype if compute_dtype != torch.float32 else None,
               cpu_offload=args.cpu_offload, device=info.device)
    optimizer = build_optimizer(root, args.lr, args.weight_decay, args.betas)
    what = f"LoRA r={args.lora_rank} on {' '.join(args.lora_targets)}" if lora else "full"
    log.message(f"model: {args.model} ({model.args.family}, {n_total / 1e6:.1f}M params), {what}"
                f"{' NF4 base' if args.quantize else ''}: {n_trainable / 1e6:.2f}M trainable; "
                f"{str(compute_dtype).removeprefix('torch.')} compute on {info.device}")
    return model, root, optimizer


def main(argv=None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, Stop.handler)  # finish the step, save, exit 0
    try:
        code = train(args)
        if dist.is_initialized():
            dist.barrier()  # no rank tears the group down while another is still inside a collective
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
        Stop.requested = False
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args) -> int:
    """The recipe: data, model, optional resume, the step loop, final checkpoint + export. Returns the exit code."""
    if args.cpu_offload:
        if not (args.device or "cuda").startswith("cuda") or not torch.cuda.is_available():
            raise ValueError("--cpu_offload moves GPU parameters to CPU memory; it needs --device cuda")
    info = init_distributed(args.device)
    ensure_process_group(info.device)
    rank0 = info.is_rank0
    out = Path(args.out)
    lora = args.lora_rank > 0
    compute_dtype = DTYPES[args.dtype or ("bfloat16" if info.device.type == "cuda" else "float32")]
    log = ProgressBar(0, enabled=rank0)

    # ---- data ----
    tok, samples, eval_samples = load_data(args, log)
    pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    lengths = [len(s.ids) for s in samples]
    if args.batch_size % info.world_size:
        raise ValueError(f"--batch_size {args.batch_size} must be a multiple of the {info.world_size} processes")
    per_rank = args.batch_size // info.world_size
    args.micro_batch_size = args.micro_batch_size or per_rank
    if per_rank % args.micro_batch_size:
        raise ValueError(f"--batch_size {args.batch_size} / {info.world_size} processes = {per_rank} rows per rank, "
                         f"not a multiple of --micro_batch_size {args.micro_batch_size}")
    accum = per_rank // args.micro_batch_size
    epoch_plans = {}

    def plan(epoch):
        if epoch not in epoch_plans:
            epoch_plans[epoch] = plan_epoch(lengths, args.batch_size, args.seq_len, args.pack, args.seed, epoch)
        return epoch_plans[epoch]

    total_steps = args.max_steps or sum(len(plan(e)) for e in range(args.epochs))
    first = plan(0)
    efficiency = sum(lengths) / max(1, sum(padded_tokens(b, lengths, args.micro_batch_size) for b in first))
    if rank0:
        log.message(f"batches: {len(first)} per epoch of {args.batch_size} rows ({'packed' if args.pack else 'padded'}"
                    f", {info.world_size} processes x {accum} micro-steps of {args.micro_batch_size} rows); "
                    f"non-pad fraction {efficiency:.1%}; {total_steps} steps")

    # ---- model ----
    model, root, optimizer = build_model(args, info, compute_dtype, log)
    trainable = [p for p in root.parameters() if p.requires_grad]

    # ---- state ----
    step, epoch, batch_idx, tokens_seen = 0, 0, 0, 0
    resume_from = resolve_resume(args.resume, out) if args.resume else None
    if resume_from is not None:
        st = load_checkpoint(resume_from, root, optimizer, lora)
        step, epoch, batch_idx, tokens_seen = st["step"], st["epoch"], st["batch_idx"], st["tokens_seen"]
        if rank0:
            log.message(f"resumed from {resume_from} at step {step}")
    torch.manual_seed(args.seed * 1000 + info.rank + 1)  # LoRA dropout streams differ per rank
    if resume_from is not None and st.get("world_size") == info.world_size:
        load_rng_state(resume_from, info.rank)  # exact continuation of each rank's dropout stream
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {**vars(args), "world_size": info.world_size, "accumulation_steps": accum,
                    "total_steps": total_steps, "compute_dtype": str(compute_dtype).removeprefix("torch.")}
        write_atomic(out / "config.json", json.dumps(resolved, indent=2) + "\n")
    metrics = MetricsWriter(out / "metrics.jsonl", resume_step=step if resume_from else 0, enabled=rank0)
    peak = args.peak_tflops or default_peak_tflops(info.device)
    bar = ProgressBar(total_steps, start=step, every=args.log_every, enabled=rank0)
    aux_coef = args.router_aux_loss_coef if model.args.n_experts else 0.0
    last_saved = None

    def train_state():
        return {"epoch": epoch, "batch_idx": batch_idx, "tokens_seen": tokens_seen, "world_size": info.world_size}

    def save():
        nonlocal last_saved
        last_saved = save_checkpoint(out, step, root, optimizer, train_state(), lora, info.rank, args.model,
                                     args.keep)

    # ---- loop ----
    while step < total_steps:
        if batch_idx >= len(plan(epoch)):
            epoch, batch_idx = epoch + 1, 0
            epoch_plans.pop(epoch - 2, None)
        rows = rank_rows(plan(epoch)[batch_idx], info.rank, info.world_size)
        t0 = time.perf_counter()
        count = torch.tensor([sum(samples[i].n_targets() for r in rows for i in r)], dtype=torch.float64,
                             device=info.device)
        dist.all_reduce(count)  # the loss is a mean over the global batch's learned tokens: count them first
        step_lr = lr_at(step + 1, args.lr, args.warmup_steps, total_steps, args.min_lr_ratio)
        set_lr(optimizer, step_lr)
        n_micro = accum * info.world_size
        totals = forward_backward(root, samples, rows, args.micro_batch_size, pad_id, args.pack, info.device,
                                  count.clamp(min=1).item(), 1.0 / n_micro, aux_coef)
        # [loss sum, aux sum, real tokens, padded tokens, sum of doc_len^2, stop requested] over all ranks
        sums = torch.tensor(totals + [float(Stop.requested)], dtype=torch.float64, device=info.device)
        dist.all_reduce(sums)
        loss = sums[0].item() / max(count.item(), 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else float("inf"))
        grad_norm = grad_norm.full_tensor().item() if hasattr(grad_norm, "full_tensor") else grad_norm.item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
            bar.message(f"step {step + 1}: {what}; stopping without an optimizer step. Last good checkpoint: "
                        f"{last_saved or resolve_resume('latest', out) or 'none'} (lower --lr, check the data)")
            metrics.close()
            return 1
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, batch_idx = step + 1, batch_idx + 1
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens = int(sums[2].item())
        tokens_seen += tokens
        record = {"step": step, "loss": loss, "lr": step_lr, "grad_norm": grad_norm, "tokens": tokens,
                  "tokens_per_s": tokens / dt, "nonpad_frac": tokens / sums[3].item(), "epoch": epoch, "time_s": dt,
                  "peak_mem_gb": peak_memory_gb(info.device)}
        if aux_coef:
            record["aux_loss"] = sums[1].item() / n_micro
        if peak:
            flops = train_flops(model.args, tokens, sums[4].item() / max(tokens, 1), lora=lora)
            record["mfu"] = flops / dt / (peak * 1e12 * info.world_size)
        metrics.write(record)
        fields = {"loss": f"{loss:.4f}", "lr": f"{step_lr:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}"}
        if "mfu" in record:
            fields["mfu"] = f"{record['mfu']:.1%}"
        fields["mem"] = f"{record['peak_mem_gb']:.1f}G"
        bar.update(step, fields)
        if eval_samples and args.eval_every and step % args.eval_every == 0 and step < total_steps:
            ev = evaluate(root, eval_samples, args, info, pad_id)
            metrics.write({"step": step, "eval_loss": ev})
            bar.message(f"step {step}: eval loss {ev:.4f}")
        stop = sums[5].item() > 0 or step == args.stop_at_step
        if stop or (args.save_every and step % args.save_every == 0 and step < total_steps):
            save()
        if stop:
            bar.message(f"stopped at step {step}; checkpoint {last_saved}; continue with --resume")
            metrics.close()
            return 0

    # ---- end ----
    if eval_samples:
        ev = evaluate(root, eval_samples, args, info, pad_id)
        metrics.write({"step": step, "eval_loss": ev})
        bar.message(f"eval loss {ev:.4f}")
    save()
    final = export_final(root, model, args, info, lora)
    metrics.close()
    if rank0:
        png = write_loss_png(out / "loss.png", read_metrics(out / "metrics.jsonl"))
        bar.message(f"done: {step} steps, {tokens_seen} tokens; {final} ({'PEFT adapter' if lora else 'HF model'}), "
                    f"{last_saved}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
