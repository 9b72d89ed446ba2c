"""The GPU routes, each against a reference computed in the same run: packed rows through the varlen kernel,
grouped-GEMM experts (plain, LoRA, NF4), the compiled CUDA-graph decode step, train/sft.py steps under FSDP2 in
bf16 (nccl on a GPU; plus CPU offload and QLoRA), continuous batching, and int4 weights through
torch._weight_int4pack_mm. The compiled-decode tests come last: their compiles are the slow, uncertain part of the
GPU run's time.

Every test is parametrized by device. The `cuda` variants (marker `cuda`, skipped without a GPU) run on the device
machine via tests/gpu_check.sh at real widths (Llama-3-8B / Mixtral-8x7B) with 2 layers; the `cpu` variants run the
same references and tolerances at toy shapes in CI, with the kernels CPU has (the varlen route goes through a
per-document stand-in with torch 2.11's varlen_attn signature, as on the device machine; the int4 layout's CPU
test is tests/test_weight_only.py's, on stand-ins of the two CUDA ops).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

from minillama import ModelArgs, attention
from minillama.inference import decode_step as decode_step_module
from minillama.inference import engine as engine_module
from minillama.inference import generate as generation
from minillama.inference.engine import EngineConfig
from minillama.tools import benchmarks as bm
from minillama.lora.experts import LoRAExperts
from minillama.moe import MoEFeedForward, QuantizedExperts
from minillama.quant import NF4Weight
from helpers import tiny_model
from sft_helpers import REPO, metrics, qa_samples, tiny_checkpoint, write_jsonl

CUDA = torch.cuda.is_available()
DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")])]
BF16_REL = 3e-2  # relative L2 error two bf16 computations of the same thing may differ by
BF16_DECODE_REL = 6e-2  # the same after up to 16 decode steps (rounding accumulates through the bf16 KV cache)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gpu_args(family: str, n_layers: int = 2) -> ModelArgs:
    """The real widths with few layers (the cuda variants)."""
    return ModelArgs.from_name("llama3-8b" if family == "llama" else "mixtral-8x7b", n_layers=n_layers)


def make_model(device: str, family: str, dtype: torch.dtype, seed: int = 0, n_layers: int = 2):
    """Toy shapes on CPU, the real widths with n_layers layers on CUDA."""
    if device == "cpu":
        moe = {"n_experts": 4, "n_experts_per_tok": 2} if family == "mixtral" else {}
        return tiny_model(seed=seed, max_seq_len=1024, **moe).to(dtype)
    return bm.random_model(gpu_args(family, n_layers), dtype, torch.device("cuda"), seed=seed)


# ---- torch-version glue, checked on CPU ----

def _sdpa_per_document(q, k, v, cu, window_size):
    """What torch's varlen_attn computes, per document with plain causal SDPA. (N, H, D)."""
    assert window_size == (-1, 0), f"causal is spelt window_size=(-1, 0), got {window_size}"
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                           v[s:e].transpose(0, 1), is_causal=True,
                                           enable_gqa=k.shape[1] != q.shape[1])
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def varlen_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1)):
    """torch 2.11's varlen_attn signature (the device machine's): window_size, and no enable_gqa."""
    assert key.shape[1] == query.shape[1], "torch 2.11's varlen_attn takes no GQA: k/v must come repeated"
    return _sdpa_per_document(query, key, value, cu_seq_q, window_size)


def varlen_torch_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert enable_gqa or key.shape[1] == query.shape[1]
    return _sdpa_per_document(query, key, value, cu_seq_q, window_size)


def varlen_torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None,
                      scale=None):
    assert is_causal and key.shape[1] == query.shape[1]
    return _sdpa_per_document(query, key, value, cu_seq_q, (-1, 0))


@pytest.mark.parametrize("fn", [varlen_torch_2_10, varlen_torch_2_11, varlen_torch_2_13])
def test_varlen_call_fits_each_torch_signature(fn, monkeypatch):
    """2.10 spells causal is_causal=True, 2.11 window_size=(-1, 0) without GQA (k/v repeated), 2.13 adds enable_gqa."""
    monkeypatch.setattr(attention, "flash_attn_varlen_func", None)
    monkeypatch.setattr(attention, "torch_varlen_attn", fn)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, h, 8, generator=g) for h in (4, 2, 2))  # (N, H|K, D), GQA 2:1
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    ref = _sdpa_per_document(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), cu, (-1, 0))
    torch.testing.assert_close(attention.varlen_causal(q, k, v, cu, 7), ref)
    params = set(inspect.signature(fn).parameters)
    assert ("enable_gqa" in params) == ("enable_gqa" in attention.varlen_kwargs(fn, 4, 2)[0])


