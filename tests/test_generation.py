"""Cached batched generation == a plain full-forward loop; rows are independent; stop tokens; seeds; bad args."""

import pytest
import torch

from minillama.inference.engine import Engine, EngineConfig
from minillama.inference.request import Request
from minillama.inference.generate import generate, generate_continuous
from minillama.inference.sampling import SamplingParams, apply_repetition_penalty, seen_mask
from helpers import CountingForward, stop_reason, tiny_model

MOE = {"n_experts": 4, "n_experts_per_tok": 2}


@torch.no_grad()
def reference_greedy(model, prompt, n, penalty=1.0):
    """No cache: rerun the whole sequence every step and take the argmax (optionally after HF's penalty)."""
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]))[:, -1]
        if penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen_mask(torch.tensor([seq]), logits.shape[-1]), penalty)
        seq.append(int(logits.argmax(-1)))
    return seq[len(prompt):]


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("overrides", [{}, MOE])
def test_cached_greedy_equals_full_forward_loop(overrides):
    model = tiny_model(**overrides)
    (p,) = prompts([7])
    out = generate(model, [p], max_new_tokens=10)
    assert out == [reference_greedy(model, p, 10)]


@pytest.mark.parametrize("overrides", [{}, MOE])
def test_batch_of_different_lengths_equals_each_alone(overrides):
    model = tiny_model(**overrides)
    ps = prompts([3, 9, 1])
    batched = generate(model, ps, max_new_tokens=8)
    alone = [generate(model, [p], max_new_tokens=8)[0] for p in ps]
    assert batched == alone
    assert batched[0] == reference_greedy(model, ps[0], 8)  # the padded rows are right, not just consistent


def test_repetition_penalty_generation_equals_reference():
    model = tiny_model()
    (p,) = prompts([5])
    out = generate(model, [p], 16, SamplingParams(repetition_penalty=1.5))
    assert out == [reference_greedy(model, p, 16, penalty=1.5)]
    plain = generate(model, [p], max_new_tokens=16)[0]
    assert len(set(plain)) < len(plain) and len(set(out[0])) == len(out[0])  # it stopped a repeat


def test_stop_tokens_end_each_row_independently():
    model = tiny_model()
    ps = prompts([4, 8, 2])
    full = generate(model, ps, max_new_tokens=12)
    stop = full[1][5]  # row 1 stops at its 6th token; other rows stop at that token wherever it appears
    cut = generate(model, ps, max_new_tokens=12, stop_ids=[stop])
    for row, c in zip(full, cut):
        expect = row[:row.index(stop)] if stop in row else row
        assert c == expect
    assert len(cut[1]) == full[1].index(stop) <= 5
    assert [stop_reason(c, 12) for c in cut] == ["stop" if stop in r else "length" for r in full]


def stream(model, prompts, max_new_tokens, sampling, seed, stop_ids):
    """The engine one step at a time, as the streaming users run it: yields [(row, token), ...] per step."""
    engine = Engine(model, EngineConfig(len(prompts), max(map(len, prompts)) + max_new_tokens, seed=seed))
    for i, p in enumerate(prompts):
        engine.submit(Request(p, max_new_tokens, sampling, frozenset(stop_ids), key=i))
    while engine.busy:
        yield [(ev.request.key, ev.token) for ev in engine.step() if ev.token is not None]


def test_stream_equals_generate():
    model = tiny_model()
    ps = prompts([5, 2, 7])
    stop = generate(model, ps, max_new_tokens=10)[0][3]
    kw = dict(max_new_tokens=10, sampling=SamplingParams(0.9, top_k=20, top_p=0.9), stop_ids=[stop])
    rows = [[] for _ in ps]
    for step in stream(model, ps, seed=3, **kw):
        for b, t in step:
            rows[b].append(t)
    assert rows == generate(model, ps, config=EngineConfig(seed=3), **kw)


def test_seed_reproduces_sampled_output():
    model = tiny_model()
    ps = prompts([4, 6])
    kw = dict(max_new_tokens=16, sampling=SamplingParams(1.5, top_p=0.95))
    a = generate(model, ps, config=EngineConfig(seed=11), **kw)
    assert a == generate(model, ps, config=EngineConfig(seed=11), **kw)
    assert a != generate(model, ps, config=EngineConfig(seed=12), **kw)


def test_cache_is_reused_and_grown():
    model = tiny_model()
    model.setup_cache(4, 40)
    cache = model.layers[0].attention.cache
    (p,) = prompts([5])
    out = generate(model, [p], max_new_tokens=8)
    assert model.layers[0].attention.cache is cache  # big enough: no new allocation
    assert generate(model, [p] * 5, max_new_tokens=8) == out * 5  # more rows: a new cache
    assert model.layers[0].attention.cache.k.shape[0] == 5


