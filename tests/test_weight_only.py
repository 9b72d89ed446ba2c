"""Weight-only int8 / int4 inference (minillama/weight_only.py).

Bounds: on Gaussian weights the relative RMS weight error is <= 0.009 for int8 (measured 0.0075: per-row absmax over
512 weights / 127 / sqrt(12)), <= 0.09 for int4 G=32 (0.078) and <= 0.11 for G=128 (0.100). On the tiny random model
(weights N(0, 0.05)) logits move by <= 0.03 relative L2 for int8 (measured 0.015-0.017, fp32 and bf16) and <= 0.3
for int4 (0.16-0.19); a random net amplifies weight error, so the embedded model's greedy agreement is checked too.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import random_tokens, randomize_adapter, tiny_model
from minillama.checkpoints import load_model, save_hf
from minillama.lora.layers import apply_lora
from minillama.lora.merge import merge_lora
from minillama import weight_only
from minillama.weight_only import (Int4Weight, Int8Weight, QuantLinear, int4_quantize, load_weight_only_,
                                    quantize_model_)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("make,bound", [(Int8Weight, 0.009), (lambda w: Int4Weight(w, 32), 0.09),
                                        (lambda w: Int4Weight(w, 128), 0.11)])
def test_weight_error_is_the_formats(make, bound):
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    assert rel(make(w).dequantize(dtype=torch.float32), w) <= bound


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_bfloat16_codes_are_rounded_against_the_stored_scales(kind):
    """Every weight is within half a step (plus bfloat16's own rounding of the weight) of its code times the scale
    as stored. Coding against the float32 scale and then storing it in bfloat16 broke this by up to a quarter step
    (127 steps x 0.2 %): each row's weights were scaled by its scale's rounding."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    q = Int8Weight(w) if kind == "int8" else Int4Weight(w, 32)
    if kind == "int8":
        step = q.scale.float()[:, None]  # (out, 1)
    else:
        step = q.scales_and_zeros[..., 0].float().t().repeat_interleave(32, 1)  # (out, in)
    err = (q.dequantize(dtype=torch.float32) - w.float()).abs()
    assert (err <= 0.5 * step * (1 + 1e-3) + 2 ** -9 * w.float().abs()).all()


@pytest.mark.parametrize("out", [96, 40])  # 40 rows: the int4 CPU kernel needs a multiple of 16, so the plain path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_packed_kernel_equals_matmul_with_the_dequantized_weight(kind, dtype, out):
    w = torch.randn(out, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    q = Int8Weight(w) if kind == "int8" else Int4Weight(w, 32)
    if kind == "int4":
        assert q.kernel == ("cpu" if out % 16 == 0 else "plain")
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(2)).to(dtype)
    want = x.float() @ q.dequantize(dtype=torch.float32).t()  # (2, 5, out)
    got = q.linear(x)
    assert got.shape == (2, 5, out) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - want).abs().max().item() <= tol * want.abs().max().item()


def plain_dequantize(t: dict, group_size: int) -> torch.Tensor:
    """int4_quantize's portable tensors (the quantized checkpoint's layout) -> the float weight (out, in)."""
    q = torch.stack([t["packed"] & 15, t["packed"] >> 4], -1).flatten(1).float()  # even column: the low nibble
    scale, zero = t["scales_and_zeros"].float().transpose(0, 1).repeat_interleave(group_size, 1).unbind(-1)
    return (q - 8) * scale + zero