@pytest.mark.parametrize("T, masked", [(1, False), (1, True), (7, False), (7, True)])
def test_grouped_query_attention_without_copies_equals_repeated_kv(T, masked):
    """attend's GQA routes (decode queries folded per kv head, enable_gqa, repeat for masked prefill) == repeat."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, T, 16, generator=g)  # (B, H, T, D), 4 query heads per kv head
    k, v = torch.randn(3, 2, 20, 16, generator=g), torch.randn(3, 2, 20, 16, generator=g)
    if masked:
        mask = torch.rand(3, 1, T, 20, generator=g) > 0.3
        mask[..., 0] = True
        attn, ref_mask = attention.AttnMask(causal_only=False, mask=mask), mask
    else:
        k, v = k[:, :, :T], v[:, :, :T]
        attn, ref_mask = attention.AttnMask(causal_only=True), None
    kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    ref = F.scaled_dot_product_attention(q, kr, vr, attn_mask=ref_mask, is_causal=not masked and T > 1)
    torch.testing.assert_close(attention.attend(q, k, v, attn), ref, atol=1e-6, rtol=1e-5)


def test_single_process_group_binds_an_indexed_cuda_device(monkeypatch):
    """init_process_group refuses device_id=cuda without an index (torch 2.11); --device cuda must still work."""
    from minillama.training import fsdp

    seen = {}
    monkeypatch.setattr(fsdp.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(fsdp.dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    fsdp.ensure_process_group(torch.device("cuda"))
    assert seen["device_id"] == torch.device("cuda", 0) and seen["backend"] == "cuda:nccl,cpu:gloo"


# ---- packed rows: varlen kernel == each document alone ----

@pytest.mark.parametrize("device", DEVICES)
def test_packed_rows_through_varlen_equal_each_document_alone(device, monkeypatch):
    """bf16 packed rows (the varlen route, GQA) give each document's own hidden states and gradients."""
    if device == "cpu":  # the route runs on CPU through the stand-in with the device machine's signature
        monkeypatch.setattr(attention, "has_varlen_kernel", lambda dev: True)
        monkeypatch.setattr(attention, "torch_varlen_attn", varlen_torch_2_11)
        lengths = [[5, 12, 7], [24]]
    else:
        lengths = [[700, 1200, 148], [2048]]
    ref32 = make_model(device, "llama", torch.float32).train()
    model = copy.deepcopy(ref32).to(torch.bfloat16)  # the same weights, rounded
    T = sum(lengths[0])
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.args.vocab_size, (2, T), generator=g).to(device)
    doc_ids = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lengths], device=device)
    assert attention.packed_mask(doc_ids, None, True).cu_seqlens is not None, "the varlen route was not taken"
    w = torch.randn(2, T, model.args.dim, generator=g).to(device)  # a fixed random loss direction

    def run(m, packed: bool):
        m.zero_grad(set_to_none=True)
        if packed:
            h = m(tokens, doc_ids=doc_ids, return_hidden=True).float()  # (2, T, D)
        else:
            parts = []
            for b, row in enumerate(lengths):
                s = 0
                for n in row:  # each document alone, from its own position 0
                    parts.append(m(tokens[b:b + 1, s:s + n], return_hidden=True).float()[0])
                    s += n
            h = torch.cat(parts).view(2, T, -1)
        (h * w).sum().backward()
        grads = [p.grad.float().clone() for p in (m.layers[0].attention.wq.weight, m.layers[-1].feed_forward.w2.weight)]
        return h.detach(), grads

    h_pack, g_pack = run(model, True)
    h_sep, g_sep = run(model, False)
    h_ref, g_ref = run(ref32, False)
    assert rel_err(h_pack, h_sep) < BF16_REL
    # packing adds no error of its own: its distance to float32 is that of the documents run alone
    assert rel_err(h_pack, h_ref) < 1.5 * rel_err(h_sep, h_ref) + 1e-3
    for gp, gs, gr in zip(g_pack, g_sep, g_ref):
        assert rel_err(gp, gs) < BF16_REL
        assert rel_err(gp, gr) < 1.5 * rel_err(gs, gr) + 1e-3


