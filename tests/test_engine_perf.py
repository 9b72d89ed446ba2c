"""The engine's performance paths change cost, never tokens: decode reads follow the live context, prompts prefill
together and in chunks, shared prefixes are copied, speculative decoding is exact (greedy) or keeps the target
distribution (sampling)."""

import pytest
import torch

import minillama.model as model_module
from minillama.inference.engine import Engine, EngineConfig
from minillama.inference.decode_step import KEY_BUCKET, key_slots
from minillama.inference.request import Request
from minillama.inference.generate import generate
from minillama.inference.sampling import SamplingParams
from minillama.inference.speculate import accepted_drafts, ngram_draft
from helpers import CountingForward, tiny_model


def prompts(lengths, seed=1, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def run_all(engine: Engine) -> dict:
    done = {}
    while engine.busy:
        for ev in engine.step():
            if ev.finish is not None:
                done[ev.request.key] = list(ev.request.output)
    return done


class KeyLengths:
    """Records the key length every attention call sees (k is (B, K, S, D))."""

    def __init__(self, monkeypatch):
        self.seen, attend = [], model_module.attend

        def spy(q, k, v, attn):
            self.seen.append((q.shape[2], k.shape[2]))
            return attend(q, k, v, attn)
        monkeypatch.setattr(model_module, "attend", spy)


def test_decode_key_length_follows_the_context_not_the_cache_size(monkeypatch):
    model = tiny_model(std=0.3, max_seq_len=4096)
    ps = prompts([20, 33])
    outs, keys = [], []
    for cache_len in (256, 4096):
        spy = KeyLengths(monkeypatch)
        engine = Engine(model, EngineConfig(2, cache_len))
        for i, p in enumerate(ps):
            engine.submit(Request(p, 10, key=i))
        outs.append(run_all(engine))
        keys.append([s for t, s in spy.seen if t == 1])  # decode steps
        model.clear_cache()
    assert outs[0] == outs[1]
    assert keys[0] == keys[1] and max(keys[0]) == 33 + 9  # the longest row's slots, not 256 or 4096
    # a compiled step reads a bucket: the same few shapes for both caches at a short context
    assert key_slots(42, 256, True) == key_slots(42, 4096, True) == KEY_BUCKET
    assert key_slots(300, 4096, True) == 2 * KEY_BUCKET and key_slots(300, 320, True) == 320


def test_waiting_prompts_prefill_together_and_equal_each_alone():
    model = tiny_model(std=0.3)
    ps = prompts([3, 9, 5])
    alone = [generate(model, [p], 8)[0] for p in ps]
    counter = CountingForward(model)
    engine = Engine(model, EngineConfig(3, 64))
    for i, p in enumerate(ps):
        engine.submit(Request(p, 8, key=i))
    done = run_all(engine)
    del model.forward
    assert [c for c in counter.calls if c[1] > 1] == [(1, 17)]  # one forward, the three packed: no padding
    assert [done[i] for i in range(3)] == alone


def test_chunked_prefill_interleaves_with_decoding_and_equals_unchunked():
    model = tiny_model(std=0.3, max_seq_len=128)
    short, long = prompts([4, 70])
    want = [generate(model, [short], 20)[0], generate(model, [long], 8)[0]]
    counter = CountingForward(model)
    engine = Engine(model, EngineConfig(2, 128, prefill_chunk=16))
    engine.submit(Request(short, 20, key=0))
    engine.step()  # the short prompt is prefilled and decoding
    engine.submit(Request(long, 8, key=1))
    done = run_all(engine)
    del model.forward
    # the long prompt: 70 tokens in chunks of 16, the running row's decode forward between every two
    assert counter.calls[1:10] == [(1, 16), (2, 1)] * 4 + [(1, 6)]
    assert [done[0], done[1]] == want


def test_shared_prefix_is_copied_not_recomputed():
    model = tiny_model(std=0.3, max_seq_len=128)
    system, q1, q2 = prompts([40, 6, 9])
    a, b = system + q1, system + q2
    engine = Engine(model, EngineConfig(2, 128, reuse_prefix=True))
    engine.submit(Request(a, 8, key="a"))
    engine.step()  # prefilled into row 0
    rb = engine.submit(Request(b, 8, key="b"))  # joins while row 0 still answers: copies row 0's prefix
    done = run_all(engine)
    assert rb.cached_tokens == 40 and engine.stats["copied"] == 40
    assert engine.stats["prefilled"] == len(a) + len(q2)
    assert [done["a"], done["b"]] == [generate(model, [a], 8)[0], generate(model, [b], 8)[0]]


def test_ngram_draft_copies_what_followed_the_latest_match():
    assert ngram_draft([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3) == [7, 5, 1]  # the latest 3-gram match wins
    assert ngram_draft([4, 5, 6, 4], 2) == [5, 6]  # a 1-gram match when no longer one occurs
    assert ngram_draft([1, 2, 3], 4) == []


def test_speculative_greedy_equals_plain_greedy():
    model = tiny_model(std=0.3, max_seq_len=256)
    base = prompts([24, 30], seed=4)
    ps = [p + p for p in base]  # text that repeats: prompt lookup has something to draft
    plain = [generate(model, [p], 40)[0] for p in ps]
    engine = Engine(model, EngineConfig(2, 256, speculate="ngram"))
    for i, p in enumerate(ps):
        engine.submit(Request(p, 40, key=i))
    done = run_all(engine)
    assert [done[0], done[1]] == plain
    assert engine.stats["accepted"] > 0  # drafts were kept, and the tokens are still plain greedy's
    assert generate(model, ps, 40, config=EngineConfig(speculate="ngram")) == plain  # also in a static batch


def test_rejection_rule_keeps_the_target_distribution():
    """accepted_drafts plus the residual draw (p without the draft): the token that comes out is distributed as p."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    N, d = 40000, 0
    logits = p.log().expand(N, 1, 5)
    kept = accepted_drafts(logits, torch.full((N, 1), d), torch.zeros(N, dtype=torch.bool), torch.rand(N, 1,
                                                                                                       generator=g))
    residual = p.clone()
    residual[d] = 0
    drawn = torch.multinomial(residual / residual.sum(), N, replacement=True, generator=g)
    out = torch.where(kept == 1, d, drawn)
    freq = torch.bincount(out, minlength=5) / N
    assert torch.allclose(freq, p, atol=0.01), freq  # a resample from p itself would give p(d) = 0.75


@pytest.mark.parametrize("speculate", ["ngram", "draft"])
def test_speculative_sampling_keeps_the_models_distribution(speculate):
    """Sampled answers of 3 tokens with prompt-lookup drafts, or a different small model's greedy drafts: the joint
    frequencies of (t1, t2, t3) match the model's own p(t1) p(t2|t1) p(t3|t1,t2), computed exactly over a
    vocabulary of 8."""
    model = tiny_model(std=0.6, vocab_size=8, max_seq_len=32)
    draft = tiny_model(seed=2, std=0.6, vocab_size=8, max_seq_len=32, n_layers=1) if speculate == "draft" else None
    prompt = [3, 1, 4, 7, 0, 6, 2, 5]  # every token once: whatever t1 is, lookup drafts what followed it
    with torch.no_grad():
        seqs = torch.tensor([prompt + [a, b] for a in range(8) for b in range(8)])  # (64, 10)
        logits = model(seqs)  # (64, 10, 8)
    p1 = logits[0, 7].softmax(-1)  # (8,)
    p2 = logits[::8, 8].softmax(-1)  # (8, 8): [t1, t2]
    p3 = logits[:, 9].softmax(-1).view(8, 8, 8)  # [t1, t2, t3]
    exact = p1[:, None, None] * p2[:, :, None] * p3  # (8, 8, 8)
    N, rows = 6000, 200
    engine = Engine(model, EngineConfig(rows, 16, seed=0, speculate=speculate, draft_model=draft, prefill_rows=rows,
                                        prefill_chunk=rows * 8))
    for i in range(N):
        engine.submit(Request(prompt, 3, SamplingParams(1.0), key=i))
    counts = torch.zeros(8, 8, 8)
    for out in run_all(engine).values():
        counts[tuple(out)] += 1
    assert engine.stats["accepted"] > 200 and engine.stats["drafted"] - engine.stats["accepted"] > 200
    freq = counts / N
    tol = 5 * (exact * (1 - exact) / N).sqrt() + 2 / N
    assert ((freq - exact).abs() <= tol).all(), (freq - exact).abs().max()
    # the marginal of the last token, where drafts were kept or replaced by the residual draw
    m, e = freq.sum((0, 1)), exact.sum((0, 1))
    assert ((m - e).abs() <= 5 * (e * (1 - e) / N).sqrt()).all(), (m, e)


def test_every_tool_takes_the_engine_flags():
    from minillama.tools.flags import add_model_args, engine_config
    from minillama.util.cli import ArgumentParser
    p = ArgumentParser()
    add_model_args(p)  # every generation tool (chat, complete, batch, serve, eval_long) adds these
    args = p.parse_args(["--speculate", "ngram", "--draft_tokens", "6", "--prefill_chunk", "64", "--prefill_step", "16"])
    cfg = engine_config(args, batch_size=2)
    assert (cfg.speculate, cfg.draft_tokens, cfg.prefill_chunk, cfg.prefill_step, cfg.batch_size) == \
        ("ngram", 6, 64, 16, 2)
    assert engine_config(p.parse_args([])).speculate is None
