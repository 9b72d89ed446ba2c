"""IPO, SimPO and KTO in the one trainer (train/dpo.py --loss ipo|simpo|kto): each loss and its metrics equal TRL
1.16's (DPOTrainer "ipo", CPOTrainer "simpo", KTOTrainer "kto") on fixed log-probs, and on a tiny LoRA model's own
log-probs at step 0 and after one optimizer step; KTO reads unpaired lines and pairs; 2 processes == 1 process
and a resumed run == the uninterrupted one."""

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from minillama.lora.layers import apply_lora, set_lora_enabled
from minillama.tokenizer.tokenizer import load_tokenizer
from minillama.training.kto import KTO, kto_summarize, kto_terms, load_examples
from minillama.training.loss import SequenceLogprobs
from minillama.training.preference import PrefConfig, Preference, _pair_terms, summarize
from minillama.training.preference_data import load_pairs
from minillama.training.schedule import BatchSplit
from sft_helpers import REPO, free_port, metrics, tiny_checkpoint, write_jsonl

trl = pytest.importorskip("trl")

PC, PR = torch.tensor([-12.5, -30.0, -7.25, -40.0]), torch.tensor([-14.0, -22.5, -9.0, -41.5])
RC, RR = torch.tensor([-13.0, -28.0, -7.0, -39.0]), torch.tensor([-13.5, -23.0, -8.0, -40.0])
NC, NR = torch.tensor([5.0, 9.0, 3.0, 12.0]), torch.tensor([6.0, 7.0, 4.0, 11.0])  # answer token counts


def _acc():
    return SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)


def trl_dpo(pc, pr, rc, rr, n_c, n_r, beta, loss_type):
    """TRL's DPOTrainer._compute_loss on given sequence log-probs and answer lengths (a stub trainer and a model
    that returns them: each answer's log-prob sits on its first token, its completion mask covers its length)."""
    n, T = len(pc), int(max(n_c.max(), n_r.max()))
    per_token = torch.zeros(2 * n, T)
    per_token[:, 0] = torch.cat([pc, pr])
    lengths = torch.cat([n_c, n_r]).long()
    mask = torch.zeros(2 * n, T + 1, dtype=torch.long)
    for i, k in enumerate(lengths):
        mask[i, 1:1 + k] = 1
    model = lambda **kw: SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * n, T),  # noqa: E731
                                         mean_logits=torch.zeros(2 * n, T), is_top1=torch.zeros(2 * n, T).bool())
    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_acc(), aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
                           use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * n, T + 1, dtype=torch.long), "attention_mask": torch.ones(2 * n, T + 1),
              "completion_mask": mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = trl.DPOTrainer._compute_loss(stub, model, inputs, False)
    return loss.item(), {k: v[0] for k, v in stub._metrics["train"].items()}


def trl_simpo(pc, pr, n_c, n_r, beta, gamma, cpo_alpha, label_smoothing=0.0):
    """TRL's CPOTrainer "simpo" loss and logged metrics on per-token mean log-probs (its average_log_prob)."""
    from trl.experimental.cpo import CPOTrainer
    lc, lr = pc / n_c, pr / n_r
    stub = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing,
                           loss_type="simpo", accelerator=_acc())
    losses, cr, rr = CPOTrainer.cpo_loss(stub, lc, lr)
    nll = -pc.sum() / n_c.sum() if cpo_alpha else torch.tensor(0.0)  # CE over the chosen answers' tokens
    m = {"rewards/chosen": cr.mean().item(), "rewards/rejected": rr.mean().item(),
         "rewards/accuracies": (cr > rr).float().mean().item(), "rewards/margins": (cr - rr).mean().item(),
         "logps/chosen": lc.mean().item(), "logps/rejected": lr.mean().item(), "nll_loss": nll.item()}
    return (losses.mean() + cpo_alpha * nll).item(), m


def trl_kto(logps, ref_logps, kl_logps, ref_kl_logps, labels, beta, weights=(1.0, 1.0)):
    """TRL's KTOTrainer._compute_loss with precomputed reference log-probs (a stub trainer and model)."""
    n = len(logps)
    per_token = torch.stack([logps, torch.zeros(n)], dim=1)  # (n, 2): sums to each completion's log-prob
    model = lambda **kw: SimpleNamespace(log_probs=per_token, entropy=torch.zeros(n, 2),  # noqa: E731
                                         mean_logits=torch.zeros(n, 2))
    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_acc(), aux_loss_enabled=False,
                           precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta,
                           desirable_weight=weights[0], undesirable_weight=weights[1],
                           _compute_kl_logps=lambda model, batch: kl_logps,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    batch = {"input_ids": torch.zeros(n, 3, dtype=torch.long), "attention_mask": torch.ones(n, 3),
             "completion_mask": torch.tensor([[0, 1, 1]] * n), "label": labels, "ref_logps": ref_logps,
             "ref_KL_logps": ref_kl_logps}
    loss = trl.KTOTrainer._compute_loss(stub, model, batch, False)
    return loss.item(), {k: v[-1] for k, v in stub._metrics["train"].items()}