# ---- grouped GEMM experts == the per-expert loop ----

def _experts(kind: str, device: str, dtype=torch.bfloat16):
    """A Mixtral MoE layer (real widths on cuda) with plain, LoRA (bf16 factors, as under FSDP2's bf16 compute) or
    NF4 experts."""
    dim, hidden, E = (4096, 14336, 8) if device == "cuda" else (64, 96, 4)
    torch.manual_seed(0)
    with torch.device(device):
        moe = MoEFeedForward(dim, hidden, E, 2).to(dtype)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.5)  # spread the routing over every expert
        for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
            w.normal_(0, 0.02)
    if kind == "lora":
        moe.experts = LoRAExperts(moe.experts, rank=16, alpha=32, lora_dtype=dtype)
        with torch.no_grad():
            for w in ("w1", "w2", "w3"):
                getattr(moe.experts, f"lora_{w}_b").normal_(0, 0.02)  # B starts at 0: make the adapter matter
    elif kind == "nf4":
        e = moe.experts
        moe.experts = QuantizedExperts(*(NF4Weight(w.detach()) for w in (e.w1, e.w2, e.w3)))
    return moe


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["plain", "lora", "nf4"])
def test_grouped_gemm_experts_equal_the_per_expert_loop(device, kind, monkeypatch):
    """bf16 torch._grouped_mm dispatch == one matmul per expert, forward and backward (inputs and trained weights)."""
    moe = _experts(kind, device)
    n = 2048 if device == "cuda" else 40
    x = (torch.randn(n, moe.gate.in_features, device=device) * 0.5).to(torch.bfloat16).requires_grad_(True)
    assert moe.experts.grouped_ok(x), "the grouped route is not taken for bf16 rows here"
    g = torch.randn(n, moe.gate.in_features, device=device).to(torch.bfloat16)

    def run():
        for p in moe.parameters():
            p.grad = None
        x.grad = None
        out = moe(x)
        out.backward(g)
        trained = [p for p in moe.parameters() if p.requires_grad and p.dim() == 3]
        return out.float(), x.grad.float(), [p.grad.float() for p in trained]

    grouped = run()
    monkeypatch.setattr(type(moe.experts), "grouped_ok", lambda self, x: False)
    loop = run()
    assert rel_err(grouped[0], loop[0]) < 1e-2 and rel_err(grouped[1], loop[1]) < 1e-2
    assert len(grouped[2]) == (0 if kind == "nf4" else 3 if kind == "plain" else 6)
    for a, b in zip(grouped[2], loop[2]):
        assert rel_err(a, b) < 1e-2


# ---- continuous batching == each prompt alone ----

@pytest.mark.parametrize("device", DEVICES)
def test_continuous_batching_equals_each_prompt_alone(device):
    """float32 (exact greedy): rows refilled as answers stop at different steps give each prompt's own tokens."""
    model = make_model(device, "llama", torch.float32)
    g = torch.Generator().manual_seed(3)
    lens = [7, 30, 3, 18, 25, 11] if device == "cpu" else [300, 40, 700, 5, 128, 512]
    prompts = [torch.randint(0, model.args.vocab_size, (n,), generator=g).tolist() for n in lens]
    n_new = 12
    alone = [generation.generate(model, [p], n_new)[0] for p in prompts]
    stop = {alone[0][4], alone[3][7]}  # two answers end early, so rows are refilled at different steps
    alone = [generation.generate(model, [p], n_new, stop_ids=stop)[0] for p in prompts]
    assert len(alone[0]) < n_new and len(alone[3]) < n_new
    out = sorted(generation.generate_continuous(model, prompts, n_new, stop_ids=stop,
                                                config=EngineConfig(batch_size=3)))
    assert [toks for _, toks, _ in out] == alone


# ---- train/sft.py under FSDP2: a device step == the CPU float32 step ----

def _sft_module():
    """train/sft.py, imported as tests/test_sft.py does (its main() runs in this process)."""
    import sys

    if str(REPO / "train") not in sys.path:
        sys.path.insert(0, str(REPO / "train"))
    import sft

    return sft


