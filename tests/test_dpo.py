"""Preference tuning: DPO/ORPO losses equal TRL's on fixed log-probs; pair shapes tokenize alike and learn only the
answer; packed pair rows give each answer's log-prob as if alone; train/dpo.py: step 0 with LoRA is ln 2, 2
processes == 1 process, resume == uninterrupted, full fine-tuning's precomputed reference, ORPO."""

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from minillama.training.loss import SequenceLogprobs
from minillama.training.preference import PrefConfig, _pair_terms, dpo_loss, orpo_loss, summarize
from minillama.training.preference_data import collate_pairs, load_pairs, to_pair, tokenize_pair
from minillama.tokenizer.tokenizer import load_tokenizer
from sft_helpers import REPO, free_port, metrics, tiny_checkpoint, write_jsonl, read_safetensors

trl = pytest.importorskip("trl")

PC, PR = torch.tensor([-12.5, -30.0, -7.25, -40.0]), torch.tensor([-14.0, -22.5, -9.0, -41.5])
RC, RR = torch.tensor([-13.0, -28.0, -7.0, -39.0]), torch.tensor([-13.5, -23.0, -8.0, -40.0])


def trl_dpo(pc, pr, rc, rr, beta, loss_type="sigmoid", label_smoothing=0.0):
    """TRL's DPOTrainer._compute_loss on given sequence log-probs (a stub trainer and a model that returns them)."""
    n = len(pc)
    per_token = torch.stack([torch.zeros(2 * n), torch.cat([pc, pr])], dim=1)  # (2n, 2): prompt 0, answer logp
    model = lambda **kw: SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * n, 2),  # noqa: E731
                                         mean_logits=torch.zeros(2 * n, 2), is_top1=torch.zeros(2 * n, 2).bool())
    acc = SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                           use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * n, 3, dtype=torch.long), "attention_mask": torch.ones(2 * n, 3),
              "completion_mask": torch.tensor([[0, 0, 1]] * (2 * n)), "ref_chosen_logps": rc,
              "ref_rejected_logps": rr}
    loss = trl.DPOTrainer._compute_loss(stub, model, inputs, False)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


def test_dpo_loss_and_rewards_equal_trl_on_fixed_logprobs():
    loss, m = trl_dpo(PC, PR, RC, RR, beta=0.1)
    cfg = PrefConfig("dpo", beta=0.1)
    sums = torch.stack([PC, PR], dim=1).reshape(-1)
    ref = torch.stack([RC, RR], dim=1).reshape(-1)
    objective, sums_m = _pair_terms(cfg, sums, torch.ones(8), ref, 4.0, 1.0)
    ours = summarize(sums_m, 4, 0, cfg)
    assert objective.item() == pytest.approx(loss.item(), abs=1e-7)
    assert ours["loss"] == pytest.approx(loss.item(), abs=1e-7)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
        assert ours[k] == pytest.approx(m[k], abs=1e-6), k
    # by hand: pair 0 has delta = (-12.5 + 13) - (-14 + 13.5) = 1.0
    assert dpo_loss(PC[:1], PR[:1], RC[:1], RR[:1], 0.1)[0].item() == pytest.approx(math.log1p(math.exp(-0.1)))


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_dpo_label_smoothing_equals_trls_conservative_form(eps):
    """cDPO: -(1-eps) log sig(b d) - eps log sig(-b d); TRL 1.x spells it in its aot losses (per single pair)."""
    for i in range(4):
        want, _ = trl_dpo(PC[i:i + 1], PR[i:i + 1], RC[i:i + 1], RR[i:i + 1], 0.5, "aot_unpaired", eps)
        got = dpo_loss(PC[i:i + 1], PR[i:i + 1], RC[i:i + 1], RR[i:i + 1], 0.5, eps)[0]
        assert got.item() == pytest.approx(want.item(), abs=1e-7)
        d = 0.5 * ((PC[i] - RC[i]) - (PR[i] - RR[i])).item()
        hand = -(1 - eps) * math.log(1 / (1 + math.exp(-d))) - eps * math.log(1 / (1 + math.exp(d)))
        assert got.item() == pytest.approx(hand, abs=1e-6)


