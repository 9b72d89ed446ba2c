"""Adapters ours <-> PEFT: a file written here loads in transformers + peft with equal logits, and the reverse."""

import json

import pytest
import torch

from minillama.lora.peft import load_adapter, save_adapter
from minillama.checkpoints import save_hf
from minillama.lora.layers import apply_lora
from minillama.lora.experts import LoRAExperts
from helpers import randomize_adapter
from test_lora import MOE, randomize_lora, tiny_model, tokens

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CASES = {  # name -> (model overrides, our targets, rslora)
    "llama3-gqa": ({}, ("all-linear", "lm_head"), True),
    "mixtral": (MOE, ("all-linear",), False),
}


def hf_twin(model, path):
    save_hf(model, path)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_our_adapter_loads_in_peft_with_equal_logits(case, tmp_path):
    overrides, targets, rslora = CASES[case]
    model = tiny_model(**overrides)
    hf = hf_twin(model, tmp_path / "base")
    apply_lora(model, rank=4, alpha=8, targets=targets, use_rslora=rslora)
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_rslora"] is rslora
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = tokens()
    with torch.no_grad():
        ours, theirs, base = model(x), peft_model(x).logits, hf(x).logits
        with peft_model.disable_adapter():
            base = peft_model(x).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter does something
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_here_with_equal_logits(case, tmp_path):
    overrides, _, _ = CASES[case]
    model = tiny_model(**overrides)
    hf = hf_twin(model, tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, config).eval()
    randomize_adapter(peft_model, seed=5)
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    x = tokens()
    with torch.no_grad():
        theirs = peft_model(x).logits
    cfg = load_adapter(model, tmp_path / "peft_adapter")
    assert cfg["r"] == 4
    if overrides:  # transformers 5 fuses Mixtral experts; PEFT's adapter was split back into per-expert w1/w2/w3
        assert isinstance(model.layers[0].feed_forward.experts, LoRAExperts)
    with torch.no_grad():
        ours = model(x)
    assert (ours - theirs).abs().max() <= 1e-4
    # and a round trip through our writer keeps the function
    save_adapter(model, tmp_path / "again")
    fresh = tiny_model(**overrides)
    again = load_adapter(fresh, tmp_path / "again")
    assert again["r"] == 4
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ours, atol=1e-5, rtol=1e-5)


def test_adapter_for_another_model_size_fails_naming_module_and_shapes(tmp_path):
    big = apply_lora(tiny_model(dim=96, n_heads=6, n_kv_heads=2), rank=4, alpha=8, targets=("v_proj",))
    save_adapter(big, tmp_path / "big")
    with pytest.raises(ValueError, match=r"layers.0.attention.wv: adapter lora_A \(4, 96\)"):
        load_adapter(tiny_model(), tmp_path / "big")
    deep = apply_lora(tiny_model(n_layers=3), rank=4, alpha=8, targets=("v_proj",))
    save_adapter(deep, tmp_path / "deep")
    with pytest.raises(ValueError, match="layers.2.attention.wv does not exist"):
        load_adapter(tiny_model(), tmp_path / "deep")
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapter(tiny_model(), tmp_path)


def test_save_is_atomic_and_replaces_an_old_adapter(tmp_path):
    model = apply_lora(tiny_model(), rank=2, alpha=4)
    save_adapter(model, tmp_path / "a")
    randomize_lora(model)
    save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp dirs left behind
    fresh = tiny_model()
    load_adapter(fresh, tmp_path / "a")
    x = tokens()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
