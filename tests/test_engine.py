"""engine.Engine: requests that join a running batch, per-request sampling, cancel, prefix reuse, per-row adapters."""

import pytest
import torch

from minillama.inference.engine import Engine, EngineConfig
from minillama.inference.request import Request
from minillama.inference.generate import generate
from minillama.inference.sampling import SamplingParams
from helpers import CountingForward, tiny_model


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def run_all(engine: Engine) -> dict:
    """Step until idle; key -> (output, finish)."""
    done = {}
    while engine.busy:
        for ev in engine.step():
            if ev.finish is not None:
                done[ev.request.key] = (list(ev.request.output), ev.finish)
    return done


def solo(model, p, n, params=None, seed=None):
    """The request alone in a batch of one (its own generator when seeded)."""
    engine = Engine(model, EngineConfig(1, 64))
    engine.submit(Request(p, n, params or SamplingParams(), seed=seed, key=0))
    return run_all(engine)[0][0]


def test_requests_joining_between_steps_equal_each_alone():
    model = tiny_model(std=0.3)
    ps = prompts([3, 9, 5, 7, 4])
    alone = [generate(model, [p], 8)[0] for p in ps]
    engine = Engine(model, EngineConfig(3, 64, fixed_batch=False))
    engine.submit(Request(ps[0], 8, key=0))
    done, step = {}, 0
    while engine.busy or step < 4:
        if step < 4:  # one more request joins at each of the first steps, while others are mid-answer
            engine.submit(Request(ps[step + 1], 8, key=step + 1))
        for ev in engine.step():
            if ev.finish is not None:
                done[ev.request.key] = ev.request.output
        step += 1
    assert [done[i] for i in range(5)] == alone


def test_per_request_sampling_and_seeds_do_not_depend_on_the_batch():
    model = tiny_model(std=0.3)
    ps = prompts([4, 6, 5, 3])
    hot = SamplingParams(1.2, top_p=0.95, top_k=40)
    reqs = [Request(ps[0], 10, key=0),  # greedy
            Request(ps[1], 10, hot, seed=5, key=1),
            Request(ps[2], 10, SamplingParams(0.8), seed=9, key=2),
            Request(ps[3], 10, SamplingParams(repetition_penalty=1.5), key=3)]
    engine = Engine(model, EngineConfig(4, 64))
    for r in reqs:
        engine.submit(r)
    done = run_all(engine)
    assert done[0][0] == generate(model, [ps[0]], 10)[0]
    assert done[1][0] == solo(model, ps[1], 10, hot, seed=5)  # its own generator: same draws in any company
    assert done[2][0] == solo(model, ps[2], 10, SamplingParams(0.8), seed=9)
    assert done[3][0] == generate(model, [ps[3]], 10, SamplingParams(repetition_penalty=1.5))[0]
    assert done[1][0] != solo(model, ps[1], 10, hot, seed=6)


def test_cancel_frees_the_row_for_the_next_request():
    model = tiny_model(std=0.3)
    ps = prompts([5, 6, 4])
    engine = Engine(model, EngineConfig(2, 64))
    for i, p in enumerate(ps):
        engine.submit(Request(p, 20, key=i))
    engine.step()
    assert engine.n_running == 2 and len(engine.waiting) == 1
    cancelled = engine.cancel(0)
    assert cancelled.finish == "cancelled" and engine.n_running == 1
    engine.step()  # request 2 takes the freed row at once
    assert engine.rows[0].key == 2 and not engine.waiting
    done = run_all(engine)
    assert done[1][0] == generate(model, [ps[1]], 20)[0] and done[2][0] == generate(model, [ps[2]], 20)[0]
    assert engine.cancel(99) is None