def test_orpo_loss_equals_trl():
    from trl.experimental.orpo import ORPOTrainer
    n_tok = torch.tensor([5.0, 7.0, 3.0, 9.0, 4.0, 4.0, 10.0, 8.0])  # chosen/rejected answer lengths
    sums = torch.stack([PC, PR], dim=1).reshape(-1) / 10  # mean log-probs stay in (-inf, 0)
    lc, lr = sums[0::2] / n_tok[0::2], sums[1::2] / n_tok[1::2]
    stub = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    losses, cr, rr, ratio, log_odds = ORPOTrainer.odds_ratio_loss(stub, lc, lr)
    terms, ours_cr, ours_rr, ours_log_odds = orpo_loss(lc, lr, 0.25)
    torch.testing.assert_close(terms, losses)
    torch.testing.assert_close(ours_cr, cr)
    torch.testing.assert_close(ours_log_odds.mean(), log_odds)
    nll = -sums[0::2].sum() / n_tok[0::2].sum()  # TRL: mean token cross-entropy of the chosen answers
    cfg = PrefConfig("orpo", orpo_lambda=0.25)
    objective, m = _pair_terms(cfg, sums, n_tok, None, 4.0, n_tok[0::2].sum().item())
    assert objective.item() == pytest.approx((nll - losses.mean()).item(), abs=1e-6)
    assert summarize(m, 4, n_tok[0::2].sum().item(), cfg)["loss"] == pytest.approx(
        objective.item(), abs=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    return d, tiny_checkpoint(d / "dense")


def test_pair_shapes_give_the_same_samples_and_learn_only_the_answer(tiny):
    _, ckpt = tiny
    tok = load_tokenizer(ckpt)
    sys_user = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi there"}]
    shapes = [{"messages": sys_user, "chosen": "hello!", "rejected": {"role": "assistant", "content": "go away"}},
              {"prompt": sys_user, "chosen": [{"role": "assistant", "content": "hello!"}], "rejected": "go away"},
              {"chosen": sys_user + [{"role": "assistant", "content": "hello!"}],
               "rejected": sys_user + [{"role": "assistant", "content": "go away"}]}]
    encoded = [tokenize_pair(tok, *to_pair(r)[1:], 512) for r in shapes]
    assert all(e == encoded[0] for e in encoded)
    (c_ids, c_mask), (r_ids, r_mask), how = encoded[0]
    assert how == "ok" and tok.decode([t for t, m in zip(c_ids, c_mask) if m]).startswith("hello!")
    assert c_ids[:c_mask.index(True)] == r_ids[:r_mask.index(True)]  # the same prompt on both sides
    assert c_ids[:c_mask.index(True)] == tok.encode_dialog(sys_user)  # everything before the answer is prompt
    long = {"prompt": "x " * 300, "chosen": "yes", "rejected": "no"}
    (c_ids, c_mask), (r_ids, _), how = tokenize_pair(tok, *to_pair(long)[1:], 200)
    assert how == "prompt_cut" and len(c_ids) + len(r_ids) <= 200 and tok.decode(
        [t for t, m in zip(c_ids, c_mask) if m]).startswith("yes")
    with pytest.raises(ValueError, match="share no leading turn"):
        to_pair({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]})
    with pytest.raises(ValueError, match="needs 'chosen' and 'rejected'"):
        to_pair({"prompt": "a", "chosen": "b"})


def test_bad_pair_lines_are_skipped_with_their_line_and_reason(tiny):
    """Not UTF-8, not JSON, not a pair: each is reported as (line, reason) and the good pairs load."""
    d, ckpt = tiny
    tok = load_tokenizer(ckpt)
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}).encode()
    (d / "bad.jsonl").write_bytes(b"\n".join([good, b"\xff\xfe", b"{not json", b'{"prompt": "a"}', b"", good]) + b"\n")
    pairs, stats = load_pairs(d / "bad.jsonl", tok, 512)
    assert len(pairs) == 2 and [n for n, _ in stats.bad] == [2, 3, 4]
    assert stats.bad[0][1] == "not valid UTF-8" and stats.bad[1][1].startswith("not valid JSON")
    with pytest.raises(ValueError, match=r"--eval_data .*no usable preference pairs"):
        (d / "none.jsonl").write_bytes(b"\xff\n")
        load_pairs(d / "none.jsonl", tok, 512, flag="--eval_data")


def test_packed_pair_rows_give_each_answers_logprob_as_if_alone(tiny):
    d, ckpt = tiny
    from minillama import load_model
    tok = load_tokenizer(ckpt)
    data = write_jsonl(d / "p.jsonl", [{"prompt": f"q{i} " * (i + 1), "chosen": "yes " * (i + 1), "rejected": "no"}
                                       for i in range(3)] + ["not json"])
    pairs, stats = load_pairs(data, tok, 512)
    assert len(pairs) == 3 and stats.bad[0][0] == 4
    model = load_model(ckpt)
    root = SequenceLogprobs(model)
    mb = collate_pairs(pairs, [[0, 2], [1]], pad_id=0)  # two pairs packed in row 0, one in row 1
    assert mb.pair_ids == [0, 2, 1]
    with torch.no_grad():
        sums, _, _ = root(mb.tokens, mb.targets, mb.doc_ids, mb.doc_index, 6, mb.real)
        for k, i in enumerate(mb.pair_ids):
            for j, s in enumerate((pairs[i].chosen, pairs[i].rejected)):
                logits = model(torch.tensor([s.ids]))[0].log_softmax(-1)
                t = torch.tensor(s.targets())
                alone = logits[(t != -100)].gather(1, t[t != -100][:, None]).sum()
                assert sums[2 * k + j].item() == pytest.approx(alone.item(), abs=1e-4)


