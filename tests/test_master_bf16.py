"""--master_dtype bfloat16: stochastic rounding is unbiased; 50 steps of pure bf16 full fine-tuning track the fp32
master-weight curve within 0.02 (round-to-nearest does not); bf16 weights and moments, 8 bytes per parameter."""

import pytest
import torch

import minillama.training.optim as optim
from minillama.training.optim import AdamWBF16, stochastic_round_bf16
from sft_helpers import REPO, metrics, qa_samples, tiny_checkpoint, write_jsonl

import sys
sys.path.insert(0, str(REPO / "train"))
import sft  # noqa: E402


def test_stochastic_rounding_is_unbiased_where_nearest_rounding_loses_the_step():
    x = torch.full((200000,), 1.0 + 2 ** -10)  # between the bf16 neighbours 1 and 1 + 2^-7
    rounded = stochastic_round_bf16(x, torch.Generator().manual_seed(0))
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert rounded.double().mean().item() == pytest.approx(1.0 + 2 ** -10, abs=3e-5)  # 5 sigma
    assert x.to(torch.bfloat16).float().unique().tolist() == [1.0]  # nearest: the 2^-10 step is gone
    neg = stochastic_round_bf16(-x, torch.Generator().manual_seed(1))
    assert neg.double().mean().item() == pytest.approx(-(1.0 + 2 ** -10), abs=3e-5)
    special = torch.tensor([float("inf"), -float("inf"), 0.0, 3.0])
    assert stochastic_round_bf16(special).float().tolist() == [float("inf"), -float("inf"), 0.0, 3.0]


def test_bf16_adamw_keeps_bf16_moments():
    p = torch.nn.Parameter(torch.randn(8, 8).to(torch.bfloat16))
    opt = AdamWBF16([p], lr=1e-2)
    p.grad = torch.randn(8, 8).to(torch.bfloat16)
    before = p.detach().clone()
    opt.step()
    st = opt.state[p]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == p.dtype == torch.bfloat16 and st["step"].item() == 1
    assert not torch.equal(p, before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16")
    return d, tiny_checkpoint(d / "ck"), write_jsonl(d / "train.jsonl", qa_samples(16))


def run(setup, name, extra, capsys):
    d, ck, data = setup
    torch.set_num_threads(1)
    rc = sft.main(["--model", str(ck), "--data", str(data), "--out", str(d / name), "--device", "cpu",
                   "--batch_size", "4", "--max_steps", "50", "--lr", "1e-4", "--lora_rank", "0", "--warmup_steps",
                   "5", "--log_every", "100"] + extra)
    assert rc == 0
    return [r["loss"] for r in metrics(d / name) if "loss" in r], capsys.readouterr().err


def test_pure_bf16_loss_curve_tracks_fp32_master_weights_over_50_steps(setup, capsys, monkeypatch):
    master, log32 = run(setup, "fp32_master", ["--dtype", "bfloat16"], capsys)  # bf16 compute, fp32 master
    pure, log16 = run(setup, "bf16", ["--master_dtype", "bfloat16"], capsys)
    assert "16 bytes per trained parameter" in log32 and "8 bytes per trained parameter" in log16
    assert master[-1] < master[0] - 0.5
    assert max(abs(a - b) for a, b in zip(master, pure)) < 0.02  # measured 0.003
    monkeypatch.setattr(optim, "stochastic_round_bf16", lambda x, generator=None: x.to(torch.bfloat16))
    nearest, _ = run(setup, "bf16_nearest", ["--master_dtype", "bfloat16"], capsys)
    assert max(abs(a - b) for a, b in zip(master, nearest)) > 0.1  # measured 0.39: most updates are lost
    from minillama import load_model
    assert load_model(setup[0] / "bf16" / "final", dtype=None).tok_embeddings.weight.dtype == torch.bfloat16


def test_master_bf16_flag_checks():
    with pytest.raises(SystemExit):
        sft.parse_args(["--master_dtype", "bfloat16"])  # LoRA (the default) keeps float32 factors
    with pytest.raises(SystemExit):
        sft.parse_args(["--master_dtype", "bfloat16", "--lora_rank", "0", "--dtype", "float32"])
    assert sft.parse_args(["--master_dtype", "bfloat16", "--lora_rank", "0"]).dtype == "bfloat16"