SFT_VARIANTS = {  # name: (checkpoint kind, extra flags)
    "lora": ("dense", []),
    "full": ("dense", ["--lora_rank", "0", "--lr", "1e-4"]),
    "moe-lora": ("moe", ["--lora_targets", "all-linear"]),
    "qlora": ("dense", ["--quantize", "nf4"]),
    "cpu-offload": ("dense", ["--cpu_offload"]),
}


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_sft")
    data = write_jsonl(d / "train.jsonl", qa_samples(24))
    return d, data, {"dense": tiny_checkpoint(d / "dense"), "moe": tiny_checkpoint(d / "moe", moe=True)}


def _sft_params():
    out = []
    for name in SFT_VARIANTS:
        out += [pytest.param("cuda", name, marks=DEVICES[1].marks)]
        if name in ("lora", "full", "qlora"):  # CPU offload needs a GPU; MoE is covered by test_sft on CPU
            out.insert(0, pytest.param("cpu", name))
    return out


@pytest.mark.parametrize("device, variant", _sft_params())
def test_sft_steps_in_bf16_on_device_match_the_cpu_float32_run(device, variant, sft_setup):
    """Two optimizer steps of train/sft.py (FSDP2, one process; nccl on GPU, bf16 compute, packed rows through the
    varlen kernel) give the float32 CPU run's losses and gradient norm within bf16 tolerance."""
    d, data, ckpts = sft_setup
    kind, extra = SFT_VARIANTS[variant]
    base = ["--model", str(ckpts[kind]), "--data", str(data), "--max_steps", "2", "--batch_size", "4",
            "--seq_len", "128", "--pack", "--warmup_steps", "0", "--log_every", "1", *extra]
    sft = _sft_module()
    reference = [f for f in base if f != "--cpu_offload"]  # the reference runs on CPU: nothing to offload
    ref_out = d / ("ref-" + kind + "".join(f for f in extra if f != "--cpu_offload"))
    out = d / f"{variant}-{device}"
    if not (ref_out / "metrics.jsonl").exists():  # one reference serves lora and cpu-offload
        assert sft.main(reference + ["--device", "cpu", "--dtype", "float32", "--out", str(ref_out)]) == 0
    assert sft.main(base + ["--device", device, "--dtype", "bfloat16", "--out", str(out)]) == 0
    ref, got = metrics(ref_out), metrics(out)
    assert [r["step"] for r in got] == [1, 2]
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], rel=5e-3), (got[0], ref[0])
    assert got[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=2e-2), (got[0], ref[0])
    # the first update was the same update: the loss moved by the same amount (~2% of it, 10x the bf16 noise)
    drop, ref_drop = got[0]["loss"] - got[1]["loss"], ref[0]["loss"] - ref[1]["loss"]
    assert ref_drop > 0.01 and drop == pytest.approx(ref_drop, rel=0.15), (drop, ref_drop)


# ---- generate/batch.py on the device == on CPU ----

@pytest.mark.parametrize("device", [DEVICES[1]])
def test_batch_cli_on_device_writes_the_cpu_answers(device, sft_setup, tmp_path):
    """The users' path end to end (load, continuous batching, output file) on the GPU, float32: CPU's greedy text."""
    import json
    import subprocess
    import sys

    d, _, ckpts = sft_setup
    prompts = ["red blue", "a much longer prompt about the moon and the sun", "fish", "tree rock star dog cat"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(prompts)])

    def run(dev: str) -> list[dict]:
        out = tmp_path / f"out-{dev}.jsonl"
        cmd = [sys.executable, str(REPO / "generate" / "batch.py"), "--ckpt", str(ckpts["dense"]), "--input", str(src),
               "--output", str(out), "--batch_size", "2", "--max_new_tokens", "8", "--dtype", "float32",
               "--device", dev]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line) for line in out.read_text().splitlines()]

    got, ref = run(device), run("cpu")
    assert [r["index"] for r in got] == [0, 1, 2, 3]
    assert [(r["output"], r["output_tokens"]) for r in got] == [(r["output"], r["output_tokens"]) for r in ref]


# ---- compiled decode (CUDA graphs) == eager ----