def run_dpo(args, nproc=1, check=True):
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(REPO / "train" / "dpo.py"), "--device", "cpu", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    if check and proc.returncode != 0:
        raise AssertionError(f"dpo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def pair_records(n, seed=0):
    import random
    rng = random.Random(seed)
    words = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "fish"]
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))
        out.append({"prompt": f"q{i}: {q}", "chosen": f"yes, {q}", "rejected": f"no {rng.choice(words)}"})
    return out


def test_dpo_lora_starts_at_ln2_two_processes_equal_one_and_resume_continues_exactly(tiny):
    d, ckpt = tiny
    data, held = write_jsonl(d / "train.jsonl", pair_records(16)), write_jsonl(d / "eval.jsonl", pair_records(6, 1))
    common = ["--model", str(ckpt), "--data", str(data), "--eval_data", str(held), "--batch_size", "4",
              "--max_steps", "6", "--lr", "1e-2", "--lora_rank", "4", "--pack", "--seq_len", "256"]
    run_dpo(common + ["--out", str(d / "one"), "--micro_batch_size", "1"])
    run_dpo(common + ["--out", str(d / "two"), "--stop_at_step", "3"], nproc=2)
    run_dpo(common + ["--out", str(d / "two"), "--resume"], nproc=2)
    one, two = metrics(d / "one"), metrics(d / "two")
    steps1, steps2 = [r for r in one if "loss" in r], [r for r in two if "loss" in r]
    assert steps1[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: delta = 0
    assert steps1[0]["rewards/margins"] == 0.0 and len(steps2) == 6
    for a, b in zip(steps1, steps2):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "grad_norm"):
            assert a[k] == pytest.approx(b[k], abs=1e-5), k
    assert steps1[-1]["loss"] < 0.5 and steps1[-1]["rewards/margins"] > 0
    evals = [r for r in one if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 6] and evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["eval_rewards/accuracies"] > evals[0]["eval_rewards/accuracies"]
    assert (d / "one" / "loss.png").is_file() and (d / "two" / "final" / "adapter_config.json").is_file()


def test_full_dpo_precomputes_its_reference_and_orpo_trains_without_one(tiny):
    d, ckpt = tiny
    data = write_jsonl(d / "train2.jsonl", pair_records(8, 2))
    common = ["--model", str(ckpt), "--data", str(data), "--eval_data", "", "--batch_size", "4", "--max_steps", "3"]
    run_dpo(common + ["--out", str(d / "full"), "--lora_rank", "0", "--lr", "1e-3"], nproc=2)
    ref = json.loads((d / "full" / "reference_logps.json").read_text())
    assert len(ref["train"]) == 8 and all(c < 0 and r < 0 for c, r in ref["train"])
    steps = [r for r in metrics(d / "full") if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the reference is the starting model
    assert (d / "full" / "final" / "config.json").is_file()  # an HF model
    run_dpo(common + ["--out", str(d / "orpo"), "--loss", "orpo", "--lora_rank", "4", "--lr", "1e-2"])
    steps = [r for r in metrics(d / "orpo") if "loss" in r]
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/margins"} <= steps[0].keys()
    assert steps[-1]["loss"] < steps[0]["loss"] and not (d / "orpo" / "reference_logps.json").exists()
    bad = run_dpo(common + ["--out", str(d / "bad"), "--loss", "orpo", "--label_smoothing", "0.1"], check=False)
    assert bad.returncode == 1 and "--label_smoothing is DPO's" in bad.stderr


def test_a_run_started_from_an_adapter_takes_it_as_the_reference(tiny):
    # DPO after SFT: --init_adapter starts the policy from the SFT adapter and makes that adapter (frozen) the
    # reference, so the first step has policy == reference (loss ln 2, margins 0) although the adapter moved the
    # model away from the base; with the base as reference the first loss would differ from ln 2.
    d, ckpt = tiny
    data = write_jsonl(d / "init.jsonl", pair_records(8, 2))
    common = ["--model", str(ckpt), "--data", str(data), "--batch_size", "4", "--lora_rank", "4",
              "--lora_alpha", "8", "--pack", "--seq_len", "256"]
    run_dpo(common + ["--out", str(d / "sftish"), "--max_steps", "4", "--lr", "5e-2"])
    first = metrics(d / "sftish")
    assert abs([r for r in first if "loss" in r][-1]["rewards/margins"]) > 1e-3  # the adapter moved the policy
    run_dpo(common + ["--out", str(d / "cont"), "--max_steps", "2", "--lr", "1e-2",
                      "--init_adapter", str(d / "sftish" / "final")])
    steps = [r for r in metrics(d / "cont") if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and steps[0]["rewards/margins"] == 0.0
    assert steps[1]["rewards/margins"] != 0.0  # and it trains from there
    saved = read_safetensors(d / "cont" / "final")
    assert saved.keys() == read_safetensors(d / "sftish" / "final").keys()  # the trained adapter, not the reference
