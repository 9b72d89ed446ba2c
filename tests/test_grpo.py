"""GRPO: advantages and loss equal TRL's GRPOTrainer at step 0 on the same batch; the shipped rewards; rollouts come
from the current weights; train/grpo.py raises the reward of a preferred token within a few steps and resumes
exactly."""

import json
import os
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from minillama.checkpoints import load_model
from minillama.lora.layers import apply_lora, lora_parameters
from minillama.tokenizer.tokenizer import load_tokenizer
from minillama.training.grpo import (GRPO, GRPOConfig, LossTerms, Prompt, TokenLogprobs, completion_tokens,
                                     group_advantages, grpo_token_loss, reduce_loss)
from minillama.training.rewards import REVIEW_HEADINGS, exact_answer, format_reward, load_rewards
from sft_helpers import REPO, free_port, metrics, tiny_checkpoint, write_jsonl

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    return d, tiny_checkpoint(d / "model")


def trl_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """TRL's GRPOTrainer._generate_and_score_completions, scale_rewards="group", as its source reads."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, group), dim=1).repeat_interleave(group, dim=0)
    std = nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group, dim=0)
    return (rewards - mean) / (std + 1e-4)


def trl_loss(logps, old, ref, adv, mask, beta, eps, eps_high, loss_type):
    """TRL's GRPOTrainer._compute_loss on given per-token log-probs (a stub trainer and model that return them)."""
    acc = SimpleNamespace(device="cpu", num_processes=1, sync_gradients=True, gather=lambda x: x,
                          reduce=lambda x, reduction="sum": x, gather_for_metrics=lambda x: x)
    args = SimpleNamespace(use_bias_correction_kl=False, delta=None)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=args, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=acc, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)))
    stub.args.steps_per_generation = 1
    n, t = mask.shape
    inputs = {"prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2),
              "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    loss = trl.GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


def test_advantages_equal_trls_group_normalisation():
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.25, 0.0])  # 3 prompts x G 4
    ours = group_advantages(rewards, 4)
    assert torch.allclose(ours, trl_advantages(rewards, 4), atol=1e-6)
    assert torch.equal(ours[4:8], torch.zeros(4))  # a group that agrees teaches nothing
    assert torch.allclose(group_advantages(rewards, 4, scale=False),
                          rewards - rewards.view(3, 4).mean(1).repeat_interleave(4))


@pytest.mark.parametrize("loss_type,beta,eps_high", [("dapo", 0.04, 0.28), ("grpo", 0.04, 0.2), ("grpo", 0.0, 0.2)])
def test_loss_gradient_kl_and_clip_ratio_equal_trls_compute_loss(loss_type, beta, eps_high):
    torch.manual_seed(0)
    n, t = 6, 5
    mask = torch.ones(n, t)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    old = -torch.rand(n, t) * 3
    ref = old + 0.3 * torch.randn(n, t)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 1.0]), 3)
    base = old + 0.4 * torch.randn(n, t)  # a policy that moved since sampling: some ratios past the clip
    ours_in, trl_in = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    cfg = GRPOConfig(beta=beta, epsilon=0.2, epsilon_high=eps_high, loss_type=loss_type)
    terms = grpo_token_loss(ours_in, old, ref, adv, mask, cfg)
    ours = reduce_loss(terms, mask, loss_type, {"completions": float(n), "completion_tokens": float(mask.sum())})
    theirs, m = trl_loss(trl_in, old, ref, adv, mask, beta, 0.2, eps_high, loss_type)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    ours.backward()
    theirs.backward()
    assert torch.allclose(ours_in.grad, trl_in.grad, atol=1e-7)
    assert (terms.clipped.sum() / mask.sum()).item() == pytest.approx(m["clip_ratio/region_mean"], abs=1e-6)
    assert m["clip_ratio/region_mean"] > 0  # the case exercises the clip
    if beta:
        assert (terms.kl.sum() / mask.sum()).item() == pytest.approx(m["kl"], abs=1e-6)


def test_step_zero_ratio_is_one_so_the_loss_is_beta_kl_minus_mean_advantage():
    """On-policy (logp_old = logp.detach()): nothing is clipped; with beta 0 and dapo the loss is
    -sum(A_i n_i) / sum(n_i), which group-normalised advantages make ~0 for equal lengths."""
    logps = -torch.rand(4, 3)
    adv = group_advantages(torch.tensor([1.0, 0.0, 3.0, 1.0]), 2)
    terms = grpo_token_loss(logps, logps, None, adv, torch.ones(4, 3), GRPOConfig(beta=0.0))
    assert isinstance(terms, LossTerms) and terms.clipped.sum() == 0
    assert reduce_loss(terms, torch.ones(4, 3), "dapo", {"completion_tokens": 12.0}).item() == pytest.approx(
        0.0, abs=1e-6)


def test_format_reward_counts_the_headings_in_order_and_exact_answer_matches_the_answer():
    review = "## Summary\nok\n\n## Strengths\n- a\n\n## Weaknesses\n- b\n\n## Verdict\n8/10."
    assert format_reward(completion=review) == 1.0
    assert format_reward(completion="## Summary\nok\n## Verdict\nfine") == 0.5
    assert format_reward(completion="## Verdict\n## Summary") == 0.25  # out of order: only one counts
    assert format_reward(completion="no headings") == 0.0
    assert format_reward(completion="# A\n# B", headings=["# A", "# B"]) == 1.0
    assert exact_answer(completion="The sum is\n 42 ", answer="42") == 1.0
    assert exact_answer(completion="43", answer="42") == 0.0
    assert exact_answer(completion="Paris", reference="paris") == 1.0 and exact_answer(completion="x") == 0.0
    both = load_rewards("minillama.training.rewards:format_reward,minillama.training.rewards:exact_answer",
                        [1.0, 2.0])
    assert both(completion="## Summary\n## Strengths\n## Weaknesses\n## Verdict", answer="no") == 1.0
    with pytest.raises(ValueError, match="2 reward functions"):
        load_rewards("minillama.training.rewards:format_reward,minillama.training.rewards:exact_answer", [1.0])
    assert REVIEW_HEADINGS[0] == "## Summary"