def ours_pairs(cfg, pc, pr, rc, rr, n_c, n_r):
    sums = torch.stack([pc, pr], dim=1).reshape(-1)
    ref = torch.stack([rc, rr], dim=1).reshape(-1) if rc is not None else None
    n_tok = torch.stack([n_c, n_r], dim=1).reshape(-1)
    objective, m = _pair_terms(cfg, sums, n_tok, ref, float(len(pc)), n_c.sum().item())
    return objective.item(), summarize(m, len(pc), n_c.sum().item(), cfg)


PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected")


def test_ipo_loss_and_metrics_equal_trl_with_per_token_averaged_log_ratios():
    want, m = trl_dpo(PC, PR, RC, RR, NC, NR, 0.1, "ipo")
    objective, ours = ours_pairs(PrefConfig("ipo", beta=0.1), PC, PR, RC, RR, NC, NR)
    assert objective == pytest.approx(want, rel=1e-6) and ours["loss"] == pytest.approx(want, rel=1e-6)
    for k in PAIR_METRICS:
        assert ours[k] == pytest.approx(m[k], abs=1e-5), k
    d0 = ((PC[0] - RC[0]) / NC[0] - (PR[0] - RR[0]) / NR[0]).item()  # by hand, pair 0
    one, _ = ours_pairs(PrefConfig("ipo", beta=0.1), PC[:1], PR[:1], RC[:1], RR[:1], NC[:1], NR[:1])
    assert one == pytest.approx((d0 - 5.0) ** 2, rel=1e-6)


@pytest.mark.parametrize("cpo_alpha,eps", [(0.0, 0.0), (1.0, 0.1)])
def test_simpo_loss_and_metrics_equal_trls_cpo_simpo(cpo_alpha, eps):
    want, m = trl_simpo(PC, PR, NC, NR, beta=2.0, gamma=0.8, cpo_alpha=cpo_alpha, label_smoothing=eps)
    cfg = PrefConfig("simpo", beta=2.0, simpo_gamma=0.8, cpo_alpha=cpo_alpha, label_smoothing=eps)
    objective, ours = ours_pairs(cfg, PC, PR, None, None, NC, NR)
    assert objective == pytest.approx(want, rel=1e-6) and ours["loss"] == pytest.approx(want, rel=1e-6)
    for k in PAIR_METRICS + ("nll_loss",):
        assert ours[k] == pytest.approx(m[k], abs=1e-5), k


KL, RKL = torch.tensor([-20.0, -25.0, -18.0, -30.0, -22.0]), torch.tensor([-21.0, -24.0, -19.5, -30.5, -23.0])
LOGPS, REF = torch.tensor([-10.0, -12.0, -8.0, -15.0, -9.5]), torch.tensor([-11.0, -11.5, -8.5, -14.0, -10.0])
LABELS = torch.tensor([True, False, True, False, True])


def ours_kto(cfg, logps, ref, kl_logps, ref_kl, labels):
    kl = max((kl_logps - ref_kl).mean().item(), 0.0)
    objective, m = kto_terms(cfg, logps, ref, labels, kl, float(len(logps)))
    return objective.item(), kto_summarize(m, len(logps), kl)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.5)])
def test_kto_loss_and_metrics_equal_trl(weights):
    cfg = PrefConfig("kto", beta=0.1, desirable_weight=weights[0], undesirable_weight=weights[1])
    for kl_logps in (KL, RKL - 1.0):  # a positive and a negative (clamped to 0) KL estimate
        want, m = trl_kto(LOGPS, REF, kl_logps, RKL, LABELS, 0.1, weights)
        objective, ours = ours_kto(cfg, LOGPS, REF, kl_logps, RKL, LABELS)
        assert objective == pytest.approx(want, rel=1e-6) and ours["loss"] == pytest.approx(want, rel=1e-6)
        for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert ours[k] == pytest.approx(m[k], abs=1e-5), k


# ---- the recipes on a tiny model's own log-probs, at step 0 and after one step ----

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefloss")
    return d, tiny_checkpoint(d / "dense")


def pair_records(n, seed=0):
    import random
    rng = random.Random(seed)
    words = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "fish"]
    return [{"prompt": f"q{i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 5))),
             "chosen": "yes, " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 4))),
             "rejected": f"no {rng.choice(words)}"} for i in range(n)]


def kto_records(n, seed=0):
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": bool(i % 3)}
            for i, r in enumerate(pair_records(n, seed))]


