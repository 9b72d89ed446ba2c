"""DoRA: PEFT's use_dora adapters load here with PEFT's logits and ours load in PEFT; merged == unmerged and unmerge
restores the base bit for bit; a fresh DoRA adapter changes nothing; NF4 base; Mixtral experts are refused."""

import pytest
import torch

from minillama.lora.peft import load_adapter, read_adapter, save_adapter
from minillama.checkpoints import save_hf
from minillama.lora.layers import LoRALinear, apply_lora, lora_parameters
from minillama.lora.merge import merge_lora, unmerge_lora
from minillama.quant import quantize_model_nf4
from helpers import randomize_adapter
from test_lora import MOE, _train, tiny_model, tokens

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def randomize_dora(model, seed=1, std=0.2):
    """Random A and B, and magnitudes 20% off the norms they start at (so g != 1 shows)."""
    randomize_adapter(model, seed, std, magnitude=0.2)


def hf_twin(model, path):
    save_hf(model, path)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_peft_dora_adapter_loads_here_with_equal_logits(tmp_path):
    model = tiny_model()
    hf = hf_twin(model, tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=False,
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, config).eval()
    randomize_dora(peft_model)
    peft_model.save_pretrained(tmp_path / "peft_dora")
    x = tokens()
    with torch.no_grad():
        theirs = peft_model(x).logits
        with peft_model.disable_adapter():
            base = peft_model(x).logits
    cfg = load_adapter(model, tmp_path / "peft_dora")
    assert cfg["use_dora"] is True and model.layers[0].attention.wq.lora_magnitude is not None
    with torch.no_grad():
        ours = model(x)
    assert (theirs - base).abs().max() > 1e-2  # the adapter (and its magnitudes) change the function
    assert (ours - theirs).abs().max() <= 1e-4  # measured ~6e-6 on logits of magnitude ~7


def test_our_dora_adapter_loads_in_peft_with_equal_logits(tmp_path):
    model = tiny_model()
    hf = hf_twin(model, tmp_path / "base")
    apply_lora(model, rank=4, alpha=8, targets=("all-linear", "lm_head"), use_dora=True)
    randomize_dora(model)
    save_adapter(model, tmp_path / "dora")
    _, factors = read_adapter(tmp_path / "dora", model.args)
    assert all(f[3] is not None for f in factors.values())  # lora_magnitude_vector for every module
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "dora").eval()
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), peft_model(x).logits
    assert (ours - theirs).abs().max() <= 1e-4  # measured ~6e-6 on logits of magnitude ~7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_merge_equals_unmerged_and_unmerge_restores_base_exactly(dtype):
    model = apply_lora(tiny_model().to(dtype), rank=4, alpha=8, targets="all-linear", use_dora=True)
    randomize_dora(model, std=0.05)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x = tokens()
    with torch.no_grad():
        adapted = model(x)
        merge_lora(model)
        merged = model(x)
        tol = 1e-4 if dtype == torch.float32 else 0.05  # bf16: the merged weight is rounded once to bf16
        assert (merged - adapted).abs().max() <= tol * adapted.abs().max()
        unmerge_lora(model)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
        assert torch.equal(model(x), adapted)


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_fresh_dora_changes_nothing_and_training_moves_magnitude_and_factors(base):
    model = tiny_model()
    if base == "nf4":
        quantize_model_nf4(model)
    x = tokens()
    with torch.no_grad():
        before = model(x)
    apply_lora(model, rank=4, alpha=8, targets="all-linear", use_dora=True)
    wq = model.layers[0].attention.wq
    assert isinstance(wq, LoRALinear) and wq.lora_magnitude.shape == (64,)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B = 0 and m = ||W||: g = 1 exactly
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude" in n for n in start) and len(lora_parameters(model)) == len(start)
    first, last = _train(model)
    assert last < first - 0.1, (first, last)
    moved = {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad
             and not torch.equal(p, start[n])}
    assert moved == {"lora_a", "lora_b", "lora_magnitude"}


def test_dora_on_mixtral_experts_is_refused_clearly():
    with pytest.raises(ValueError, match="DoRA on Mixtral experts is not supported"):
        apply_lora(tiny_model(**MOE), rank=4, alpha=8, targets="all-linear", use_dora=True)
    model = apply_lora(tiny_model(**MOE), rank=4, alpha=8, targets=("q_proj", "v_proj", "router"), use_dora=True)
    assert model.layers[0].feed_forward.gate.lora_magnitude is not None  # the router takes DoRA


def test_merge_tool_folds_a_dora_adapter_into_the_checkpoint_weights(tmp_path):
    """python -m minillama.tools.merge's merge_adapters_: W <- g (W + s B A) gives the unmerged adapter's logits."""
    from minillama.tools.merge import merge_adapters_
    model = apply_lora(tiny_model(), rank=4, alpha=8, targets=("q_proj", "k_proj", "down_proj"), use_dora=True)
    randomize_dora(model, std=0.05)
    save_adapter(model, tmp_path / "dora")
    x = tokens()
    with torch.no_grad():
        want = model(x)
        merged = merge_adapters_(tiny_model(), [tmp_path / "dora"], log=lambda s: None)
        torch.testing.assert_close(merged(x), want, atol=1e-4, rtol=1e-4)
        assert (want - tiny_model()(x)).abs().max() > 1e-2
