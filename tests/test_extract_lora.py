"""python -m minillama.tools.extract_lora: an exact rank-4 delta on every linear comes back exactly at rank 4 (logits of
the tuned model), rank 2 keeps less energy and is worse, PEFT loads the adapter, Mixtral experts, clear errors."""

import json

import pytest
import torch

from minillama import load_model
from minillama.lora.peft import load_adapter
from minillama.checkpoints import save_hf
from minillama.tools.extract_lora import cli
from test_lora import MOE, tiny_model, tokens

LINEAR_LEAVES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


@torch.no_grad()
def add_rank4_deltas(model, seed=3, std=0.05):
    """W += B A with random B (out, 4), A (4, in) on every linear (and every expert, the router, the output)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.split(".")[-2] if name.endswith(".weight") else name.split(".")[-1]
        if leaf in LINEAR_LEAVES or leaf == "gate" or ".experts." in f".{name}":
            mats = p.view(-1, *p.shape[-2:])
            for m in mats:
                m += (torch.randn(m.shape[0], 4, generator=g) * std) @ (torch.randn(4, m.shape[1], generator=g) * std)


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request, tmp_path_factory):
    overrides = MOE if request.param == "moe" else {}
    d = tmp_path_factory.mktemp(request.param)
    base = tiny_model(**overrides)
    save_hf(base, d / "base")
    add_rank4_deltas(base)
    save_hf(base, d / "tuned")
    return d, overrides


def extract(d, rank, name, targets=("all-linear", "lm_head")):
    assert cli(["--base", str(d / "base"), "--tuned", str(d / "tuned"), "--rank", str(rank), "--out",
                str(d / name), "--targets", *targets, "--overwrite"]) == 0
    return d / name, json.loads((d / name / "extraction_report.json").read_text())


def logits_with(d, adapter, x):
    model = load_model(d / "base")
    load_adapter(model, adapter)
    with torch.no_grad():
        return model(x)


def test_exact_rank4_delta_extracted_at_rank4_gives_the_tuned_logits_and_rank2_is_worse(pair, capsys):
    d, overrides = pair
    x = tokens()
    with torch.no_grad():
        want = load_model(d / "tuned")(x)
        base = load_model(d / "base")(x)
    r4, report4 = extract(d, 4, "r4")
    assert all(k > 1 - 1e-6 for k in report4["weights"].values())  # all the energy kept
    n_linear = 2 * (4 + (0 if overrides else 3) + (3 * 4 if overrides else 0) + (1 if overrides else 0)) + 1
    assert len(report4["weights"]) == n_linear
    assert (logits_with(d, r4, x) - want).abs().max() <= 1e-4
    r2, report2 = extract(d, 2, "r2")
    out = capsys.readouterr().out
    assert "layer 0:" in out and "of the delta's energy kept" in out
    assert max(report2["weights"].values()) < 0.99 and 0 < report2["layers"]["0"] < 0.99
    err2 = (logits_with(d, r2, x) - want).abs().max()
    assert 1e-3 < err2 < (base - want).abs().max()  # worse than rank 4, better than no adapter


def test_extracted_adapter_loads_in_peft_with_equal_logits(pair):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    d, _ = pair
    adapter, _ = extract(d, 4, "r4peft", targets=("all-linear",))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    x = tokens()
    with torch.no_grad():
        theirs = peft_model(x).logits
    assert (logits_with(d, adapter, x) - theirs).abs().max() <= 1e-4


def test_mismatched_checkpoints_and_bad_flags_fail_in_one_line(tmp_path, capsys):
    save_hf(tiny_model(), tmp_path / "base")
    save_hf(tiny_model(n_layers=3), tmp_path / "deeper")
    tuned = tiny_model()
    with torch.no_grad():
        tuned.tok_embeddings.weight[0] += 1.0  # no LoRA target holds the embeddings
        tuned.layers[0].attention.wv.weight[0, 0] += 0.5
    save_hf(tuned, tmp_path / "tuned")
    args = ["--base", str(tmp_path / "base"), "--rank", "2"]
    assert cli(args + ["--tuned", str(tmp_path / "deeper"), "--out", str(tmp_path / "x")]) == 1
    assert "differ in n_layers: 2 vs 3" in capsys.readouterr().err
    assert cli(args[:-1] + ["99", "--tuned", str(tmp_path / "tuned"), "--out", str(tmp_path / "x")]) == 1
    assert "--rank 99 exceeds the smallest targeted weight's dimension (32)" in capsys.readouterr().err
    assert cli(args + ["--tuned", str(tmp_path / "base"), "--out", str(tmp_path / "x")]) == 1
    assert "nothing to extract" in capsys.readouterr().err
    assert cli(args + ["--tuned", str(tmp_path / "tuned"), "--out", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "warning: tok_embeddings.weight differs" in out
    report = json.loads((tmp_path / "ok" / "extraction_report.json").read_text())
    assert list(report["weights"]) == ["model.layers.0.self_attn.v_proj"] and len(report["unchanged"]) == 13
    assert cli(args + ["--tuned", str(tmp_path / "tuned"), "--out", str(tmp_path / "ok")]) == 1
    assert "exists and is not empty (pass --overwrite" in capsys.readouterr().err
