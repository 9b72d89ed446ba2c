"""The Bradley-Terry reward model (train/dpo.py --loss reward): TRL's RewardTrainer loss and metrics, the score HF's
sequence classifier gives, training that learns the preference, 2 processes == 1 with exact resume, and the trained
final/ as a PEFT SEQ_CLS adapter that PEFT loads and that --reward DIR scores with."""

import json
import re
from types import SimpleNamespace

import pytest
import torch

from minillama.training.preference import PrefConfig, _pair_terms, summarize
from minillama.training.preference_data import collate_pairs, load_pairs
from minillama.training.reward_model import RewardModel, RewardScores, add_score_head
from minillama.tokenizer.tokenizer import load_tokenizer
from sft_helpers import metrics, tiny_checkpoint, write_jsonl
from test_dpo import pair_records, run_dpo


def trl_reward_loss(rc, rr, center):
    """TRL's RewardTrainer.compute_loss itself, on a model whose logits are the given scores."""
    from trl.trainer.reward_trainer import RewardTrainer

    class Accelerator:
        gather = gather_for_metrics = staticmethod(lambda t: t)

    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=Accelerator(), _tp_size=1,
                              args=SimpleNamespace(center_rewards_coefficient=center), _total_train_tokens=0,
                              _metrics={"train": {k: [] for k in ("num_tokens", "min_reward", "mean_reward",
                                                                  "max_reward", "accuracy", "margin")}})
    logits = torch.cat([rc, rr])[:, None]  # (2n, 1): chosen first, as TRL's collator stacks them
    loss = RewardTrainer.compute_loss(trainer, lambda **_: SimpleNamespace(logits=logits),
                                      {"attention_mask": torch.ones(2 * len(rc), 3, dtype=torch.long)})
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items() if v}