def doc_logps(model, sample, adapters: bool) -> float:
    """A sample's summed learned-token log-prob, computed alone."""
    set_lora_enabled(model, adapters)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([sample.ids]))[0].log_softmax(-1)
    finally:
        set_lora_enabled(model, True)
    t = torch.tensor(sample.targets())
    return logits[t != -100].gather(1, t[t != -100][:, None]).sum().item()


def lora_model(ckpt):
    from minillama import load_model
    torch.manual_seed(0)
    model = load_model(ckpt)
    apply_lora(model, 4, 8.0, 0.0, targets=["all-linear"])
    return model


def one_step(recipe, root, rows, opt):
    """Our loop's step on one rank: counts, forward + backward per micro-batch, AdamW; -> the step's metrics."""
    counts = recipe.count(root, rows)
    sums = defaultdict(float)
    for mb in recipe.micro_batches(rows):
        out = recipe.forward(root, mb, counts)
        out.loss.backward()
        for k, v in out.sums.items():
            sums[k] += v
    opt.step()
    opt.zero_grad()
    return recipe.summarize(dict(sums), counts)


@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_ipo_and_simpo_recipes_equal_trl_on_the_models_log_probs_at_step_0_and_after_a_step(tiny, loss):
    d, ckpt = tiny
    tok = load_tokenizer(ckpt)
    pairs, _ = load_pairs(write_jsonl(d / f"{loss}.jsonl", pair_records(4)), tok, 512)
    model = lora_model(ckpt)
    root = SequenceLogprobs(model)
    cfg = PrefConfig(loss, beta=0.5 if loss == "ipo" else 2.0, simpo_gamma=0.5, cpo_alpha=0.5)
    recipe = Preference(cfg=cfg, pairs=pairs, eval_pairs=None, split=BatchSplit.make(2, 1, 1), model=model,
                        device=torch.device("cpu"), pad_id=0, seq_len=512, pack=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows = [[0, 1], [2, 3]]  # two packed rows of two pairs, one micro-batch each
    for step in range(2):
        pol = {side: torch.tensor([doc_logps(model, getattr(p, side), True) for p in pairs]) for side in
               ("chosen", "rejected")}
        ref = {side: torch.tensor([doc_logps(model, getattr(p, side), False) for p in pairs]) for side in
               ("chosen", "rejected")}
        n_c = torch.tensor([float(p.chosen.n_targets()) for p in pairs])
        n_r = torch.tensor([float(p.rejected.n_targets()) for p in pairs])
        if loss == "ipo":
            want, m = trl_dpo(pol["chosen"], pol["rejected"], ref["chosen"], ref["rejected"], n_c, n_r, 0.5, "ipo")
        else:
            want, m = trl_simpo(pol["chosen"], pol["rejected"], n_c, n_r, 2.0, 0.5, 0.5)
        ours = one_step(recipe, root, rows, opt)
        assert ours["loss"] == pytest.approx(want, rel=1e-4, abs=1e-5), step
        for k in PAIR_METRICS:
            assert ours[k] == pytest.approx(m[k], rel=1e-4, abs=1e-4), (step, k)
        if loss == "ipo" and step == 0:
            assert ours["loss"] == pytest.approx(1.0, abs=1e-6)  # policy == reference: (0 - 1/(2 beta))^2
    assert ours["rewards/margins"] != 0.0


def test_kto_recipe_equals_trl_on_the_models_log_probs_at_step_0_and_after_a_step(tiny):
    d, ckpt = tiny
    tok = load_tokenizer(ckpt)
    examples, _ = load_examples(write_jsonl(d / "kto.jsonl", kto_records(6)), tok, 512)
    model = lora_model(ckpt)
    root = SequenceLogprobs(model)
    cfg = PrefConfig("kto", beta=0.1, undesirable_weight=1.5)
    recipe = KTO(cfg=cfg, examples=examples, eval_examples=None, split=BatchSplit.make(3, 1, 1), model=model,
                 device=torch.device("cpu"), pad_id=0, seq_len=512, pack=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows = [[0, 1], [2, 3], [4, 5]]
    labels = torch.tensor([e.desirable for e in examples])
    for step in range(2):
        lp = {(side, on): torch.tensor([doc_logps(model, getattr(e.pair, side), on) for e in examples])
              for side in ("chosen", "rejected") for on in (True, False)}
        want, m = trl_kto(lp["chosen", True], lp["chosen", False], lp["rejected", True], lp["rejected", False],
                          labels, 0.1, (1.0, 1.5))
        ours = one_step(recipe, root, rows, opt)
        assert ours["loss"] == pytest.approx(want, rel=1e-4, abs=1e-6), step
        for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert ours[k] == pytest.approx(m[k], rel=1e-4, abs=1e-4), (step, k)
        if step == 0:  # policy == reference: r = 0, z0 = 0, each loss 1 - sig(0) = 0.5 times its weight
            assert ours["loss"] == pytest.approx((4 * 0.5 + 2 * 0.75) / 6, abs=1e-6) and ours["kl"] == 0.0


def test_kto_data_unpaired_lines_pairs_and_mismatched_completions(tiny):
    d, ckpt = tiny
    tok = load_tokenizer(ckpt)
    lines = [{"prompt": "a", "completion": "x", "label": True},
             {"prompt": "b", "chosen": "good", "rejected": "bad"},
             {"prompt": "c", "completion": "z", "label": "yes"},
             {"messages": [{"role": "user", "content": "e"}], "completion": {"role": "assistant", "content": "w"},
              "label": False}]
    examples, stats = load_examples(write_jsonl(d / "mixed.jsonl", lines), tok, 512)
    assert [(e.pair.line, e.desirable) for e in examples] == [(1, True), (2, True), (2, False), (4, False)]
    assert stats.bad == [(3, "'label' must be true or false, not 'yes'")]
    answer = lambda s: tok.decode([t for t, m in zip(s.ids, s.mask) if m])  # noqa: E731
    # each example's mismatched completion is the nearest earlier one from another line (wrapping around)
    assert [answer(e.pair.rejected).split("<")[0] for e in examples] == ["w", "x", "x", "bad"]
    with pytest.raises(ValueError, match="no usable KTO examples"):
        load_examples(write_jsonl(d / "none.jsonl", [{"prompt": "a"}]), tok, 512)


# ---- train/dpo.py end to end: 2 processes == 1, resume == uninterrupted ----

def run_dpo(args, nproc=1, check=True):
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(REPO / "train" / "dpo.py"), "--device", "cpu", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    if check and proc.returncode != 0:
        raise AssertionError(f"dpo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.mark.parametrize("loss", ["ipo", "simpo", "kto"])
def test_two_processes_equal_one_and_resume_continues_exactly(tiny, loss):
    d, ckpt = tiny
    records = kto_records(16) if loss == "kto" else pair_records(16)
    data = write_jsonl(d / f"e2e_{loss}.jsonl", records)
    held = write_jsonl(d / f"e2e_{loss}_eval.jsonl", kto_records(6, 1) if loss == "kto" else pair_records(6, 1))
    common = ["--model", str(ckpt), "--data", str(data), "--eval_data", str(held), "--batch_size", "4",
              "--max_steps", "5", "--lr", "1e-2", "--lora_rank", "4", "--pack", "--seq_len", "256", "--loss", loss,
              "--beta", "2.0" if loss == "simpo" else "0.1"]
    run_dpo(common + ["--out", str(d / f"{loss}1"), "--micro_batch_size", "1"])
    run_dpo(common + ["--out", str(d / f"{loss}2"), "--stop_at_step", "2"], nproc=2)
    run_dpo(common + ["--out", str(d / f"{loss}2"), "--resume"], nproc=2)
    one, two = metrics(d / f"{loss}1"), metrics(d / f"{loss}2")
    steps1, steps2 = [r for r in one if "loss" in r], [r for r in two if "loss" in r]
    assert [r["step"] for r in steps1] == [r["step"] for r in steps2] == [1, 2, 3, 4, 5]
    keys = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected") + (("kl",) if loss == "kto" else ())
    for a, b in zip(steps1, steps2):
        for k in keys:
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k)
    if loss == "ipo":
        assert steps1[0]["loss"] == pytest.approx(25.0, abs=1e-4)  # (0 - 1/(2 x 0.1))^2 while policy == reference
    if loss == "kto":
        assert steps1[0]["loss"] == pytest.approx(0.5, abs=1e-6) and steps1[0]["kl"] == 0.0
    assert steps1[-1]["loss"] < steps1[0]["loss"]
    evals = [r for r in one if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 5]
    assert json.loads((d / f"{loss}1" / "config.json").read_text())["loss"] == loss
    assert math.isfinite(evals[-1]["eval_loss"])


def test_full_fine_tuning_kto_precomputes_its_reference_with_the_mismatched_completions(tiny):
    d, ckpt = tiny
    data = write_jsonl(d / "kto_full.jsonl", kto_records(8, 3))
    out = d / "kto_full"
    run_dpo(["--model", str(ckpt), "--data", str(data), "--eval_data", "", "--batch_size", "4", "--max_steps", "2",
             "--loss", "kto", "--lora_rank", "0", "--lr", "1e-3", "--out", str(out)], nproc=2)
    ref = json.loads((out / "reference_logps.json").read_text())
    assert len(ref["train"]) == 8 and all(own < 0 and mismatched < 0 for own, mismatched in ref["train"])
    steps = [r for r in metrics(out) if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-5) and steps[0]["kl"] == 0.0  # reference = start
    assert (out / "final" / "config.json").is_file()
