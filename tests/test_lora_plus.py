"""LoRA+: the B factors get their own optimizer group at ratio x the learning rate, the schedule scales every
group, and a first AdamW step moves B ratio times as far as A; sft with --use_dora --lora_plus_ratio under FSDP
(2 processes) equals 1 process and writes a PEFT DoRA adapter."""

import json

import pytest
import torch

from minillama.lora.layers import apply_lora, lora_parameters
from minillama.training.optim import build_optimizer, lr_at, set_lr
from sft_helpers import metrics, qa_samples, run_sft, tiny_checkpoint, write_jsonl
from test_lora import MOE, randomize_lora, tiny_model, tokens


@pytest.mark.parametrize("moe", [False, True])
def test_lora_plus_groups_b_factors_and_the_schedule_scales_every_group(moe):
    model = apply_lora(tiny_model(**(MOE if moe else {})), rank=4, alpha=8, targets="all-linear", use_dora=not moe)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, lora_plus_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay, lora_b = opt.param_groups
    b_names = {names[id(p)].rpartition(".")[2] for p in lora_b["params"]}
    assert b_names == ({"lora_w1_b", "lora_w2_b", "lora_w3_b", "lora_b"} if moe else {"lora_b"})
    assert all(names[id(p)].endswith("_a") for p in decay["params"])
    assert {names[id(p)].rpartition(".")[2] for p in no_decay["params"]} == (set() if moe else {"lora_magnitude"})
    assert lora_b["weight_decay"] == decay["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in opt.param_groups) == len(lora_parameters(model))
    for step in (1, 2, 5, 10):  # warmup, then cosine: B's rate stays 16x A's
        lr = lr_at(step, 1e-3, warmup_steps=2, total_steps=10)
        set_lr(opt, lr)
        assert [g["lr"] for g in opt.param_groups] == [lr, lr, 16 * lr]


def test_first_adamw_step_moves_b_ratio_times_as_far_as_a():
    model = apply_lora(tiny_model(), rank=4, alpha=8, targets=("q_proj", "v_proj"))
    randomize_lora(model, std=0.1)  # B != 0, so A gets a gradient too
    wq = model.layers[0].attention.wq
    a0, b0 = wq.lora_a.detach().clone(), wq.lora_b.detach().clone()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0, lora_plus_ratio=8)
    logits = model(tokens())
    logits.square().mean().backward()
    opt.step()
    step_a, step_b = (wq.lora_a - a0).abs().max().item(), (wq.lora_b - b0).abs().max().item()
    # Adam's first step is lr * g / (|g| + eps) ~ lr per entry: the largest moves are the groups' learning rates
    assert step_a == pytest.approx(1e-3, rel=1e-3) and step_b == pytest.approx(8e-3, rel=1e-3)


def test_sft_dora_and_lora_plus_two_processes_equal_one(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", qa_samples(8))
    ckpt = tiny_checkpoint(tmp_path / "dense")
    common = ["--model", str(ckpt), "--data", str(data), "--batch_size", "4", "--max_steps", "3", "--lr", "1e-2",
              "--lora_rank", "4", "--lora_targets", "q_proj", "v_proj", "down_proj", "--use_dora",
              "--lora_plus_ratio", "4"]
    run_sft(common + ["--out", str(tmp_path / "one")], nproc=1)
    run_sft(common + ["--out", str(tmp_path / "two")], nproc=2)
    one, two = [r["loss"] for r in metrics(tmp_path / "one")], [r["loss"] for r in metrics(tmp_path / "two")]
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5 and one[-1] < one[0]
    cfg = json.loads((tmp_path / "two" / "final" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    from minillama import load_model
    from minillama.lora.peft import load_adapter
    model = load_model(ckpt)
    load_adapter(model, tmp_path / "two" / "final")
    mag = model.layers[0].attention.wq.lora_magnitude
    norms = torch.linalg.norm(model.layers[0].attention.wq.weight, dim=1)
    assert mag is not None and not torch.allclose(mag, norms)  # the magnitudes trained