def test_int4_cuda_layout_follows_the_kernels_documented_packing(monkeypatch):
    """The CUDA route on stand-ins of torch's two CUDA ops written from their documented semantics (the uint8 input
    holds column 2j in the high nibble, as gpt-fast packs; w = (q - 8) * scale + zero): the codes we hand over, the
    matmul and the weight read back through the kernel equal the portable layout's. (tests/test_gpu_paths.py runs
    the real kernel.)"""
    def convert(packed_u8, inner_k_tiles):  # -> the codes (out, in), standing in for the opaque int32 tiles
        assert packed_u8.dtype == torch.uint8 and inner_k_tiles == 8  # rows of 256: 8 tiles of 16 columns fit
        return torch.stack([packed_u8 >> 4, packed_u8 & 15], -1).flatten(1).to(torch.int32)

    def mm(x, codes, group_size, scales_and_zeros):
        scale, zero = scales_and_zeros.float().transpose(0, 1).repeat_interleave(group_size, 1).unbind(-1)
        return (x.float() @ ((codes.float() - 8) * scale + zero).t()).to(x.dtype)

    monkeypatch.setattr(torch, "_convert_weight_to_int4pack", convert, raising=False)
    monkeypatch.setattr(torch, "_weight_int4pack_mm", mm, raising=False)
    monkeypatch.setattr(weight_only, "int4_kernel", lambda device, out, n_in, group: "cuda")
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    want = plain_dequantize(int4_quantize(w, 32), 32)  # (40, 256)
    q = Int4Weight(w, 32)
    assert q.kernel == "cuda"
    torch.testing.assert_close(q.dequantize(dtype=torch.float32), want, atol=0, rtol=1e-2)  # read back in bf16
    monkeypatch.setattr(Int4Weight, "_kernel_takes", lambda self, x: True)  # as a bf16 activation on the GPU
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    torch.testing.assert_close(q.linear(x).float(), (x.float() @ want.t()).to(torch.bfloat16).float())
    assert weight_only.inner_k_tiles(256) == 8 and weight_only.inner_k_tiles(96) == 2


@pytest.mark.parametrize("ours", [True, False])  # minillama's CPU kernel built here / not
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_prefill_rows_take_the_dequantized_float32_product(dtype, ours, monkeypatch):
    """From DEQUANT_ROWS rows the dequantized float32 product; below, a decode step's 1-16 rows go through
    minillama's kernel where it is built (else torch's packed kernel), the same product to rounding."""
    import minillama.weight_only as wo
    if ours and not wo.cpu_kernels.available():
        pytest.skip("minillama's CPU kernel cannot be built here")
    monkeypatch.setattr(wo.cpu_kernels, "available", lambda: ours)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    q = Int8Weight(w)
    x = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(4)).to(dtype)  # 12 rows
    calls = []
    kernel, small = torch.ops.aten._weight_int8pack_mm, wo.cpu_kernels.small_linear
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append("packed") or kernel(*a))
    monkeypatch.setattr(wo.cpu_kernels, "small_linear", lambda *a: calls.append("ours") or small(*a))
    monkeypatch.setattr(wo, "DEQUANT_ROWS", 12)
    with torch.no_grad():
        got = q.linear(x)
    assert not calls  # the float32 product of the dequantized weight, not a kernel
    assert got.dtype == dtype
    assert torch.equal(got, F.linear(x.float(), q.dequantize(dtype=torch.float32)).to(dtype))
    monkeypatch.setattr(wo, "DEQUANT_ROWS", 13)
    with torch.no_grad():
        kept = q.linear(x)
    assert calls == ["ours" if ours else "packed"]  # 12 rows < 13: a decode step's kernel
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (kept.float() - got.float()).abs().max().item() <= tol * got.float().abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,bound", [("int8", 0.03), ("int4", 0.3), ("int4-g64", 0.3)])
def test_tiny_model_logits_within_bounds(name, bound, dtype, one_thread):
    model = tiny_model(std=0.05).to(dtype)
    x = random_tokens(256)
    with torch.no_grad():
        ref = model(x)
        quantize_model_(model, name)
        got = model(x)
    assert isinstance(model.layers[0].attention.wq, QuantLinear) and isinstance(model.output, QuantLinear)
    assert model.tok_embeddings.weight.dtype == dtype  # the embedding lookup stays in float
    assert rel(got, ref) <= bound
    if name == "int8":
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