def test_truncate_left_keeps_the_last_tokens():
    model = tiny_model()
    (p,) = prompts([60])
    with pytest.raises(ValueError, match="truncate_left"):
        generate(model, [p], max_new_tokens=8)
    out = generate(model, [p], max_new_tokens=8, truncate_left=True)
    assert out == generate(model, [p[-56:]], max_new_tokens=8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
    (dict(top_k=-3), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=64), "max_new_tokens"),
    (dict(max_new_tokens=10, max_seq_len=100), "context"), (dict(prompts=[[]]), "empty"),
    (dict(prompts=[[1, 256]]), "outside"), (dict(prompts=[]), "non-empty"),
])
def test_bad_arguments_raise(kwargs, match):
    model = tiny_model()
    args = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    knobs = {k: args.pop(k) for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in args}
    with pytest.raises(ValueError, match=match):
        generate(model, sampling=SamplingParams(**knobs), **args)
    with pytest.raises(ValueError, match=match):  # the iterator checks before the first step, not lazily
        generate_continuous(model, sampling=SamplingParams(**knobs), **args)


def test_compiled_decode_equals_eager():
    """compile=True: the torch.compile'd one-token step over the fixed cache gives the eager tokens."""
    model = tiny_model()
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    assert generate(model, prompts, 8, config=EngineConfig(compile=True)) == generate(model, prompts, 8)
    ps = prompts + [[4, 4], [9, 8, 7, 6, 5, 4]]  # continuous batching: per-row slots, rows refilled
    assert (sorted(generate_continuous(model, ps, 8, config=EngineConfig(batch_size=2, compile=True)))
            == sorted(generate_continuous(model, ps, 8, config=EngineConfig(batch_size=2))))


@pytest.mark.parametrize("overrides", [{}, MOE])
def test_continuous_batching_equals_each_prompt_alone(overrides):
    model = tiny_model(**overrides)
    ps = prompts([3, 9, 2, 12, 5, 7, 4])
    full = [generate(model, [p], 10)[0] for p in ps]
    stop = full[0][2]  # row 0 stops after 2 tokens; others wherever this token comes up
    for max_new, stop_ids in ((10, [stop]), (4, [])):
        alone = [generate(model, [p], max_new, stop_ids=stop_ids)[0] for p in ps]
        counter = CountingForward(model)
        finished = list(generate_continuous(model, ps, max_new, stop_ids=stop_ids,
                                            config=EngineConfig(batch_size=3, prefill_rows=1)))
        del model.forward
        assert sorted(i for i, _, _ in finished) == list(range(7))
        if stop_ids:  # prompt 0's answer stops after 2 tokens and is the first to come back
            assert finished[0] == (0, alone[0], "stop") and len(alone[0]) == 2
        for i, new, reason in finished:
            assert new == alone[i], (max_new, i)
            assert reason == stop_reason(alone[i], max_new)
        prefills = [c for c in counter.calls if c[1] > 1]
        decodes = [c for c in counter.calls if c[1] == 1]
        assert prefills == [(1, len(p)) for p in ps]  # each prompt prefilled alone, in order: 7 > ceil(7/3)
        assert all(c == (3, 1) for c in decodes)  # one decode step for all rows at a time
        first_decode = counter.calls.index((3, 1))
        assert sum(c[1] > 1 for c in counter.calls[first_decode:]) == 7 - 3  # refills between decode steps
        # batches of 3 that wait for their longest answer would need at least this many decode steps
        static = sum(max(len(alone[i]) for i in range(s, min(s + 3, 7))) - 1 for s in range(0, 7, 3))
        assert len(decodes) < static or max_new == 4  # (with every answer 4 tokens long there is nothing to gain)
    assert [i for i, _, _ in finished] == list(range(7))  # equal lengths finish in input order


def test_continuous_batching_sampling_is_seeded_and_repetition_penalty_matches():
    model = tiny_model()
    ps = prompts([4, 6, 3, 8])
    kw = dict(max_new_tokens=8, sampling=SamplingParams(1.5, top_p=0.95))
    a = sorted(generate_continuous(model, ps, config=EngineConfig(batch_size=2, seed=11), **kw))
    assert a == sorted(generate_continuous(model, ps, config=EngineConfig(batch_size=2, seed=11), **kw))
    assert a != sorted(generate_continuous(model, ps, config=EngineConfig(batch_size=2, seed=12), **kw))
    got = sorted(generate_continuous(model, ps, 12, SamplingParams(repetition_penalty=1.5),
                                     config=EngineConfig(batch_size=3)))
    assert [n for _, n, _ in got] == [generate(model, [p], 12, SamplingParams(repetition_penalty=1.5))[0] for p in ps]
    with pytest.raises(ValueError, match="batch_size"):
        generate_continuous(model, ps, 8, config=EngineConfig(batch_size=0))
    with pytest.raises(ValueError, match="empty"):
        generate_continuous(model, [[1], []], 8, config=EngineConfig(batch_size=2))
