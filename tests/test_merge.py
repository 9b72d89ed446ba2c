"""Merging: bf16 merges round once from float32, unmerge is exact, the merge CLI writes a checkpoint HF loads."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minillama.lora.peft import save_adapter
from minillama.checkpoints import load_model, save_hf
from minillama.lora.layers import apply_lora
from minillama.lora.merge import merge_lora, unmerge_lora
from minillama.tools.merge import main as merge_main
from minillama.tools.merge import merge_adapters_
from test_lora import MOE, randomize_lora, tiny_model, tokens

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("moe", [False, True])
def test_bf16_merge_rounds_once_and_unmerge_is_exact(moe):
    model = tiny_model(**(MOE if moe else {})).to(torch.bfloat16)
    apply_lora(model, rank=4, alpha=16, targets="all-linear")
    randomize_lora(model, std=0.3)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    wq = model.layers[0].attention.wq
    expected = (wq.weight.float() + wq.delta()).to(torch.bfloat16)
    merge_lora(model)
    assert wq._fix[0] is None  # a delta this large: unmerge keeps a plain copy (smaller than the fix list)
    assert wq.weight.dtype == torch.bfloat16 and torch.equal(wq.weight, expected)
    if moe:
        ex = model.layers[1].feed_forward.experts
        w2 = base["layers.1.feed_forward.experts.w2"]
        assert torch.equal(ex.w2[3], (w2[3].float() + ex.delta("w2", 3)).to(torch.bfloat16))
    unmerge_lora(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())


def _hf_weight(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(next(path.glob("*.safetensors"))), "pt") as f:
        return f.get_tensor(key)


def test_merge_cli_bf16_base_stays_bf16(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    save_hf(model, tmp_path / "base")
    apply_lora(model, rank=4, alpha=8, targets=("v_proj", "down_proj"))
    randomize_lora(model)
    save_adapter(model, tmp_path / "ad")
    cmd = [sys.executable, "-m", "minillama.tools.merge", "--base", str(tmp_path / "base"),
           "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "merged layers.1" in proc.stdout and "done" in proc.stdout
    wv = model.layers[1].attention.wv
    got = _hf_weight(tmp_path / "merged", "model.layers.1.self_attn.v_proj.weight")
    assert got.dtype == torch.bfloat16 and torch.equal(got, (wv.weight.float() + wv.delta()).to(torch.bfloat16))
    untouched = _hf_weight(tmp_path / "merged", "model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(untouched, _hf_weight(tmp_path / "base", "model.layers.0.self_attn.q_proj.weight"))


def test_merge_cli_output_loads_in_transformers_with_adapter_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(**MOE)
    save_hf(model, tmp_path / "base")
    apply_lora(model, rank=4, alpha=8, targets=("all-linear",))
    randomize_lora(model)
    save_adapter(model, tmp_path / "ad")
    merge_main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() <= 1e-4


def test_merge_cli_meta_format_output_has_adapter_logits(tmp_path):
    model = tiny_model()
    save_hf(model, tmp_path / "base")
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "k_proj", "o_proj", "up_proj"))
    randomize_lora(model)
    save_adapter(model, tmp_path / "ad")
    merge_main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m"),
                "--format", "meta"])
    assert (tmp_path / "m" / "params.json").is_file() and not (tmp_path / "m" / "config.json").exists()
    merged = load_model(tmp_path / "m")
    x = tokens()
    with torch.no_grad():  # q/k rows are permuted back to Meta order: the merged q/k mean the same function
        assert (merged(x) - model(x)).abs().max() <= 1e-4


def test_two_adapters_sum(tmp_path):
    base = tiny_model()
    save_hf(base, tmp_path / "base")
    ref = copy.deepcopy(base)
    for i, targets in enumerate([("q_proj", "k_proj"), ("k_proj", "up_proj")]):
        m = apply_lora(copy.deepcopy(base), rank=2, alpha=4, targets=targets)
        randomize_lora(m, seed=i)
        save_adapter(m, tmp_path / f"ad{i}")
        merge_lora(m)
        for k, v in ref.state_dict().items():  # base + delta_0 + delta_1
            v += m.state_dict()[k] - base.state_dict()[k]
    merged = merge_adapters_(load_model(tmp_path / "base"), [tmp_path / "ad0", tmp_path / "ad1"], log=lambda s: None)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), ref(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="does not exist in the base model"):
        merge_adapters_(tiny_model(n_layers=1), [tmp_path / "ad0"], log=lambda s: None)