def test_quantize_on_load_equals_quantizing_the_loaded_model(tmp_path, one_thread):
    model = tiny_model(std=0.05)
    save_hf(model, tmp_path / "m")
    x = random_tokens(256)
    for name in ("int8", "int4"):
        loaded = load_model(tmp_path / "m", quantize=name)
        built = quantize_model_(load_model(tmp_path / "m"), name)
        with torch.no_grad():
            assert torch.equal(loaded(x), built(x))
        assert not any(p.is_meta for p in loaded.parameters())
    meta = copy.deepcopy(model)
    assert not load_weight_only_(meta, "tok_embeddings.weight", model.tok_embeddings.weight, "int8")
    assert not load_weight_only_(meta, "layers.0.ffn_norm.weight", model.layers[0].ffn_norm.weight, "int8")


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_lora_on_quantized_base_equals_lora_on_the_dequantized_weights(name, one_thread):
    torch.manual_seed(0)
    q = quantize_model_(tiny_model(std=0.05), name)
    deq = tiny_model(std=0.05)
    with torch.no_grad():  # the float twin holds exactly the weights the quantized one computes with
        for path, m in q.named_modules():
            if isinstance(m, QuantLinear):
                deq.get_submodule(path).weight.copy_(m.weight.dequantize(dtype=torch.float32))
    for m in (q, deq):
        apply_lora(m, rank=4, alpha=8, targets="all-linear")
        randomize_adapter(m, seed=3, std=0.1)
    x = random_tokens(256)
    with torch.no_grad():
        got, want = q(x), deq(x)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    assert isinstance(q.layers[0].attention.wq.weight, (Int8Weight, Int4Weight))  # unmerged, on the quantized base
    with pytest.raises(ValueError, match="quantized base; merging would re-quantize"):
        merge_lora(q)


def test_embedded_model_greedy_agrees_with_bf16(smollm2_dir, one_thread):
    """int8 and int4 pick the same 12 greedy tokens as bf16 for a short prompt on SmolLM2-135M-Instruct. (Its
    weights came from a Q4_1 file, so they lie on a 32-group 4-bit grid that int4 G=32 meets exactly: judge int4's
    error on the int4-g128 row and in the README (Deploy section).)"""
    from minillama.inference.generate import generate
    from minillama.tokenizer.tokenizer import load_tokenizer
    tok = load_tokenizer(smollm2_dir)
    prompt = tok.encode_dialog([{"role": "user", "content": "What is the capital of France?"}])
    runs = {}
    for name in (None, "int8", "int4", "int4-g128"):
        model = load_model(smollm2_dir, dtype=torch.bfloat16, quantize=name)
        runs[name] = generate(model, [prompt], 12, stop_ids=tok.stop_ids)[0]
    assert runs["int8"] == runs[None] and runs["int4"] == runs[None]
    assert runs["int4-g128"][:4] == runs[None][:4]


def test_quantize_flag_accepts_the_formats():
    import argparse

    from minillama.tools.flags import add_model_args
    p = argparse.ArgumentParser()
    add_model_args(p)
    for name in ("int8", "int4", "int4-g64", "int4-g128", "nf4"):
        assert p.parse_args(["--quantize", name]).quantize == name
    with pytest.raises(ValueError, match="expected None, 'nf4' or one of int8, int4"):
        load_model("/nonexistent", quantize="int3")


def test_f_linear_fallback_used_off_cpu_kernels():
    """A dtype the CPU kernels do not take (float64) goes through the dequantized matmul."""
    w = torch.randn(32, 64, dtype=torch.float64)
    for q in (Int8Weight(w), Int4Weight(w, 32)):
        x = torch.randn(3, 64, dtype=torch.float64)
        assert torch.allclose(q.linear(x), F.linear(x, q.dequantize(dtype=torch.float64)))