def test_prefix_reuse_prefills_only_the_new_turn_and_equals_prefilling_it_all():
    model = tiny_model(std=0.3, max_seq_len=128)
    turn1 = prompts([12])[0]
    engine = Engine(model, EngineConfig(2, 128, reuse_prefix=True))
    engine.submit(Request(turn1, 6, key="t1"))
    answer1 = run_all(engine)["t1"][0]
    turn2 = turn1 + answer1 + prompts([5], seed=3)[0]  # the conversation so far + a new message
    counter = CountingForward(model)
    engine.submit(Request(turn2, 8, key="t2"))
    reused = run_all(engine)["t2"][0]
    del model.forward
    # the row held the prompt and every answer token fed back (all but the last): the prefill is the rest
    assert counter.calls[0] == (1, len(turn2) - (len(turn1) + len(answer1) - 1))
    assert engine.rows == [None, None]
    assert reused == generate(model, [turn2], 8)[0]
    other = prompts([9], seed=4)[0]  # nothing in common: prefilled in full
    engine.submit(Request(other, 4, key="o"))
    counter = CountingForward(model)
    assert run_all(engine)["o"][0] == generate(model, [other], 4)[0]
    del model.forward
    assert counter.calls[0] == (1, len(other))


def test_reserve_grows_the_cache_and_keeps_the_cached_prefix():
    model = tiny_model(std=0.3, max_seq_len=256)
    engine = Engine(model, EngineConfig(1, 32, reuse_prefix=True))
    p = prompts([10])[0]
    engine.submit(Request(p, 8, key=0))
    first = run_all(engine)[0][0]
    longer = p + first + prompts([30], seed=5)[0]
    engine.reserve(len(longer) + 8)
    assert model.cache_len >= len(longer) + 8
    req = engine.submit(Request(longer, 8, key=1))
    assert run_all(engine)[1][0] == generate(model, [longer], 8)[0]
    assert req.cached_tokens == len(p) + len(first) - 1


def test_row_adapter_hook_sees_each_forwards_rows_and_unmixed_batches_wait():
    model = tiny_model(std=0.3)
    seen = []
    engine = Engine(model, EngineConfig(3, 64, mix_adapters=False, prefill_rows=1),
                    row_adapters=lambda m, names: seen.append(list(names)))
    ps = prompts([4, 5, 6])
    engine.submit(Request(ps[0], 3, adapter="a", key=0))
    engine.submit(Request(ps[1], 3, adapter="a", key=1))
    engine.submit(Request(ps[2], 3, adapter=None, key=2))  # the base model: waits for the "a" rows to finish
    engine.step()  # two prefills, and the first tokens returned before their decode forward
    assert engine.n_running == 2 and len(engine.waiting) == 1
    assert seen == [["a"], ["a"]]
    engine.step()
    assert seen[:3] == [["a"], ["a"], ["a", "a", None]]  # then the decode forward's rows
    run_all(engine)
    assert ["a"] not in seen[seen.index([None]):]  # request 2 was prefilled after rows 0 and 1 ended
    mixed = Engine(model, EngineConfig(3, 64, prefill_rows=1), row_adapters=lambda m, names: seen.append(list(names)))
    for i, p in enumerate(ps):
        mixed.submit(Request(p, 3, adapter=["a", None, "b"][i], key=i))
    seen.clear()
    mixed.step()
    mixed.step()
    assert seen[:4] == [["a"], [None], ["b"], ["a", None, "b"]]


def test_submit_rejects_a_prompt_that_does_not_fit():
    engine = Engine(tiny_model(), EngineConfig(1, 16))
    with pytest.raises(ValueError, match="does not fit"):
        engine.submit(Request(list(range(10)), 8))


def test_a_step_returns_its_tokens_before_feeding_them_and_a_cancelled_row_is_not_fed():
    model = tiny_model(std=0.3)
    ps = prompts([5, 6])
    engine = Engine(model, EngineConfig(2, 64, fixed_batch=False))
    for i, p in enumerate(ps):
        engine.submit(Request(p, 6, key=i))
    events = engine.step()
    assert [ev.token for ev in events] == [generate(model, [p], 1)[0][0] for p in ps]  # the first tokens ...
    assert engine.stats["decode_steps"] == 0  # ... out before any decode forward
    held = [len(r.held) for r in engine.slots]
    engine.cancel(0)
    engine.step()  # feeds row 1's token; row 0's request is gone, so its token is not written or recorded
    assert engine.stats["decode_steps"] == 1
    assert len(engine.slots[0].held) == held[0] and len(engine.slots[1].held) == held[1] + 1
    assert run_all(engine)[1][0] == generate(model, [ps[1]], 6)[0]


