"""NF4: round-trip error within the format's bound, ~0.5 bytes/weight, grads reach only LoRA, meta-device loading."""

import copy

import pytest
import torch
import torch.nn.functional as F

from minillama import Transformer
from minillama.lora.layers import apply_lora, lora_parameters
from minillama.moe import QuantizedExperts
from minillama.quant import (BLOCK, NF4_CODE, NF4Linear, NF4Weight, load_quantized_, nf4_linear,
                             quantize_model_nf4)
from test_lora import MOE, randomize_lora, tiny_model, tokens

HALF_GAP = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:])) / 2


@pytest.mark.parametrize("shape", [(96, 320), (3, 10, 13), (700, 64)])
def test_round_trip_error_per_block_within_the_format_bound(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 3  # rows of different scales
    q = NF4Weight(w)
    back = q.dequantize()
    assert back.shape == w.shape and back.dtype == w.dtype
    n = shape[-2] * shape[-1]
    pad = (-n) % BLOCK
    blocks = F.pad(w.reshape(-1, n), (0, pad)).view(w.reshape(-1, n).shape[0], -1, BLOCK)  # (S, nb, 64)
    err = F.pad((back - w).reshape(-1, n), (0, pad)).view_as(blocks).abs().amax(-1)
    absmax = blocks.abs().amax(-1)
    scale_err = (q.absmax() - absmax).abs()
    assert torch.all(err <= HALF_GAP * absmax + scale_err + 1e-6)
    assert scale_err.max() <= 0.01 * absmax.max()  # int8 double quantization of the scales is fine-grained
    assert q.absmax_q.dtype == torch.int8
    assert torch.equal(q.to(torch.bfloat16).dequantize(), back)  # .to(dtype) leaves the 4-bit data and scales alone
    if len(shape) == 3:  # one matrix of a stack dequantizes alone
        assert torch.equal(q.dequantize(1), back[1])


def test_storage_is_about_half_a_byte_per_weight():
    lin = NF4Linear(torch.randn(256, 1024))
    n = 256 * 1024
    nbytes = lin.weight.nbytes()
    assert lin.weight.packed.dtype == torch.uint8 and lin.weight.packed.nbytes == n // 2
    # 4 bits + one int8 scale per 64 weights + one float32 per 256 scales + the float32 mean: ~0.516 bytes/weight
    assert nbytes <= n * (0.5 + 1 / BLOCK + 4 / (BLOCK * 256)) + 4, nbytes


def test_grad_reaches_input_not_weight():
    torch.manual_seed(0)
    lin = NF4Linear(torch.randn(24, 40))
    x = torch.randn(5, 40, requires_grad=True)
    lin(x).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, lin.weight.dequantize()).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert not any(p.requires_grad for p in lin.parameters())


@pytest.mark.parametrize("moe", [False, True])
def test_qlora_logits_close_and_grads_only_on_lora(moe):
    model = tiny_model(**(MOE if moe else {}))
    x = tokens()
    with torch.no_grad():
        for name, p in model.named_parameters():  # std 0.05: a well-conditioned net (0.2 amplifies any error)
            if p.dim() > 1 and "tok_embeddings" not in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        ref = model(x)
        q = quantize_model_nf4(copy.deepcopy(model))
        out = q(x)
    assert isinstance(q.layers[0].attention.wq, NF4Linear)
    assert not isinstance(q.output, NF4Linear) and isinstance(q.tok_embeddings.weight, torch.nn.Parameter)
    if moe:
        experts = q.layers[0].feed_forward.experts
        assert isinstance(experts, QuantizedExperts)
        assert all(isinstance(getattr(experts, w), NF4Weight) for w in ("w1", "w2", "w3"))
        assert isinstance(q.layers[0].feed_forward.gate.weight, torch.nn.Parameter)  # router stays float
    # measured: per-weight relative RMS error 0.092 (Gaussian weights), logits relative error ~0.09 (dense) and
    # ~0.11 (MoE, where a few tokens switch experts), greedy argmax agreeing on 88-100% of positions
    w = q.layers[0].attention.wo.weight
    assert ((w.dequantize() - model.layers[0].attention.wo.weight).norm() / w.dequantize().norm()) < 0.11
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.2, rel
    apply_lora(q, rank=4, alpha=8, targets="all-linear")
    randomize_lora(q)
    F.cross_entropy(q(x).flatten(0, 1), x.flatten()).backward()
    lora = set(map(id, lora_parameters(q)))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(q))
    assert all(p.grad is None for p in q.parameters() if id(p) not in lora)


