"""LoRA layers: a fresh adapter changes nothing, only LoRA factors train, bad input fails clearly."""

import copy

import pytest
import torch
import torch.nn.functional as F

from minillama.lora.layers import LoRALinear, apply_lora, lora_parameters, lora_state_dict, set_lora_enabled
from minillama.lora.experts import LoRAExperts
from minillama.lora.merge import merge_lora, unmerge_lora
from minillama.quant import quantize_model_nf4
from helpers import TINY_ARGS, tiny_model as _tiny_model

MOE = dict(n_experts=4, n_experts_per_tok=2, family="mixtral")


def tiny_model(seed=0, **overrides):
    return _tiny_model(seed, **{"family": "llama3", **overrides})


@torch.no_grad()
def randomize_lora(model, seed=1, std=0.2):
    """Non-zero B (and new A) so the adapter really changes the function."""
    g = torch.Generator().manual_seed(seed)
    for p in lora_parameters(model):
        p.copy_(torch.randn(p.shape, generator=g) * std)


def tokens(seed=0, shape=(2, 12)):
    return torch.randint(0, TINY_ARGS["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("moe", [False, True])
def test_fresh_adapter_changes_nothing_and_keeps_base_keys(moe):
    model = tiny_model(**(MOE if moe else {}))
    x = tokens()
    with torch.no_grad():
        before = model(x)
    keys = set(model.state_dict())
    apply_lora(model, rank=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B = 0
    new_keys = set(model.state_dict())
    assert keys <= new_keys and all(k.rpartition(".")[2].startswith("lora_") for k in new_keys - keys)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rpartition(".")[2].startswith("lora_") for n in trainable)
    assert set(lora_state_dict(model)) == trainable
    if moe:
        assert isinstance(model.layers[0].feed_forward.experts, LoRAExperts)
        assert isinstance(model.layers[0].feed_forward.gate, LoRALinear)
    assert not isinstance(model.output, LoRALinear)  # all-linear leaves the output head alone


def test_targets_scaling_and_lora_parameter_shapes():
    model = apply_lora(tiny_model(), rank=4, alpha=8, targets=("q_proj", "lm_head", "down_proj"), use_rslora=True)
    wq = model.layers[0].attention.wq
    assert isinstance(wq, LoRALinear) and isinstance(model.output, LoRALinear)
    assert isinstance(model.layers[1].feed_forward.w2, LoRALinear)
    assert not isinstance(model.layers[0].attention.wk, LoRALinear)
    assert wq.lora_a.shape == (4, 64) and wq.lora_b.shape == (64, 4)
    assert wq.scaling == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    assert apply_lora(tiny_model(), 4, 8, targets=["v_proj"]).layers[0].attention.wv.scaling == 2.0
    assert torch.count_nonzero(wq.lora_a) > 0 and torch.count_nonzero(wq.lora_b) == 0


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="rank must be a positive"):
        apply_lora(tiny_model(), rank=0, alpha=8)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        apply_lora(tiny_model(), rank=4, alpha=0)
    with pytest.raises(ValueError, match=r"unknown LoRA targets \['qproj'\]; valid targets: q_proj"):
        apply_lora(tiny_model(), rank=4, alpha=8, targets=("qproj",))
    with pytest.raises(ValueError, match="found no module for .*experts"):
        apply_lora(tiny_model(), rank=4, alpha=8, targets=("experts",))
    with pytest.raises(ValueError, match="found no module for .*w1"):
        apply_lora(tiny_model(**MOE), rank=4, alpha=8, targets=("gate_proj",))
    wq = apply_lora(tiny_model(), 4, 8).layers[0].attention.wq
    with pytest.raises(ValueError, match=r"layers.0.attention.wq: adapter lora_A \(4, 32\)"):
        wq.set_factors(torch.zeros(4, 32), torch.zeros(64, 4), 1.0, name="layers.0.attention.wq")


def test_disable_gives_base_outputs_and_dropout_only_touches_the_lora_path():
    base = tiny_model()
    x = tokens()
    with torch.no_grad():
        ref = base(x)
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, dropout=0.5, targets="all-linear")
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # B = 0: dropout on the LoRA path cannot show
        randomize_lora(model)
        assert not torch.allclose(model(x), ref)
        set_lora_enabled(model, False)
        assert torch.equal(model(x), ref)
        set_lora_enabled(model, True)
        a, b = model(x), model(x)
        assert not torch.equal(a, b)  # dropout active in train mode
        model.eval()
        assert torch.equal(model(x), model(x))


