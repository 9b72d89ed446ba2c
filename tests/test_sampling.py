"""Our logits processors equal Hugging Face's, the sampler draws from the processed distribution, bad args raise."""

import pytest
import torch

from minillama.inference.sampling import (SamplingParams, apply_repetition_penalty, apply_top_k, apply_top_p, next_token,
                                process_logits, sample_from_logits, seen_mask)

lp = pytest.importorskip("transformers.generation.logits_process")

V = 50


def random_logits(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    ids = torch.randint(0, V, (B, 12), generator=g)  # repeats included: a token is penalized once
    return logits, ids


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf(penalty):
    logits, ids = random_logits()
    ref = lp.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    ours = apply_repetition_penalty(logits, seen_mask(ids, V), penalty)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert not torch.equal(ours, logits)


@pytest.mark.parametrize("k", [1, 5, V, V + 10])
def test_top_k_matches_hf(k):
    logits, ids = random_logits()
    logits[0, :6] = 2.5  # ties at the cut are kept, as in HF
    ref = lp.TopKLogitsWarper(k)(ids, logits.clone())
    ours = apply_top_k(logits, k)
    assert torch.equal(ours, ref)
    assert (ours[1] > float("-inf")).sum() == min(k, V)


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.999, 1.0])
def test_top_p_matches_hf(p):
    logits, ids = random_logits(B=8)
    ref = lp.TopPLogitsWarper(p)(ids, logits.clone())
    ours = apply_top_p(logits, p)
    assert torch.equal(ours, ref)
    assert ((ours > float("-inf")).sum(-1) >= 1).all()  # min_tokens_to_keep=1


def test_pipeline_order_matches_hf():
    logits, ids = random_logits(B=6, seed=3)
    params = SamplingParams(temperature=0.7, top_p=0.8, top_k=10, repetition_penalty=1.2)
    procs = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.2), lp.TemperatureLogitsWarper(0.7),
                                    lp.TopKLogitsWarper(10), lp.TopPLogitsWarper(0.8)])
    ref = procs(ids, logits.clone())
    ours = process_logits(logits, params, seen_mask(ids, V))
    torch.testing.assert_close(ours, ref)
    # greedy with a penalty is argmax of the penalized logits (HF's do_sample=False path)
    greedy = next_token(logits, SamplingParams(repetition_penalty=1.2), seen_mask(ids, V))
    assert torch.equal(greedy, lp.RepetitionPenaltyLogitsProcessor(1.2)(ids, logits.clone()).argmax(-1))


def test_sampler_follows_the_processed_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).expand(40000, 6)
    filtered = apply_top_k(logits, 4)
    g = torch.Generator().manual_seed(0)
    draws = sample_from_logits(filtered, g)
    freq = torch.bincount(draws, minlength=6).float() / draws.numel()
    expected = torch.softmax(filtered[0], -1)
    assert freq[4:].sum() == 0  # filtered tokens are never drawn
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


def test_seed_reproduces_samples():
    logits, _ = random_logits(B=16)
    a = sample_from_logits(logits, torch.Generator().manual_seed(7))
    b = sample_from_logits(logits, torch.Generator().manual_seed(7))
    c = sample_from_logits(logits, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
])
def test_bad_sampling_args_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
