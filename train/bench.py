"""Training-step speed: minillama vs Hugging Face transformers (+ peft) on the same shapes and rows.

    python train/bench.py                                   # all three cases on the GPU at the real shapes
    python train/bench.py --cases lora --seq_len 8192       # LoRA, Llama-3-8B shape, one 8K packed row per step
    python train/bench.py --tiny --device cpu               # toy shapes (what the test suite runs)

Cases (random weights; speed does not depend on the values):
  lora  LoRA r=16 on q/k/v/o/gate/up/down, Llama-3-8B shape, bf16 base, packed rows of --seq_len, activation
        checkpointing; ours: document-masked packing + chunked loss; HF: sdpa + gradient checkpointing + peft.
  full  full fine-tuning of the Llama-3.2-1B shape, bf16 compute with fp32 master weights (ours: FSDP2 mixed
        precision on one process; HF: torch.autocast(bf16) over fp32 weights), AdamW.
  moe   one Mixtral-8x7B MoE layer, forward + backward over --moe_tokens tokens, bf16.
MFU = model FLOPs (minillama.training.perf.train_flops: 6N per token for full, 4N for LoRA, plus causal attention) / time /
the bf16 matmul peak measured in the same run.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minillama import ModelArgs, Transformer  # noqa: E402
from minillama.args import to_hf_config  # noqa: E402
from minillama.cli import ArgumentParser, run  # noqa: E402
from minillama.training.fsdp import apply_fsdp, checkpoint_blocks, ensure_process_group  # noqa: E402
from minillama.checkpoints.hf_format import hf_tensors  # noqa: E402
from minillama.lora import apply_lora, lora_parameters  # noqa: E402
from minillama.training.loss import CausalLMLoss  # noqa: E402
from minillama.moe import MoEFeedForward  # noqa: E402
from minillama.attention import doc_positions  # noqa: E402
from minillama.training.perf import measure_matmul_peak, time_fn, train_flops  # noqa: E402

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, hidden_dim=256, max_seq_len=8192,
            rope_theta=500000.0, family="llama3")


def get_args():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--cases", default="lora,full,moe")
    p.add_argument("--seq_len", type=int, default=8192, help="packed row length")
    p.add_argument("--docs_per_row", type=int, default=4, help="documents packed into each row")
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--moe_tokens", type=int, default=8192)
    p.add_argument("--tiny", action="store_true", help="toy shapes instead of the real ones")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no_hf", action="store_true")
    p.add_argument("--iters", type=int, default=3)
    return p.parse_args()


def shape(name: str, tiny: bool, **over) -> ModelArgs:
    return ModelArgs(**{**TINY, **over}) if tiny else ModelArgs.from_name(name, **over)


def random_model(args: ModelArgs, dtype, device) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    model.reset_rope(device)
    model.tie_weights()
    return model


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
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def ours_train_step(model, lora: bool, ac: bool, batch, device, compute_dtype):
    """A trainer-shaped step: CausalLMLoss under FSDP2 (one process), AdamW on the trainable parameters."""
    if lora:
        apply_lora(model, rank=16, alpha=32, targets=LORA_TARGETS)
    if ac:
        checkpoint_blocks(model)
    ensure_process_group(device)
    wrapper = apply_fsdp(CausalLMLoss(model), param_dtype=compute_dtype)
    params = lora_parameters(model) if lora else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    tokens, targets, doc_ids = batch
    n = (targets != -100).sum()

    def step():
        ce_sum, _ = wrapper(tokens, targets, doc_ids=doc_ids)
        (ce_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under HF names and q/k row order, copied to host memory (taken before LoRA/FSDP change them)."""
    return {p.name: p.make().detach().to("cpu", copy=True) for p in hf_tensors(model.state_dict(), model.args)}