def _train(model, steps=8, lr=2e-2):
    """AdamW on a fixed batch; returns (first loss, last loss)."""
    x = tokens(3, (2, 16))
    opt = torch.optim.AdamW(lora_parameters(model), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


@pytest.mark.parametrize("base", ["fp32", "bf16", "nf4", "moe"])
def test_adamw_steps_reduce_loss_changing_only_lora(base):
    model = tiny_model(**(MOE if base == "moe" else {}))
    if base == "bf16":
        model.to(torch.bfloat16)
    if base == "nf4":
        quantize_model_nf4(model)
    apply_lora(model, rank=4, alpha=8, targets="all-linear")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.rpartition(".")[2].startswith("lora_")}
    first, last = _train(model)
    assert last < first - 0.1, (first, last)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # base bit-for-bit
    assert all(p.grad is None for n, p in model.named_parameters() if not n.rpartition(".")[2].startswith("lora_"))


@pytest.mark.parametrize("moe", [False, True])
def test_merge_equals_adapter_and_unmerge_restores_base_exactly(moe):
    model = apply_lora(tiny_model(**(MOE if moe else {})), rank=4, alpha=8, targets="all-linear")
    randomize_lora(model, std=0.05)  # a LoRA-sized delta (~5% of |w|): unmerge keeps only the few unrecoverable entries
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x = tokens()
    with torch.no_grad():
        adapted = model(x)
        merge_lora(model)
        idx, _ = model.layers[0].attention.wq._fix
        assert idx is not None and 0 < idx.numel() < 0.1 * model.layers[0].attention.wq.weight.numel()
        torch.testing.assert_close(model(x), adapted, atol=1e-4, rtol=1e-4)
        unmerge_lora(model)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
        assert torch.equal(model(x), adapted)


@pytest.mark.parametrize("base", ["float", "nf4"])
def test_lora_and_nf4_experts_grouped_gemm_equals_the_per_expert_loop(base, monkeypatch):
    """LoRAExperts / QuantizedExperts meet moe.ExpertStack: grouped GEMMs give the loop's outputs and gradients."""
    from minillama.moe import MoEFeedForward
    from minillama.moe import QuantizedExperts

    model = tiny_model(**MOE)
    if base == "nf4":
        quantize_model_nf4(model)
    apply_lora(model, rank=4, alpha=8, targets=("experts",))
    randomize_lora(model)
    moe = next(m for m in model.modules() if isinstance(m, MoEFeedForward))
    assert isinstance(moe.experts, LoRAExperts) and (base == "float" or not isinstance(moe.experts.w1, torch.Tensor))
    x = torch.randn(30, 64, generator=torch.Generator().manual_seed(3))

    def run():
        xi = x.clone().requires_grad_(True)
        y = moe(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
        moe.zero_grad(set_to_none=True)
        return y.detach(), xi.grad, grads

    assert moe.experts.grouped_ok(x)
    grouped = run()
    monkeypatch.setattr(LoRAExperts, "grouped_ok", lambda self, x: False)
    looped = run()
    torch.testing.assert_close(grouped[0], looped[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped[1], looped[1], atol=1e-5, rtol=1e-5)
    assert grouped[2].keys() == looped[2].keys() and any("lora" in k for k in grouped[2])
    for k in grouped[2]:
        torch.testing.assert_close(grouped[2][k], looped[2][k], atol=1e-5, rtol=1e-5, msg=k)
    if base == "nf4":  # the bare NF4 stack too
        experts = QuantizedExperts(moe.experts.w1, moe.experts.w2, moe.experts.w3)
        w, idx = torch.rand(30, 2), torch.randint(0, 4, (30, 2))
        out = experts(x, w, idx)
        monkeypatch.setattr(QuantizedExperts, "grouped_ok", lambda self, x: False)
        torch.testing.assert_close(experts(x, w, idx), out, atol=1e-5, rtol=1e-5)


def test_grouped_gemm_is_skipped_when_rows_are_not_16_byte_aligned():
    """A LoRA rank of 2 in float32 (8-byte rows) cannot go through torch._grouped_mm: the loop serves it."""
    model = tiny_model(**MOE)
    apply_lora(model, rank=2, alpha=4, targets=("experts",))
    experts = next(m for m in model.modules() if isinstance(m, LoRAExperts))
    assert not experts.grouped_ok(torch.randn(3, 64))
    x = tokens()
    with torch.no_grad():
        model(x)  # runs (the loop), no stride error