@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_and_metrics_equal_trls_reward_trainer(center):
    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(6, generator=g), torch.randn(6, generator=g)
    want, trl = trl_reward_loss(rc, rr, center)
    cfg = PrefConfig(loss="reward", center_rewards=center or 0.0)
    scores = torch.stack([rc, rr], 1).reshape(-1)  # chosen at even, rejected at odd positions
    objective, sums = _pair_terms(cfg, scores, torch.ones(12), None, 6.0, 1.0)
    out = summarize(sums, 6, 1, cfg)
    assert objective.item() == pytest.approx(want.item(), abs=1e-6) and out["loss"] == pytest.approx(want.item())
    assert out["rewards/accuracies"] == pytest.approx(trl["accuracy"])
    assert out["rewards/margins"] == pytest.approx(trl["margin"], abs=1e-6)
    assert out["pref_accuracy"] == out["rewards/accuracies"] and not any(k.startswith("logps/") for k in out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    return d, tiny_checkpoint(d / "dense")


def hf_score(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_each_answers_score_in_a_packed_row_equals_hfs_sequence_classifier_on_it_alone(tiny):
    from minillama.checkpoints import load_model
    from transformers import AutoModelForSequenceClassification

    d, ckpt = tiny
    tok = load_tokenizer(ckpt)
    pairs, _ = load_pairs(write_jsonl(d / "pairs.jsonl", pair_records(3)), tok, 512)
    torch.manual_seed(0)
    model = load_model(ckpt)
    head = add_score_head(model)
    root = RewardScores(model)
    mb = collate_pairs(pairs, [[0, 1, 2]], pad_id=0)  # three pairs packed in one row, six documents
    scores, _, _ = root(tokens=mb.tokens, targets=mb.targets, doc_ids=mb.doc_ids, doc_index=mb.doc_index,
                        n_docs=2 * mb.n_pairs)
    hf = AutoModelForSequenceClassification.from_pretrained(ckpt, num_labels=1, torch_dtype=torch.float32).eval()
    hf.score.weight.data.copy_(head.weight.data)
    want = []
    for p in pairs:
        for side in (p.chosen, p.rejected):
            end = max(i for i, learned in enumerate(side.mask) if learned)  # the answer's last token
            want.append(hf_score(hf, side.ids[:end + 1]))
    torch.testing.assert_close(scores, torch.tensor(want), rtol=1e-4, atol=1e-5)


def test_reward_model_learns_the_preference_two_processes_equal_one_and_peft_loads_it(tiny):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    from minillama.training.rewards import load_rewards

    d, ckpt = tiny
    data, held = write_jsonl(d / "train.jsonl", pair_records(16)), write_jsonl(d / "eval.jsonl", pair_records(6, 1))
    common = ["--model", str(ckpt), "--data", str(data), "--eval_data", str(held), "--batch_size", "4",
              "--max_steps", "6", "--lr", "5e-3", "--lora_rank", "4", "--pack", "--seq_len", "256", "--loss", "reward"]
    run_dpo(common + ["--out", str(d / "one"), "--micro_batch_size", "1"])
    run_dpo(common + ["--out", str(d / "two"), "--stop_at_step", "3"], nproc=2)
    run_dpo(common + ["--out", str(d / "two"), "--resume"], nproc=2)
    one, two = metrics(d / "one"), metrics(d / "two")
    steps1, steps2 = [r for r in one if "loss" in r], [r for r in two if "loss" in r]
    assert len(steps2) == 6
    for a, b in zip(steps1, steps2):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), k  # float32 sums in another order
    evals = [r for r in one if "eval_loss" in r]
    assert evals[-1]["eval_rewards/accuracies"] > evals[0]["eval_rewards/accuracies"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and evals[-1]["eval_rewards/margins"] > 0

    final = d / "one" / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    rm = RewardModel(final, device="cpu")
    hf = AutoModelForSequenceClassification.from_pretrained(ckpt, num_labels=1, torch_dtype=torch.float32)
    hf = PeftModel.from_pretrained(hf, str(final)).eval()
    reward = load_rewards(f"{final},minillama.training.rewards:format_reward")
    items = [(rec["prompt"], answer) for rec in pair_records(5, 3) for answer in (rec["chosen"], rec["rejected"])]
    alone = [rm(prompt=q, completion=a) for q, a in items]
    assert rm.batch(items, max_tokens=150) == pytest.approx(alone, abs=1e-5)  # padded forwards of 2-3 rows each
    assert [s[0] for s in reward.scores_many([(q, a, None, {}) for q, a in items])] == pytest.approx(alone, abs=1e-5)
    for rec in pair_records(3, 2):
        for answer in (rec["chosen"], rec["rejected"]):
            ids, end = rm.encode(rec["prompt"], answer)
            ours = rm(prompt=rec["prompt"], completion=answer)
            with torch.no_grad():
                assert ours == pytest.approx(hf_score(hf, ids[:end + 1]), rel=1e-4, abs=1e-5)
            assert reward.scores(rec["prompt"], answer, None, {})[0] == pytest.approx(ours, abs=1e-6)
        assert rm(prompt=rec["prompt"], completion=rec["chosen"]) > rm(prompt=rec["prompt"], completion=rec["rejected"])


def test_reward_flags_are_checked_before_loading(tiny):
    import subprocess
    import sys
    from sft_helpers import REPO
    from test_bad_inputs import load_script

    d, ckpt = tiny
    dpo = load_script(REPO / "train" / "dpo.py", "dpo_script")
    base = ["--model", str(d / "missing"), "--out", str(d / "bad"), "--device", "cpu"]
    for flags, says in ((["--loss", "reward", "--lora_rank", "0"], "--lora_rank > 0"),
                        (["--loss", "reward", "--eval_generate", "2"], "generates none"),
                        (["--loss", "reward", "--center_rewards", "-1"], "must be >= 0"),
                        (["--center_rewards", "0.1"], "is the reward model's (--loss reward)")):
        with pytest.raises(ValueError, match=re.escape(says)):
            dpo.parse_args(base + flags)
    proc = subprocess.run([sys.executable, str(REPO / "train" / "dpo.py"), *base, "--loss", "reward", "--lora_rank",
                           "0"], capture_output=True, text=True, timeout=120)  # as the user sees it: one line
    assert proc.returncode != 0 and proc.stderr.splitlines()[0].startswith("error: --loss reward trains LoRA")
    assert "Traceback" not in proc.stderr
    with pytest.raises(ValueError, match="no adapter_config"):
        RewardModel(ckpt)