def _float_twin(q, **overrides):
    """A float tiny model holding exactly the weights the quantized model q computes with (its layer linears, head
    and expert stacks dequantized)."""
    from minillama.weight_only import QuantizedStack
    twin = tiny_model(std=0.05, **overrides)
    with torch.no_grad():
        for path, m in q.named_modules():
            if isinstance(m, QuantLinear):
                twin.get_submodule(path).weight.copy_(m.weight.dequantize(dtype=torch.float32))
            elif isinstance(m, QuantizedStack):
                twin.get_parameter(path).copy_(m.dequantize(dtype=torch.float32))
    return twin


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_mixtral_experts_are_quantized_and_compute_with_their_dequantized_weights(name, one_thread):
    """Every expert stack becomes a QuantizedExperts of per-expert int8/int4 matrices (the router stays float); the
    logits equal a float model holding the dequantized weights, and the weight error is the format's."""
    from helpers import MOE_ARGS
    from minillama.moe import QuantizedExperts
    from minillama.weight_only import QuantizedStack
    model = tiny_model(std=0.05, **MOE_ARGS)
    stack = model.layers[0].feed_forward.experts.w2.detach().clone()  # (E, D, F)
    q = quantize_model_(model, name)
    experts = q.layers[0].feed_forward.experts
    assert isinstance(experts, QuantizedExperts) and isinstance(experts.w1, QuantizedStack)
    assert isinstance(experts.w2.matrices[0], Int8Weight if name == "int8" else Int4Weight)
    assert isinstance(q.layers[0].feed_forward.gate, torch.nn.Linear)  # the router stays float
    assert rel(experts.w2.dequantize(dtype=torch.float32), stack) <= (0.009 if name == "int8" else 0.09)
    assert experts.w2.dequantize(dtype=torch.float32).shape == stack.shape
    twin = _float_twin(q, **MOE_ARGS)
    x = random_tokens(256)
    with torch.no_grad():
        got, want = q(x), twin(x)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_lora_on_quantized_experts_equals_lora_on_the_dequantized_experts(name, one_thread):
    from helpers import MOE_ARGS
    from minillama.lora.experts import LoRAExperts
    q = quantize_model_(tiny_model(std=0.05, **MOE_ARGS), name)
    twin = _float_twin(q, **MOE_ARGS)
    for m in (q, twin):
        apply_lora(m, rank=4, alpha=8, targets=["q_proj", "experts"])
        randomize_adapter(m, seed=3, std=0.1)
    lora = q.layers[0].feed_forward.experts
    assert isinstance(lora, LoRAExperts) and not lora.grouped_ok(torch.zeros(1, 64))  # no grouped int8/int4 GEMM
    x = random_tokens(256)
    with torch.no_grad():
        got, want = q(x), twin(x)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    with pytest.raises(ValueError, match="quantized base; merging would re-quantize"):
        merge_lora(q)


def test_mixtral_quantize_on_load_equals_quantizing_the_loaded_model(tmp_path, one_thread):
    """A Mixtral HF checkpoint stores one tensor per expert: the loader stacks them, then quantizes the stack."""
    from helpers import MOE_ARGS
    from minillama.moe import QuantizedExperts
    save_hf(tiny_model(std=0.05, **MOE_ARGS, family="mixtral"), tmp_path / "m")
    x = random_tokens(256)
    for name in ("int8", "int4"):
        loaded = load_model(tmp_path / "m", quantize=name)
        built = quantize_model_(load_model(tmp_path / "m"), name)
        assert isinstance(loaded.layers[1].feed_forward.experts, QuantizedExperts)
        with torch.no_grad():
            assert torch.equal(loaded(x), built(x))
        assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])


def test_compiled_moe_layer_with_quantized_experts_does_not_recompile_per_routing(one_thread):
    """Quantized experts take dispatch's per-expert loop, whose slices follow each expert's token count: under
    torch.compile the loop runs between two graphs, so new routings add no graph (it recompiled for every new set of
    counts: 19 graphs instead of 11 for 10 compiled decode steps of the tiny Mixtral), and the output is eager's."""
    from torch._dynamo.utils import counters
    from helpers import MOE_ARGS
    layer = quantize_model_(tiny_model(std=0.05, **MOE_ARGS), "int8").layers[0].feed_forward
    compiled = torch.compile(layer)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        for seed in range(4):  # different tokens: different experts and counts
            x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
            if seed == 0:
                first = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == first