class LogitsTap:
    """Records the logits every decoding step picks its tokens from (the engine's process_logits), greedy."""

    def __init__(self, monkeypatch):
        self.steps = []
        pick = engine_module.process_logits

        def tapped(logits, *args, **kwargs):
            self.steps.append(logits.detach().float().clone())
            return pick(logits, *args, **kwargs)

        monkeypatch.setattr(engine_module, "process_logits", tapped)

    def take(self) -> list[torch.Tensor]:
        steps, self.steps = self.steps, []
        return steps


def assert_same_greedy(tokens, ref_tokens, logits, ref_logits, tol: float):
    """Tokens equal while the rows' prefixes agree; where a row's prefixes still agree, the two paths' logits are
    within tol (relative L2), so any flip of the argmax is a near-tie inside that error."""
    for b, (row, ref) in enumerate(zip(tokens, ref_tokens)):
        d = next((i for i, (t, r) in enumerate(zip(row, ref)) if t != r), len(ref))
        for i in range(min(d + 1, len(ref_logits))):  # step d still has the same prefix as the reference
            err = rel_err(logits[i][b], ref_logits[i][b])
            assert err < tol, f"row {b} step {i}: logits differ by {err:.2e} (relative)"
        if d < len(ref):
            gap = (ref_logits[d][b][ref[d]] - ref_logits[d][b][row[d]]).item()
            scale = (logits[d][b] - ref_logits[d][b]).abs().max().item()
            assert gap <= 2 * scale + 1e-6, f"row {b} step {d}: token flipped with a margin of {gap} > 2 x {scale}"


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("device", [DEVICES[1]])
def test_int4_on_cuda_runs_the_packed_kernel_and_equals_the_portable_weights(device, group_size):
    """Int4Weight on the GPU holds tinygemm's layout (torch._weight_int4pack_mm) and multiplies as the portable
    codes (the quantized checkpoint's layout, dequantized in float32) do, at a Llama-3-8B width."""
    from minillama.weight_only import Int4Weight, int4_quantize
    w = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    t = int4_quantize(w, group_size)
    q = torch.stack([t["packed"] & 15, t["packed"] >> 4], -1).flatten(1).float()  # (out, in), even column low
    scale, zero = t["scales_and_zeros"].float().transpose(0, 1).repeat_interleave(group_size, 1).unbind(-1)
    want_w = (q - 8) * scale + zero  # (out, in) float32
    weight = Int4Weight.from_saved(t["packed"].to(device), t["scales_and_zeros"].to(device), group_size)
    assert weight.kernel == "cuda" and weight.packed.dtype == torch.int32
    for rows in (1, 8, 300):  # decode, a small batch, a prefill
        x = torch.randn(rows, 4096, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        want = x.float() @ want_w.t()
        got = weight.linear(x.to(device)).float().cpu()
        assert ((got - want).norm() / want.norm()).item() < 1e-2, rows
    assert ((weight.dequantize(dtype=torch.float32).cpu() - want_w).abs().max() <= 1e-2 * want_w.abs().max()).item()


@pytest.mark.parametrize("device", DEVICES)
def test_nf4_decode_row_reads_the_codes_and_equals_the_dequantized_matmul(device, monkeypatch):
    """Under no_grad one row through an NF4 weight (decoding) runs the compiled fused matvec on the 4-bit codes
    (inductor's C++ on CPU, Triton on CUDA), never the whole dequantized weight; several rows (a prefill) still give
    the dequantized weight's product. At a Llama-3-8B width, bf16 activations."""
    from minillama import quant
    w = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    weight = quant.NF4Weight(w.to(device=device, dtype=torch.bfloat16))
    want_w = weight.dequantize(dtype=torch.float32).cpu()  # (out, in)
    for rows in (1, 8):
        x = torch.randn(rows, 4096, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        want = x.float() @ want_w.t()
        with torch.no_grad(), monkeypatch.context() as m:
            if rows == 1:
                m.setattr(quant.NF4Weight, "dequantize", lambda *a, **k: pytest.fail("dequantized for one row"))
            got = quant.nf4_linear(x.to(device), weight).float().cpu()
        assert ((got - want).norm() / want.norm()).item() < 1e-2, rows
    assert (device, (1024, 2048)) in quant._compiled["shapes"]


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("device", DEVICES)
def test_quantized_mixtral_experts_equal_their_dequantized_stacks(device, name):
    """One Mixtral MoE layer (its real widths on CUDA: 8 experts of 14336 x 4096) with int8/int4 experts, each
    expert through the device's kernel (int4: tinygemm on CUDA), gives the layer with the dequantized stacks."""
    from minillama.weight_only import quantize_weight, weight_format, weight_from_saved
    dim, hidden = (64, 96) if device == "cpu" else (4096, 14336)
    torch.manual_seed(0)
    layer = MoEFeedForward(dim, hidden, 8, 2).to(device=device, dtype=torch.bfloat16)
    quantized = QuantizedExperts()
    with torch.no_grad():
        for w in ("w1", "w2", "w3"):
            stack = getattr(layer.experts, w)  # (E, out, in)
            fmt = weight_format(name, f"layers.0.feed_forward.experts.{w}", tuple(stack.shape))
            setattr(quantized, w, weight_from_saved(fmt, quantize_weight(fmt, stack)))
            stack.copy_(getattr(quantized, w).dequantize(dtype=torch.bfloat16))  # the float layer: the same weights
        x = torch.randn(64, dim, device=device, dtype=torch.bfloat16)
        want = layer(x).float()
        layer.experts = quantized
        got = layer(x).float()
    if name == "int4" and device == "cuda":
        assert quantized.w1.matrices[0].kernel == "cuda"
    assert rel_err(got, want) < 2e-2


# every case on the GPU; on CPU (compiles are slow there) one dense and one MoE case cover both graphs (one row,
# several rows) and the test's logic
COMPILED_CASES = [pytest.param("cuda", f, b, marks=DEVICES[1].marks) for f in ("llama", "mixtral") for b in (1, 8)]
COMPILED_CASES[:0] = [pytest.param("cpu", "llama", 8), pytest.param("cpu", "mixtral", 1)]


@pytest.mark.parametrize("device, family, batch", COMPILED_CASES)
def test_compiled_decode_greedy_tokens_equal_eager(device, family, batch, monkeypatch):
    """compile=True (torch.compile reduce-overhead: CUDA graphs on GPU) decodes the eager tokens in bf16.

    One layer on the GPU (each compile costs GPU time; the cache chaining through layers is checked on CPU)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    monkeypatch.setattr(decode_step_module, "_compiled_decode_step", None)  # a fresh compile, counted below
    model = make_model(device, family, torch.bfloat16, n_layers=1)
    g = torch.Generator().manual_seed(batch)
    lens = torch.randint(5, 40 if device == "cpu" else 600, (batch,), generator=g).tolist()
    prompts = [torch.randint(0, model.args.vocab_size, (n,), generator=g).tolist() for n in lens]
    n_new = 10 if device == "cpu" else 16
    tap = LogitsTap(monkeypatch)
    eager = generation.generate(model, prompts, n_new)
    eager_logits = tap.take()
    counters.clear()
    compiled = generation.generate(model, prompts, n_new, config=EngineConfig(compile=True))
    compiled_logits = tap.take()
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    if device == "cuda":
        assert counters["inductor"]["cudagraph_skips"] == 0, "the decode step did not run as a CUDA graph"
    assert_same_greedy(compiled, eager, compiled_logits, eager_logits, BF16_DECODE_REL)
    if batch > 1 and family == "llama":  # continuous batching: per-row slots (another graph), rows refilled
        ps = prompts + prompts[:3]
        ref = sorted(generation.generate_continuous(model, ps, n_new, config=EngineConfig(batch_size=batch)))
        out = sorted(generation.generate_continuous(model, ps, n_new,
                                                        config=EngineConfig(batch_size=batch, compile=True)))
        assert [i for i, _, _ in out] == list(range(len(ps)))
        # a divergence must be a near-tie: in the eager logits after the common prefix (a full forward), the two
        # tokens lie within twice the largest logit difference measured between the compiled and eager steps
        spread = max((c - e).abs().max().item() for c, e in zip(compiled_logits, eager_logits))
        for (i, toks, _), (_, ref_toks, _) in zip(out, ref):
            d = next((j for j, (t, r) in enumerate(zip(toks, ref_toks)) if t != r), None)
            if d is not None:
                with torch.no_grad():
                    seq = torch.tensor([ps[i] + ref_toks[:d]], device=device)
                    last = model(seq)[0, -1]
                gap = (last[ref_toks[d]] - last[toks[d]]).item()
                assert gap <= 2 * spread + 1e-6, f"prompt {i}: step {d} flipped by {gap} > 2 x {spread}"