def test_load_quantized_on_meta_model_equals_quantizing_a_built_one():
    model = tiny_model(**MOE)
    with torch.device("meta"):
        meta = Transformer(model.args)
    for key, t in model.state_dict().items():
        if not load_quantized_(meta, key, t.clone()):
            parent, _, name = key.rpartition(".")
            setattr(meta.get_submodule(parent), name, torch.nn.Parameter(t.clone(), requires_grad=False))
    meta.reset_rope("cpu")
    assert not load_quantized_(meta, "output.weight", model.output.weight)
    assert not load_quantized_(meta, "layers.0.feed_forward.gate.weight", model.layers[0].feed_forward.gate.weight)
    built = quantize_model_nf4(copy.deepcopy(model))
    x = tokens()
    with torch.no_grad():
        assert torch.equal(meta(x), built(x))


def test_checkpoint_loader_quantizes_as_tensors_arrive(tmp_path):
    from minillama.checkpoints import load_model, save_hf
    model = tiny_model().to(torch.bfloat16)
    save_hf(model, tmp_path / "m")
    q = load_model(tmp_path / "m", dtype=None, quantize="nf4")
    w2 = q.layers[1].feed_forward.w2
    assert isinstance(w2, NF4Linear) and w2.weight.dtype == torch.bfloat16
    plain = load_model(tmp_path / "m", dtype=None)
    with torch.no_grad():
        assert torch.equal(q(tokens()), quantize_model_nf4(plain)(tokens()))


# ---- inference on CPU without the whole float weight (quant.nf4_inference_linear) ----

def _old_path(x, w, index=None):
    """What every NF4 matmul did before: the whole weight dequantized, then F.linear."""
    return F.linear(x, w.dequantize(index, x.dtype))


def _close(got, want, rel):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got.float() - want.float()).norm() <= rel * want.float().norm()


@pytest.fixture
def blockwise_only(monkeypatch):
    """No compiled kernel, and row blocks of at most 200 weights (several blocks, block edges inside rows), with
    NF4Weight.dequantize forbidden: the path must never form the whole float weight."""
    from minillama import quant
    monkeypatch.setattr(quant, "_compiled", {"fn": None, "shapes": set(), "failed": True})
    monkeypatch.setattr(quant, "ROW_BLOCK", 200)
    sizes = []
    rows = quant._dequantize_rows

    def spy(codes, absmax, span, n_in, dtype):
        sizes.append((span[1] - span[0]) * n_in)
        return rows(codes, absmax, span, n_in, dtype)
    monkeypatch.setattr(quant, "_dequantize_rows", spy)
    return sizes


@pytest.mark.parametrize("shape", [(96, 128), (40, 24), (7, 100), (33, 64), (3, 19, 70)])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)])
def test_nf4_blockwise_inference_equals_the_full_dequantize(shape, lead, blockwise_only, monkeypatch):
    torch.manual_seed(0)
    w = NF4Weight(torch.randn(shape))
    index = 1 if len(shape) == 3 else None
    x = torch.randn(*lead, shape[-1])
    want = _old_path(x, w, index)
    monkeypatch.setattr(NF4Weight, "dequantize", lambda *a, **k: pytest.fail("the whole weight was dequantized"))
    with torch.no_grad():
        got = nf4_linear(x, w, index)
    _close(got, want, 1e-5)
    assert blockwise_only and max(blockwise_only) <= max(200, shape[-1])  # ROW_BLOCK weights, or one row


def test_nf4_fused_decode_matvec_equals_the_full_dequantize(one_thread):
    """One row (decode) through the torch.compile'd dequantize + matvec kernel, where this machine can compile it
    (else the blockwise path, after one warning): fp32 within 1e-5 relative, bf16 within bf16's rounding."""
    from minillama import quant
    torch.manual_seed(0)
    w = NF4Weight(torch.randn(48, 192) * 0.1)
    for dtype, rel in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = torch.randn(1, 1, 192).to(dtype)
        with torch.no_grad():
            got = nf4_linear(x, w)
        _close(got, _old_path(x, w), rel)
    assert ("cpu", (48, 96)) in quant._compiled["shapes"] or quant._compiled["failed"]


def test_nf4_compile_failure_falls_back_to_the_blockwise_path(monkeypatch):
    from minillama import quant
    monkeypatch.setattr(quant, "_compiled", {"fn": None, "shapes": set(), "failed": False})

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    w = NF4Weight(torch.randn(32, 64))
    x = torch.randn(1, 64)
    with torch.no_grad(), pytest.warns(UserWarning, match="torch.compile of the decode matvec failed"):
        got = nf4_linear(x, w)
    _close(got, _old_path(x, w), 1e-5)
    assert quant._compiled["failed"]


def test_nf4_with_autograd_on_keeps_the_exact_training_path():
    """QLoRA's forward (autograd on) is the full dequantize + F.linear, bit for bit, and its backward still runs."""
    torch.manual_seed(0)
    w = NF4Weight(torch.randn(40, 64))
    x = torch.randn(3, 64, requires_grad=True)
    y = nf4_linear(x, w)
    assert torch.equal(y, _old_path(x.detach(), w))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 40) @ w.dequantize())
