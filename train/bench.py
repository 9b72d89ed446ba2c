"""Training-step speed: minillama vs Hugging Face transformers (+ peft) on the same shapes and rows.

    python train/bench.py                                   # all three cases on the GPU at the real shapes
    python train/bench.py --cases lora --seq_len 8192       # LoRA, Llama-3-8B shape, one 8K packed row per step
    python train/bench.py --tiny --device cpu               # toy shapes (what the test suite runs)
    OMP_NUM_THREADS=2 python train/bench.py --cases smollm2-lora --seq_len 1024   # the embedded SmolLM2, CPU, fp32

Cases (random weights; speed does not depend on the values; HF's model has its own):
  lora  LoRA r=16 on q/k/v/o/gate/up/down, Llama-3-8B shape, bf16 base, packed rows of --seq_len, activation
        checkpointing; ours: the trainer's path (FSDP2 on one process, bf16 compute as train/sft.py does, varlen
        attention per document, chunked loss); HF: sdpa + gradient checkpointing + peft (fp32 adapters).
  full  full fine-tuning of the Llama-3.2-1B shape, bf16 compute with fp32 master weights (ours: FSDP2 mixed
        precision on one process; HF: torch.autocast(bf16) over fp32 weights), AdamW.
  moe   one Mixtral-8x7B MoE layer, forward + backward over --moe_tokens tokens, bf16, against transformers'
        MixtralSparseMoeBlock as a standalone module (its per-expert loop) and with experts_implementation=
        "grouped_mm" (what transformers 5 picks inside a loaded model), on the same weights.
  smollm2-lora  the embedded SmolLM2-135M checkpoint (--ckpt), LoRA r16 alpha 32 on every linear but the head,
        dropout 0, fp32, one row of --seq_len tokens (default 1024), on the CPU. Ours and HF + peft (sdpa) each run in
        their own process, alternated --rounds times (ours, HF, ours, HF, ...: a change of machine load hits both);
        each process times forward + backward + AdamW step (median of --iters after --warmup) and measures its peak
        resident memory over those steps (Linux's VmHWM, reset once the model and optimizer are set up), both as the
        process's whole peak and as the rise over its resident memory after set-up. Ours is the trainer's own
        build_model (train/sft.py's path); the first step's losses must agree, so both do the same work.
MFU = model FLOPs (minillama.perf.train_flops: 6N per token for full, 4N for LoRA, plus causal attention) /
time / the bf16 matmul peak measured in the same run. --json adds each result to a results file as it is measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minillama import ModelArgs  # noqa: E402
from minillama.tools import benchmarks as bm  # noqa: E402
from minillama.attention import doc_positions  # noqa: E402
from minillama.util.cli import DEFAULT_CKPT, ArgumentParser, positive_int, run  # noqa: E402
from minillama.lora.layers import apply_lora, lora_parameters  # noqa: E402
from minillama.moe import MoEFeedForward  # noqa: E402
from minillama.training.fsdp import (apply_fsdp, checkpoint_activations, compile_blocks,  # noqa: E402
                                     ensure_process_group)
from minillama.training.loss import CausalLMLoss  # noqa: E402
from minillama.training.metrics import default_peak_tflops  # noqa: E402
from minillama.perf import time_fn, train_flops  # noqa: E402

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, hidden_dim=256, max_seq_len=8192,
            rope_theta=500000.0, family="llama3")
CASES = ("lora", "full", "moe", "smollm2-lora")
SMOLLM2 = "smollm2-lora"


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--cases", default="lora,full,moe", help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--seq_len", type=positive_int, default=None,
                   help=f"row length (default 8192; {SMOLLM2}: 1024)")
    p.add_argument("--docs_per_row", type=positive_int, default=4, help="documents packed into each row")
    p.add_argument("--lora_rank", type=positive_int, default=16, help="LoRA rank of the lora case")
    p.add_argument("--n_layers", type=positive_int, default=None, help="fewer layers (the output says so)")
    p.add_argument("--moe_tokens", type=positive_int, default=8192, help="tokens routed through the MoE layer case")
    p.add_argument("--tiny", action="store_true", help="toy shapes instead of the real ones")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--no_hf", action="store_true", help="skip the transformers / peft comparison")
    p.add_argument("--compile", action="store_true",
                   help="ours: torch.compile each transformer block (the trainer's --compile); compiled in the "
                        "untimed warm-up steps")
    p.add_argument("--iters", type=positive_int, default=3, help="timed steps (median reported)")
    p.add_argument("--ckpt", "--model", dest="ckpt", default=str(DEFAULT_CKPT),
                   help=f"{SMOLLM2}: the HF-format checkpoint dir")
    p.add_argument("--rounds", type=positive_int, default=2, help=f"{SMOLLM2}: ours/HF process pairs, alternated")
    p.add_argument("--warmup", type=positive_int, default=2, help=f"{SMOLLM2}: untimed steps first")
    p.add_argument("--worker", choices=("ours", "hf"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="add every result to this results file as it is measured")
    p.add_argument("--profile", default=None, help="append torch.profiler's kernel table of one step of ours here")
    a = p.parse_args(argv)
    bad = set(a.cases.split(",")) - set(CASES)
    if bad:
        p.error(f"--cases: unknown {sorted(bad)}; choose from {', '.join(CASES)}")
    if a.seq_len is None:
        a.seq_len = 1024 if a.cases == SMOLLM2 or a.worker else 8192
    return a


def shape(name: str, a, **over) -> ModelArgs:
    if a.n_layers:
        over["n_layers"] = a.n_layers
    return ModelArgs(**{**TINY, **over}) if a.tiny else ModelArgs.from_name(name, **over)


def packed_batch(args: ModelArgs, seq_len: int, docs: int, device):
    """One row of `docs` equal documents: tokens, next-token targets (-100 at each document's end), doc_ids."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (1, seq_len), generator=g)
    doc_ids = (torch.arange(seq_len) * docs // seq_len)[None]
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, :-1][doc_ids[:, 1:] != doc_ids[:, :-1]] = -100
    targets[:, -1] = -100
    return tokens.to(device), targets.to(device), doc_ids.to(device)


def peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def ours_train_step(model, lora: bool, rank: int, batch, device, compute_dtype, compile: bool = False):
    """A trainer-shaped step: CausalLMLoss under FSDP2 (one process), AdamW on the trainable parameters."""
    if lora:
        apply_lora(model, rank=rank, alpha=2 * rank, targets=LORA_TARGETS)
    else:
        model.requires_grad_(True)
    if compile:  # before checkpointing, as the trainer does
        compile_blocks(model)
    checkpoint_activations(model)
    ensure_process_group(device)
    wrapper = apply_fsdp(CausalLMLoss(model).train(), param_dtype=compute_dtype)
    params = lora_parameters(model) if lora else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    tokens, targets, doc_ids = batch
    n = (targets != -100).sum()

    def step():
        ce_sum, _ = wrapper(tokens, targets, doc_ids=doc_ids)
        (ce_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_train_step(hf, lora: bool, rank: int, batch, device, autocast_dtype):
    if lora:
        from peft import LoraConfig, get_peft_model
        hf = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS)))
    else:
        hf.requires_grad_(True)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    tokens, targets, doc_ids = batch
    # restarting position_ids restart RoPE per document, and transformers 5 reads the packing from them and masks
    # attention across documents (one dense (T, T) mask through sdpa; ours skips those blocks in the varlen kernel)
    position_ids = doc_positions(doc_ids)
    labels = tokens.clone()  # HF shifts labels itself: mask each document's first token = our masked targets
    labels[:, 1:][targets[:, :-1] == -100] = -100
    labels[:, 0] = -100

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = hf(input_ids=tokens, position_ids=position_ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_train(case: str, args, a, device, ceil, preset: str):
    lora = case == "lora"
    base_dtype = torch.bfloat16 if lora else torch.float32  # full fine-tuning keeps fp32 master weights
    gpu = device.type == "cuda"
    batch = packed_batch(args, a.seq_len, a.docs_per_row, device)
    tokens = batch[0].numel()
    flops = train_flops(args, tokens, a.seq_len // a.docs_per_row, lora=lora)
    peak = ceil["matmul_TFLOPs"] * 1e12
    datasheet = default_peak_tflops(device)  # MFU as the trainer's progress bar shows it
    common = {"case": case, "shape": "tiny" if a.tiny else preset, **bm.layers_note(args, None if a.tiny else preset),
              "seq_len": a.seq_len, "docs_per_row": a.docs_per_row, "tokens_per_step": tokens,
              "floor_tokens_per_s": tokens * peak / flops, **ceil}

    def measure(impl: str, step) -> dict:
        t = time_fn(step, device, warmup=1, iters=a.iters)
        r = {**common, "impl": impl, "tokens_per_s": tokens / t, "step_s": t, "mfu_pct": 100 * flops / t / peak,
             "mfu_datasheet_pct": 100 * flops / t / (datasheet * 1e12) if datasheet else None,
             "peak_gb": peak_gb(device) if gpu else None}
        bm.record(a.json, "train", f"{case}|{impl}", r)
        print(f"{case:<6} {impl:<12} {r['tokens_per_s']:>10.0f} {r['mfu_pct']:>6.1f} "
              f"{r['peak_gb'] if r['peak_gb'] is not None else float('nan'):>8.1f}", flush=True)
        return r

    reset_peak(device)
    model = bm.random_model(args, base_dtype, device)
    step = ours_train_step(model, lora, a.lora_rank, batch, device, torch.bfloat16 if gpu else None, a.compile)
    ours = measure("minillama+compile" if a.compile else "minillama", step)
    bm.profile_to(a.profile, f"train {case} minillama, rows of {a.seq_len}", step, device)
    del model, step
    torch.distributed.destroy_process_group()
    if a.no_hf:
        return
    reset_peak(device)
    hf = bm.hf_model(args, base_dtype, device)
    hf_step = hf_train_step(hf, lora, a.lora_rank, batch, device, torch.bfloat16 if gpu and not lora else None)
    theirs = measure("HF + peft" if lora else "HF", hf_step)
    del hf, hf_step
    mem = (f", {ours['peak_gb'] / theirs['peak_gb']:.2f}x its peak memory" if gpu else "")
    print(f"{case}: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x HF tokens/s{mem}")


def hf_moe_block(args: ModelArgs, ours: MoEFeedForward, experts_implementation, device, dtype):
    """transformers' MixtralSparseMoeBlock with our layer's weights (fused gate_up = [w1; w3])."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=args.dim, intermediate_size=args.hidden_dim, num_local_experts=args.n_experts,
                           num_experts_per_tok=args.n_experts_per_tok)
    if experts_implementation:
        config._experts_implementation = experts_implementation
    with torch.device(device):
        hf = MixtralSparseMoeBlock(config).to(dtype)
    with torch.no_grad():
        hf.gate.weight.copy_(ours.gate.weight)
        hf.experts.gate_up_proj.copy_(torch.cat([ours.experts.w1, ours.experts.w3], dim=1))
        hf.experts.down_proj.copy_(ours.experts.w2)
    return hf


def bench_moe(args, a, device, ceil):
    dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        ours = MoEFeedForward(args.dim, args.hidden_dim, args.n_experts, args.n_experts_per_tok).to(dtype)
    x = torch.randn(1, a.moe_tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    # FLOPs actually done: k experts per token, 3 matmuls, forward + 2x backward
    flops = 3 * 2 * a.moe_tokens * args.n_experts_per_tok * 3 * args.dim * args.hidden_dim
    peak = ceil["matmul_TFLOPs"] * 1e12
    common = {"shape": "tiny" if a.tiny else "mixtral-8x7b", "tokens": a.moe_tokens, "dim": args.dim,
              "hidden_dim": args.hidden_dim, "experts": args.n_experts, "top_k": args.n_experts_per_tok,
              "grouped_gemm": ours.experts.grouped_ok(x), "floor_tokens_per_s": a.moe_tokens * peak / flops, **ceil}

    def measure(impl, block):
        def run():
            out = block(x)
            out.backward(torch.ones_like(out))
        reset_peak(device)
        t = time_fn(run, device, warmup=2, iters=a.iters)
        r = {**common, "impl": impl, "tokens_per_s": a.moe_tokens / t, "ms": 1e3 * t,
             "mfu_pct": 100 * flops / t / peak, "peak_gb": peak_gb(device) if device.type == "cuda" else None}
        bm.record(a.json, "moe", impl, r)
        print(f"{'moe':<6} {impl:<14} {r['tokens_per_s']:>10.0f} {r['mfu_pct']:>6.1f}", flush=True)
        return r

    mine = measure("minillama", ours)
    bm.profile_to(a.profile, f"moe layer minillama, {a.moe_tokens} tokens", lambda: ours(x).backward(
        torch.ones_like(x)), device)
    if a.no_hf:
        return
    for impl, name in ((None, "HF"), ("grouped_mm", "HF grouped_mm")):
        hf = hf_moe_block(args, ours, impl, device, dtype)
        with torch.no_grad():
            diff = (hf(x).float() - ours(x).float()).abs().mean().item()
        assert diff < 1e-2, f"{name}'s MoE block and ours disagree (mean |diff| {diff}): the comparison would be unfair"
        theirs = measure(name, hf)
        print(f"moe layer: {mine['tokens_per_s'] / theirs['tokens_per_s']:.2f}x {name} tokens/s")
        del hf

# ---- smollm2-lora: the embedded checkpoint on the CPU, ours and HF + peft in alternating processes ----
def rss_now() -> int:
    """This process's resident bytes now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Start Linux's resident high-water mark (VmHWM) again from the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """Resident high-water mark in bytes since the last reset_peak_rss."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def smollm2_ours(a, tokens: torch.Tensor):
    """The trainer's own model build (train/sft.py's build_model: LoRA, the loss root, FSDP when it has work, AdamW)
    and a step of forward, backward, optimizer step."""
    from minillama.training.build import build_model
    from minillama.training.config import DataConfig, LoraConfig, ModelConfig, OptimConfig, TrainConfig
    from minillama.training.metrics import ProgressBar
    from minillama.util.distributed import init_distributed

    cfg = TrainConfig(out="", model=ModelConfig(ckpt=a.ckpt, dtype="float32", compile=a.compile),
                      lora=LoraConfig(rank=16, alpha=32.0), optim=OptimConfig(lr=1e-4),
                      data=DataConfig(data="", seq_len=a.seq_len, batch_size=1))
    info = init_distributed("cpu")
    ensure_process_group(info.device)
    parts = build_model(cfg, info, torch.float32, ProgressBar(0), longest=a.seq_len)  # its log lines: stderr
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100  # HF's labels=tokens learns the same T - 1 next tokens
    n = (targets != -100).sum()

    def step() -> float:
        ce_sum, _ = parts.root(tokens, targets)
        loss = ce_sum / n
        loss.backward()
        parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def smollm2_hf(a, tokens: torch.Tensor):
    """transformers' LlamaForCausalLM from the same checkpoint (sdpa), peft LoRA r16 alpha 32 on all linears, AdamW."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(a.ckpt, dtype=torch.float32, attn_implementation="sdpa")
    hf.config.use_cache = False
    hf = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    hf.train()
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = hf(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def smollm2_worker(a) -> dict:
    """One process's measurement: step seconds (median of --iters after --warmup), first loss, peak RSS."""
    from minillama.training.plan_memory import model_args
    vocab = model_args(a.ckpt).vocab_size  # the checkpoint's config: the same rows on both sides
    tokens = torch.randint(0, vocab, (1, a.seq_len), generator=torch.Generator().manual_seed(0))
    step = (smollm2_ours if a.worker == "ours" else smollm2_hf)(a, tokens)
    gc.collect()
    setup_rss = rss_now()
    reset_peak_rss()
    losses, times = [], []
    for i in range(a.warmup + a.iters):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    timed = sorted(times[a.warmup:])
    return {"impl": a.worker, "step_s": timed[len(timed) // 2], "times": times, "first_loss": losses[0],
            "setup_rss_mb": setup_rss / 2**20, "peak_rss_mb": peak_rss() / 2**20,
            "step_rss_mb": (peak_rss() - setup_rss) / 2**20, "threads": torch.get_num_threads()}


def run_worker(a, impl: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--cases", SMOLLM2, "--worker", impl, "--ckpt", a.ckpt,
           "--seq_len", str(a.seq_len), "--warmup", str(a.warmup), "--iters", str(a.iters), *["--compile"] * a.compile]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{SMOLLM2} worker {impl} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["plan"] = next((line for line in out.stderr.splitlines() if "checkpointing" in line), None)
    return result


def bench_smollm2(a) -> None:
    """--rounds pairs of processes, ours then HF + peft; each side's median over its rounds, and the ratios."""
    if not os.path.isdir(a.ckpt):
        raise FileNotFoundError(f"--ckpt {a.ckpt} does not exist (python weights/prepare_smollm2.py makes it)")
    load = os.getloadavg()[0]
    print(f"{SMOLLM2}: {a.ckpt}, LoRA r16 on all linears, fp32, 1 row of {a.seq_len} tokens"
          f"{' (ours: --compile)' if a.compile else ''}; {a.rounds} rounds of "
          f"separate processes, {a.warmup} warm-up + {a.iters} timed steps each; load average {load:.2f}")
    print(f"{'round':<6} {'impl':<10} {'step s':>8} {'peak RSS MB':>12} {'step RSS MB':>12} {'loss':>9}")
    runs = {"ours": [], "hf": []}
    for r in range(a.rounds):
        for impl in ("ours", "hf"):
            res = run_worker(a, impl)
            runs[impl].append(res)
            print(f"{r + 1:<6} {impl:<10} {res['step_s']:8.3f} {res['peak_rss_mb']:12.0f} {res['step_rss_mb']:12.0f} "
                  f"{res['first_loss']:9.4f}", flush=True)
    print(f"ours: {runs['ours'][0]['plan']}")  # whether the memory plan turned on activation checkpointing
    med = {impl: {k: sorted(x[k] for x in rs)[len(rs) // 2] for k in ("step_s", "peak_rss_mb", "step_rss_mb")}
           for impl, rs in runs.items()}
    loss_gap = abs(runs["ours"][0]["first_loss"] - runs["hf"][0]["first_loss"])
    if loss_gap > 1e-3:
        raise RuntimeError(f"first-step losses differ by {loss_gap:.2e}: the two sides are not doing the same work")
    o, h = med["ours"], med["hf"]
    ratios = {"speed_x": h["step_s"] / o["step_s"], "peak_rss_x": o["peak_rss_mb"] / h["peak_rss_mb"],
              "step_rss_x": o["step_rss_mb"] / h["step_rss_mb"]}
    print(f"{SMOLLM2} seq {a.seq_len}: {ratios['speed_x']:.2f}x HF + peft step speed (targets >= 1.2), "
          f"{ratios['peak_rss_x']:.2f}x its peak RSS, {ratios['step_rss_x']:.2f}x its RSS rise over the step "
          f"(targets <= 0.8); load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    bm.record(a.json, "train", f"{SMOLLM2}|seq{a.seq_len}", {"seq_len": a.seq_len, "load_avg": load, **ratios,
                                                              "ours": o, "hf": h, "runs": runs})


def main(argv=None):
    a = get_args(argv)
    if a.worker:  # one side of the smollm2-lora case, in its own process: its result as the last line
        print(json.dumps(smollm2_worker(a)))
        return 0
    if a.cases == SMOLLM2:
        return bench_smollm2(a)
    if SMOLLM2 in a.cases.split(","):
        raise ValueError(f"--cases {SMOLLM2} runs on its own (CPU processes), not with the GPU cases")
    device = torch.device(a.device)
    ceil = bm.ceilings(device, torch.bfloat16)
    print(f"device: {bm.device_name(device)}, torch {torch.__version__}; bf16 matmul peak "
          f"{ceil['matmul_TFLOPs']:.1f} TFLOP/s; rows of {a.seq_len} tokens, {a.docs_per_row} documents each")
    print(f"\n{'case':<6} {'impl':<12} {'tokens/s':>10} {'MFU %':>6} {'peak GB':>8}")
    cases = a.cases.split(",")
    for case, preset in (("lora", "llama3-8b"), ("full", "llama3.2-1b")):
        if case in cases:
            args = shape(preset, a)
            if args.n_layers != ModelArgs.from_name(preset).n_layers and not a.tiny:
                print(f"({case}: layers cut to {args.n_layers} of {ModelArgs.from_name(preset).n_layers})")
            bench_train(case, args, a, device, ceil, preset)
    if "moe" in cases:
        bench_moe(shape("mixtral-8x7b", a, n_experts=8, n_experts_per_tok=2), a, device, ceil)
    if a.json:
        print("\n" + bm.format_targets(bm.target_rows(bm.load(a.json))))


if __name__ == "__main__":
    sys.exit(run(main))