def test_a_completion_keeps_its_stop_token_only_when_it_stopped():
    assert completion_tokens([5, 6], 4, [9], cut=False) == [5, 6, 9]
    assert completion_tokens([5, 6, 7, 8], 4, [9], cut=False) == [5, 6, 7, 8]  # ran out of tokens
    assert completion_tokens([5, 9, 7, 9], 4, [9], cut=True) == [5, 9]


def test_rollouts_come_from_the_current_weights(tiny):
    d, ckpt = tiny
    torch.manual_seed(0)
    model = load_model(str(ckpt), device="cpu", dtype=torch.float32)
    apply_lora(model, 4, 8.0)
    tok = load_tokenizer(str(ckpt))
    root = TokenLogprobs(model)
    prompts = [Prompt(messages=[{"role": "user", "content": "hi"}],
                      ids=tok.encode_dialog([{"role": "user", "content": "hi"}]))]
    recipe = GRPO(prompts=prompts, rewards=load_rewards("minillama.training.rewards:format_reward"),
                  cfg=GRPOConfig(num_generations=4, max_new_tokens=12), model=model, tok=tok, split=None,
                  device=torch.device("cpu"), pad_id=0)
    first = recipe.sample(root, prompts)
    assert recipe.sample(root, prompts) == first  # same weights, same step: the same draws
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn_like(p) * 2.0)  # the policy moves (B was zero: the adapter now does something)
    assert recipe.sample(root, prompts) != first


def run_grpo(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(REPO / "train" / "grpo.py"), "--device", "cpu", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def prefers_letters(prompt="", completion="", **_):
    """The test's reward: the fraction of the completion's characters that are lowercase ASCII letters (26 of the
    tiny model's 259 byte tokens: about 1 in 10 of a random model's samples, so a group of 8 differs in reward)."""
    return sum("a" <= c <= "z" for c in completion) / max(len(completion), 1)


def test_grpo_raises_the_reward_of_preferred_tokens_and_resumes_exactly(tiny):
    d, ckpt = tiny
    data = write_jsonl(d / "prompts.jsonl", [{"prompt": f"p{i}"} for i in range(8)])
    common = ["--model", str(ckpt), "--data", str(data), "--reward", "test_grpo:prefers_letters", "--batch_size", "4",
              "--num_generations", "8", "--max_new_tokens", "8", "--lora_rank", "8", "--lr", "5e-2",
              "--temperature", "1.0", "--beta", "0.0", "--eval_data", ""]
    run_grpo(common + ["--max_steps", "14", "--out", str(d / "learn")])
    steps = [r for r in metrics(d / "learn") if "reward" in r]
    first, last = [r["reward"] for r in steps[:4]], [r["reward"] for r in steps[-4:]]
    assert sum(last) / 4 > max(first), (first, last)  # the late mean beats even the luckiest early step
    assert all(r["clip_ratio"] == 0.0 for r in steps)  # one optimizer step per rollout: on-policy
    assert (d / "learn" / "grpo.png").is_file() and (d / "learn" / "rollouts.jsonl").is_file()

    short = common + ["--max_steps", "4", "--beta", "0.1"]
    run_grpo(short + ["--out", str(d / "whole")])
    run_grpo(short + ["--out", str(d / "parts"), "--stop_at_step", "2"])
    run_grpo(short + ["--out", str(d / "parts"), "--resume"])
    whole = [r for r in metrics(d / "whole") if "reward" in r]
    parts = [r for r in metrics(d / "parts") if "reward" in r]
    assert [r["step"] for r in parts] == [1, 2, 3, 4]
    for a, b in zip(whole, parts):
        for k in ("loss", "reward", "kl", "grad_norm", "completion_length"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), (k, a["step"])
    assert whole[-1]["kl"] > 0  # the policy left the reference (adapters off)
    json.loads((d / "parts" / "rollouts.jsonl").read_text().splitlines()[0])


def test_two_processes_each_sample_their_own_prompts_in_lockstep(tiny):
    """Under FSDP the ranks' sharded layers gather in lockstep; each rank samples its own share of the prompts
    (rank 0 keeps its 2 prompts x G in rollouts.jsonl) and the run ends normally."""
    d, ckpt = tiny
    data = write_jsonl(d / "prompts2.jsonl", [{"prompt": f"question {i}" + "?" * i} for i in range(8)])
    run_grpo(["--model", str(ckpt), "--data", str(data), "--reward", "test_grpo:prefers_letters", "--batch_size",
              "4", "--num_generations", "3", "--max_new_tokens", "5", "--lora_rank", "4", "--max_steps", "2",
              "--eval_data", "", "--out", str(d / "two")], nproc=2)
    kept = [json.loads(x) for x in (d / "two" / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [1] * 6 + [2] * 6
    assert [r["step"] for r in metrics(d / "two") if "reward" in r] == [1, 2]