def hf_model(args: ModelArgs, weights: dict, dtype, device):
    """transformers' twin of our model with the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**to_hf_config(args))
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).to(device)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"HF twin: missing {missing}, unexpected {unexpected}")
    return hf


def hf_train_step(hf, lora: bool, batch, device, autocast_dtype):
    if lora:
        from peft import LoraConfig, get_peft_model
        hf = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, target_modules=list(LORA_TARGETS)))
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    tokens, targets, doc_ids = batch
    # HF's sdpa path has no document masking; restarting position_ids at least restarts RoPE per document
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


def bench_train(name, args, lora, a, device, peak, results):
    base_dtype = torch.bfloat16 if lora else torch.float32  # full fine-tuning keeps fp32 master weights
    compute_dtype = torch.bfloat16 if not lora and device.type == "cuda" else None
    batch = packed_batch(args, a.seq_len, a.docs_per_row, device)
    tokens = batch[0].numel()
    flops = train_flops(args, tokens, a.seq_len // a.docs_per_row, lora=lora)
    reset_peak(device)
    model = random_model(args, base_dtype, device)
    weights = None if a.no_hf else hf_weights(model)
    step = ours_train_step(model, lora, ac=True, batch=batch, device=device, compute_dtype=compute_dtype)
    t = time_fn(step, device, warmup=1, iters=a.iters)
    results.append((name, "minillama", tokens / t, 100 * flops / t / peak, peak_gb(device)))
    del model, step
    torch.distributed.destroy_process_group()
    if a.no_hf:
        return
    reset_peak(device)
    hf = hf_model(args, weights, base_dtype, device)
    del weights
    hf_step = hf_train_step(hf, lora, batch, device, compute_dtype)
    t = time_fn(hf_step, device, warmup=1, iters=a.iters)
    results.append((name, "HF" + (" + peft" if lora else ""), tokens / t, 100 * flops / t / peak, peak_gb(device)))
    del hf, hf_step


def bench_moe(args, a, device, peak, results):
    dtype = torch.bfloat16
    torch.manual_seed(0)
    ours = MoEFeedForward(args.dim, args.hidden_dim, args.n_experts, args.n_experts_per_tok).to(device, dtype)
    x = torch.randn(1, a.moe_tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    # FLOPs actually done: k experts per token, 3 matmuls, forward + 2x backward
    flops = 3 * 2 * a.moe_tokens * args.n_experts_per_tok * 3 * args.dim * args.hidden_dim

    def fwd_bwd(block):
        def run():
            out = block(x)
            out.backward(torch.ones_like(out))
        return run

    reset_peak(device)
    t_ours = time_fn(fwd_bwd(ours), device, warmup=2, iters=a.iters)
    results.append(("moe layer", "minillama", a.moe_tokens / t_ours, 100 * flops / t_ours / peak, peak_gb(device)))
    if a.no_hf:
        return
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    config = MixtralConfig(hidden_size=args.dim, intermediate_size=args.hidden_dim, num_local_experts=args.n_experts,
                           num_experts_per_tok=args.n_experts_per_tok)
    hf = MixtralSparseMoeBlock(config).to(device, dtype)
    with torch.no_grad():  # same weights: fused gate_up = [w1; w3]
        hf.gate.weight.copy_(ours.gate.weight)
        hf.experts.gate_up_proj.copy_(torch.cat([ours.experts.w1, ours.experts.w3], dim=1))
        hf.experts.down_proj.copy_(ours.experts.w2)
        diff = (hf(x).float() - ours(x).float()).abs().mean().item()
        assert diff < 1e-2, f"HF's MoE block and ours disagree (mean |diff| {diff}): the comparison would be unfair"
    reset_peak(device)
    t_hf = time_fn(fwd_bwd(hf), device, warmup=2, iters=a.iters)
    results.append(("moe layer", "HF", a.moe_tokens / t_hf, 100 * flops / t_hf / peak, peak_gb(device)))


def main():
    a = get_args()
    device = torch.device(a.device)
    peak = measure_matmul_peak(device, torch.bfloat16, n=8192 if device.type == "cuda" else 256)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}; bf16 matmul peak {peak / 1e12:.1f} TFLOP/s; "
          f"rows of {a.seq_len} tokens, {a.docs_per_row} documents each")
    results = []
    cases = a.cases.split(",")
    if "lora" in cases:
        bench_train("lora " + ("tiny" if a.tiny else "llama3-8b"), shape("llama3-8b", a.tiny), True, a, device,
                    peak, results)
    if "full" in cases:
        bench_train("full " + ("tiny" if a.tiny else "llama3.2-1b"), shape("llama3.2-1b", a.tiny), False, a, device,
                    peak, results)
    if "moe" in cases:
        bench_moe(shape("mixtral-8x7b", a.tiny, n_experts=8, n_experts_per_tok=2), a, device, peak, results)
    print(f"\n{'case':<18} {'impl':<12} {'tokens/s':>10} {'MFU %':>6} {'peak GB':>8}")
    for case, impl, tps, mfu, mem in results:
        mem_s = f"{mem:>8.1f}" if mem == mem else f"{'-':>8}"  # nan on CPU: no allocator statistics
        print(f"{case:<18} {impl:<12} {tps:>10.0f} {mfu:>6.1f} {mem_s}")
    by_case = {}
    for case, impl, tps, _, mem in results:
        by_case.setdefault(case, []).append((tps, mem))
    for case, rows in by_case.items():
        if len(rows) == 2:
            (t0, m0), (t1, m1) = rows
            mem = f", {m0 / m1:.2f}x its peak memory" if m1 == m1 and m1 else ""
            print(f"{case}: {t0 / t1:.2f}x HF tokens/s{mem}")


if __name__ == "__main__":
    sys.exit(run(main))