def test_a_new_request_takes_the_lowest_free_row_and_copies_its_prefix_from_another():
    model = tiny_model(std=0.3)
    shared = prompts([12], seed=3)[0]
    a, b, c = (shared + q for q in prompts([3, 4, 5], seed=4))
    engine = Engine(model, EngineConfig(3, 64, fixed_batch=False, reuse_prefix=True))
    engine.submit(Request(a, 2, key="a"))
    engine.submit(Request(b, 9, key="b"))
    engine.step()
    engine.step()  # "a" ends after its 2 tokens: row 0 is free, row 1 busy, row 2 never used
    assert engine.rows[0] is None and engine.rows[1].key == "b"
    req = engine.submit(Request(c, 4, key="c"))
    engine.step()
    assert engine.rows[0] is req  # the lowest free row, so a decode forward runs rows 0..1, not 0..2
    assert req.cached_tokens == len(shared)  # the shared prefix came from row 0's (or 1's) cache, not a prefill
    assert run_all(engine)["c"][0] == generate(model, [c], 4)[0]


def test_a_burst_of_prompts_answers_the_first_ones_before_the_last_are_prefilled():
    model = tiny_model(std=0.3)
    ps = prompts([6, 7, 5, 6, 8, 6])
    engine = Engine(model, EngineConfig(6, 64, fixed_batch=False, prefill_step=12, prefill_chunk=64))
    for i, p in enumerate(ps):
        engine.submit(Request(p, 5, key=i))
    first = engine.step()
    assert [ev.request.key for ev in first] == [0]  # 12 prompt tokens: prompt 0 whole, prompt 1 begun
    assert engine.stats["prefilled"] == 12 and engine.stats["decode_steps"] == 0
    firsts = {ev.request.key for ev in first}
    while len(firsts) < len(ps):  # no decode forward until every prompt is in (64 tokens allowed)
        firsts |= {ev.request.key for ev in engine.step()}
        assert engine.stats["decode_steps"] == 0
    done = run_all(engine)
    assert {k: v[0] for k, v in done.items()} == {i: solo(model, p, 5) for i, p in enumerate(ps)}


def test_a_running_row_waits_for_at_most_prefill_chunk_prompt_tokens_between_two_of_its_tokens():
    model = tiny_model(std=0.3)
    short, long, other = prompts([4, 40, 23], seed=5)
    calls = CountingForward(model)
    engine = Engine(model, EngineConfig(3, 64, fixed_batch=False, prefill_step=4, prefill_chunk=10))
    engine.submit(Request(short, 20, key="running"))
    engine.step()
    engine.submit(Request(long, 3, key="new"))
    engine.submit(Request(other, 3, key="other"))
    waited, done = [], {}
    while engine.busy:
        for ev in engine.step():
            if ev.request.key == "running":
                waited.append(engine.stats["prefilled"])
            if ev.finish is not None:
                done[ev.request.key] = ev.request.output
    gaps = [b - a for a, b in zip(waited, waited[1:])]
    assert max(gaps) == 10 and all(tokens <= 4 for _, tokens in calls.calls[1:])  # the chunk, in steps of 4
    assert done == {"running": solo(model, short, 20), "new": solo(model, long, 3), "other": solo(model, other, 3)}


def test_a_row_whose_token_waits_for_a_prefill_keeps_its_penalty_state():
    model = tiny_model(std=0.3)
    a, b = prompts([4, 3], seed=7)
    params = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5)
    engine = Engine(model, EngineConfig(2, 64, fixed_batch=False, prefill_step=4))
    engine.submit(Request(a, 8, params, key="a"))
    engine.step()
    seen, counts = engine.seen[0].clone(), engine.counts[0].clone()
    engine.submit(Request(b, 8, params, key="b"))
    assert [ev.request.key for ev in engine.step()] == ["b"]  # b's prompt and first pick; a's token waits
    assert engine.stats["decode_steps"] == 0
    assert torch.equal(engine.seen[0], seen) and torch.equal(engine.counts[0], counts)
    done = run_all(engine)
    assert done["a"][0] == solo(model, a, 8, params) and done["b"][0] == solo(model, b, 8, params)
