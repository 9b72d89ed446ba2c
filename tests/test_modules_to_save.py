"""LoRA + whole trained modules (lora.set_trainable: LongLoRA's embeddings and norms) as PEFT modules_to_save, both
ways: our adapter loads in transformers + peft with equal logits, PEFT's loads here with equal logits, and merging
folds them into the checkpoint. Tied embeddings included (PEFT's ensure_weight_tying)."""

import json

import pytest
import torch

from minillama.lora.peft import load_adapter, save_adapter
from minillama.checkpoints import load_model, save_hf
from minillama.lora.layers import apply_lora, set_trainable
from helpers import randomize_adapter
from test_lora import randomize_lora, tiny_model, tokens

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def hf_twin(model, path):
    save_hf(model, path)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def perturb(params, seed=3, std=0.05):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * std)


def trained_model(tie: bool):
    model = tiny_model(tie_embeddings=tie)
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    randomize_lora(model)
    names = set_trainable(model, ["embed", "norm"])
    perturb([p for n, p in model.named_parameters() if n in names])
    return model, names


@pytest.mark.parametrize("tie", [False, True])
def test_our_adapter_with_trained_embed_and_norms_loads_in_peft_with_equal_logits(tie, tmp_path):
    base = tiny_model(tie_embeddings=tie)
    hf = hf_twin(base, tmp_path / "base")
    model, names = trained_model(tie)
    assert "tok_embeddings.weight" in names and "layers.1.ffn_norm.weight" in names and "norm.weight" in names
    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["modules_to_save"]) == {"embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"}
    assert cfg.get("ensure_weight_tying", False) is tie
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), peft_model(x).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(x).logits
    assert (ours - base_logits).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("tie", [False, True])
def test_peft_adapter_with_modules_to_save_loads_here_with_equal_logits(tie, tmp_path):
    model = tiny_model(tie_embeddings=tie)
    hf = hf_twin(model, tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                             modules_to_save=["embed_tokens", "norm"], ensure_weight_tying=tie)
    peft_model = peft.get_peft_model(hf, config).eval()
    randomize_adapter(peft_model, seed=5, whole=0.05)
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    x = tokens()
    with torch.no_grad():
        theirs = peft_model(x).logits
    load_adapter(model, tmp_path / "peft_adapter")
    with torch.no_grad():
        ours = model(x)
    assert (ours - theirs).abs().max() <= 1e-4
    if tie:
        assert model.output.weight is model.tok_embeddings.weight  # still one tensor
    # the loaded modules are trainable again, so saving writes them back: a round trip keeps the function
    save_adapter(model, tmp_path / "again")
    fresh = tiny_model(tie_embeddings=tie)
    load_adapter(fresh, tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ours, atol=1e-5, rtol=1e-5)


def test_merge_folds_trained_modules_into_the_checkpoint(tmp_path):
    base = tiny_model()
    save_hf(base, tmp_path / "base")
    model, _ = trained_model(tie=False)
    save_adapter(model, tmp_path / "adapter")
    from minillama.tools.merge import main as merge
    merge(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")])
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "m")(x), model(x), atol=1e-4, rtol=1e-4)


def test_set_trainable_rejects_what_it_cannot_train():
    with pytest.raises(ValueError, match="unknown kinds"):
        set_trainable(tiny_model(), ["embeddings"])
    with pytest.raises(ValueError, match="ties its output head"):
        set_trainable(tiny_model(tie_embeddings=True), ["head"])
    model = apply_lora(tiny_model(), rank=2, alpha=4)
    names = set_trainable(model, ["head"])
    assert names == ["output.weight"] and model.output.weight.requires_grad
    assert not model.tok_embeddings.weight.requires_grad
