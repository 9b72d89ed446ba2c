"""generate/bench.py --engine: the engine on a real checkpoint (default: the embedded SmolLM2).

1. A decode step at a short context costs the same with a 256-slot and a 4096-slot cache (the step reads the slots
   the rows hold, not the whole cache): --rows rows at a 200-token context, ms per engine step.
2. Prompt-lookup speculative decoding on a review-like prompt: a document in (this repository's README), an answer
   that quotes it; batch 1, greedy: tokens/s without and with --speculate ngram, the outputs compared, the drafts'
   acceptance rate; with --draft_ckpt DIR the same for a draft model's drafts (--speculate draft).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from minillama.inference.engine import Engine, EngineConfig
from minillama.inference.request import Request
from minillama.inference.loading import LoadOptions, load_draft, load_for_inference
from minillama.util.cli import DEFAULT_CKPT

REPO = Path(__file__).resolve().parents[1]


def step_ms(model, rows: int, cache_len: int, context: int, steps: int = 8) -> float:
    """Median ms of an engine step with `rows` rows decoding at about `context` tokens, cache of cache_len slots."""
    model.clear_cache()
    engine = Engine(model, EngineConfig(rows, cache_len, prefill_chunk=rows * context))
    g = torch.Generator().manual_seed(0)
    for i in range(rows):
        prompt = torch.randint(0, model.args.vocab_size, (context,), generator=g).tolist()
        engine.submit(Request(prompt, steps + 4, key=i))
    engine.step()  # prefill + the first token
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    model.clear_cache()
    return 1e3 * sorted(times)[len(times) // 2]


def review_prompt(tok) -> list[int]:
    """A review-like request: three paragraphs of a document (this repository's README, the first three plain
    paragraphs over 300 characters), and a review that quotes each paragraph before commenting on it."""
    doc = (REPO / "README.md").read_text(encoding="utf-8")
    paragraphs = [p for p in doc.split("\n\n") if len(p) > 300 and not p.startswith(("|", "```", "#", "-"))][:3]
    ask = ("Review this text. For each paragraph, first quote it in full, then comment on it.\n\n"
           + "\n\n".join(paragraphs))
    return tok.encode_dialog([{"role": "user", "content": ask}], add_generation_prompt=True)


def timed_answer(model, ids: list[int], new: int, speculate, draft_tokens: int, draft=None
                 ) -> tuple[list[int], float, dict]:
    """Greedy answer, seconds from submit to the last token (prefill included), the engine's stats."""
    engine = Engine(model, EngineConfig(1, len(ids) + new, speculate=speculate, draft_tokens=draft_tokens,
                                        draft_model=draft))
    req = engine.submit(Request(ids, new, key=0))
    t0 = time.perf_counter()
    while engine.busy:
        engine.step()
    return req.output, time.perf_counter() - t0, engine.stats


def bench_engine(a, device) -> None:
    loaded = load_for_inference(a.ckpt or DEFAULT_CKPT, LoadOptions(device=str(device), dtype=a.dtype))
    model, tok = loaded.model, loaded.tok
    print(f"checkpoint: {a.ckpt or DEFAULT_CKPT}, {a.dtype}, torch threads {torch.get_num_threads()}")
    with torch.inference_mode():
        rounds = [(step_ms(model, a.rows, 256, 200), step_ms(model, a.rows, 4096, 200)) for _ in range(a.iters)]
        small, large = min(r[0] for r in rounds), min(r[1] for r in rounds)  # the least disturbed of interleaved rounds
        print(f"decode step, {a.rows} rows at a 200-token context: {small:.0f} ms with 256 cache slots, "
              f"{large:.0f} ms with 4096 ({large / small:.2f}x; best of {a.iters} interleaved rounds)")
        ids = review_prompt(tok)
        draft = load_draft(a.draft_ckpt, loaded) if a.draft_ckpt else None
        cases = {"plain": (None, None), "--speculate ngram": ("ngram", None)}
        if draft is not None:
            cases[f"--draft_ckpt {a.draft_ckpt}"] = ("draft", draft)
        for speculate, d in cases.values():
            timed_answer(model, ids[:64], 4, speculate, a.draft_tokens, d)  # warm-up
        decode = {name: [] for name in cases}  # seconds after the first token, per round
        answers = {}  # name -> (tokens, engine stats)
        for _ in range(a.iters):  # interleaved rounds: a change in the machine's load hits every case alike
            t_pre = timed_answer(model, ids, 1, None, a.draft_tokens)[1]  # prefill + the first pick
            for name, (speculate, d) in cases.items():
                out, t, stats = timed_answer(model, ids, a.max_new_tokens, speculate, a.draft_tokens, d)
                decode[name].append(t - t_pre)
                answers[name] = (out, stats)
        med = {name: sorted(ts)[len(ts) // 2] for name, ts in decode.items()}
        plain = answers["plain"][0]
        print(f"review-like prompt of {len(ids)} tokens, {len(plain)} new (greedy, batch 1, --draft_tokens "
              f"{a.draft_tokens}, median of {a.iters} interleaved rounds): prefill {t_pre:.2f} s, then "
              f"{(len(plain) - 1) / med['plain']:.1f} tokens/s plain")
        for name in list(cases)[1:]:
            spec, stats = answers[name]
            print(speculation_line(name, plain, med["plain"], spec, med[name], stats))
        print(f"answer: {tok.decode(spec)[:300]!r}")


def speculation_line(name: str, plain: list[int], t_plain: float, spec: list[int], t_spec: float,
                     stats: dict) -> str:
    """Decode tokens/s with speculative decoding vs plain (t_*: seconds after the first token, which the prefill
    gives), whether the outputs agree, and how many drafts were kept."""
    rate = stats["accepted"] / max(stats["drafted"], 1)
    return (f"  {(len(spec) - 1) / t_spec:.1f} tokens/s with {name} ({t_plain / t_spec:.2f}x plain); outputs "
            f"identical: {plain == spec}; drafts accepted {stats['accepted']} of {stats['drafted']} ({100 * rate:.0f}%),"
            f" {stats['decode_steps']} forwards for {len(spec) - 1} tokens after the first")
