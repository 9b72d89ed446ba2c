"""generate(), generate_continuous() and generate_requests(): prompts in, answers out, through the engine (the one
decode loop).

generate() admits every prompt at once (one cache row each, prefilled together) and syncs with the host only every
EngineConfig.sync_every steps; generate_continuous() keeps batch_size rows busy and yields each answer as it ends;
generate_requests() does the same for Requests that each carry their own settings (sampling, stop ids, a constraint:
structured output).
Each checks its arguments before the first forward.
Shape letters: B rows, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..rope import runs_past_context
from .constraints import GrammarVocab
from .engine import Engine, EngineConfig
from .request import Request
from .sampling import SamplingParams

__all__ = ["generate", "generate_continuous", "generate_requests", "SamplingParams", "EngineConfig", "Request"]


def _check_prompts(model, prompts, max_new_tokens: int, max_seq_len: Optional[int],
                   truncate_left: bool) -> list[list[int]]:
    """Validate the batch and fit each prompt into the context; returns the (possibly left-truncated) prompts."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    limit = model.args.max_seq_len if max_seq_len is None else max_seq_len
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_seq_len must be an int >= 1 (or None: the model's context), got {max_seq_len!r}")
    if limit > model.args.max_seq_len and not runs_past_context(model.args.rope_scaling):  # dynamic NTK may, as in HF
        raise ValueError(f"max_seq_len {limit} exceeds the model's context of {model.args.max_seq_len} tokens")
    if max_new_tokens >= limit:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in a context of {limit} tokens")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    vocab = model.args.vocab_size
    room = limit - max_new_tokens
    out = []
    for i, p in enumerate(prompts):
        p = p.tolist() if isinstance(p, torch.Tensor) else list(p)
        if not p:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. BOS)")
        if not all(isinstance(t, numbers.Integral) and 0 <= t < vocab for t in p):
            raise ValueError(f"prompt {i} holds a token id outside 0..{vocab - 1} (or not an int)")
        if len(p) > room:
            if not truncate_left:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens {max_new_tokens} it must be "
                                 f"at most {room} to fit the context of {limit} (pass truncate_left=True to keep "
                                 f"its last {room} tokens)")
            p = p[-room:]
        out.append([int(t) for t in p])
    return out


def _requests(prompts: list[list[int]], max_new_tokens: int, sampling, stop_ids) -> list[Request]:
    """One Request per prompt, keyed by its index; sampling: one SamplingParams for all, or a list with one per
    prompt."""
    stop = frozenset(int(s) for s in stop_ids)
    per = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
    if len(per) != len(prompts):
        raise ValueError(f"sampling has {len(per)} entries for {len(prompts)} prompts")
    return [Request(p, max_new_tokens, s or SamplingParams(), stop, key=i)
            for i, (p, s) in enumerate(zip(prompts, per))]


def _engine_for(model, requests: list[Request], config: Optional[EngineConfig],
                grammar: Optional[Callable[[], GrammarVocab]] = None) -> Engine:
    """An engine sized for these requests (one row each unless config.batch_size), every one submitted."""
    config = config or EngineConfig()
    longest = max(len(r.prompt) + r.max_new_tokens for r in requests)
    config = dataclasses.replace(config, batch_size=min(config.batch_size or len(requests), len(requests)),
                                 cache_len=max(config.cache_len or 0, longest))
    engine = Engine(model, config, grammar=grammar)
    for r in requests:
        engine.submit(r)
    return engine


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Optional[SamplingParams] = None,
             *, stop_ids: Sequence[int] = (), truncate_left: bool = False, max_seq_len: Optional[int] = None,
             config: Optional[EngineConfig] = None) -> list[list[int]]:
    """New tokens for each prompt (token-id lists of any lengths), each row cut before its first stop token.

    sampling: temperature / top-p / top-k / repetition penalty (default greedy). max_seq_len caps prompt + new
    tokens (default: the model's context; with dynamic NTK scaling it may exceed it, as in HF); prompts that do not
    fit raise unless truncate_left. config: the engine's settings (seed, compile, tensor-parallel group,
    speculative decoding, ...); by default every prompt gets its own cache row.
    """
    prompts = _check_prompts(model, prompts, max_new_tokens, max_seq_len, truncate_left)
    reqs = _requests(prompts, max_new_tokens, sampling, stop_ids)
    engine = _engine_for(model, reqs, config)
    while engine.busy:
        engine.step(engine.config.sync_every)
    return [r.output for r in reqs]


def generate_continuous(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                        sampling: Optional[SamplingParams | Sequence[SamplingParams]] = None, *,
                        stop_ids: Sequence[int] = (),
                        truncate_left: bool = False, max_seq_len: Optional[int] = None,
                        config: Optional[EngineConfig] = None) -> Iterator[tuple[int, list[int], str]]:
    """Continuous batching: yield (prompt index, new tokens, stop reason) as each prompt finishes.

    At most config.batch_size prompts are in flight; when one ends (stop token or max_new_tokens) its cache row is
    refilled with the next pending prompt while the other rows go on decoding. Greedy outputs equal generate() on
    each prompt alone. Sampled outputs are reproducible for a given seed, prompt order and batch_size, but they
    depend on the schedule (one generator serves all rows), so they differ from generate()'s. Arguments as in
    generate(), except that sampling may also be a list with one SamplingParams per prompt; bad ones raise here,
    before the first prefill.
    """
    prompts = _check_prompts(model, prompts, max_new_tokens, max_seq_len, truncate_left)
    engine = _engine_for(model, _requests(prompts, max_new_tokens, sampling, stop_ids), config)
    return ((req.key, req.output, req.finish) for req in _finished(engine))


def generate_requests(model, requests: Sequence[Request], config: Optional[EngineConfig] = None,
                      grammar: Optional[Callable[[], GrammarVocab]] = None) -> Iterator[Request]:
    """Continuous batching over Requests, each with its own prompt, max_new_tokens, sampling, stop ids and constraint:
    yield each as it ends (output and finish filled in). Constrained and free requests share the batch; grammar
    returns the tokenizer's constraints.GrammarVocab (grammar_vocab(tok)), needed when any request has a constraint.
    The engine is sized as in generate_continuous(); prompts must already fit the model's context (no truncation
    here). Bad requests raise here, before the first prefill."""
    if not requests:
        raise ValueError("requests must be a non-empty list of Requests")
    return _finished(_engine_for(model, list(requests), config, grammar))


def _finished(engine: Engine) -> Iterator[Request]:
    while engine.busy:
        for ev in engine.step():
            if ev.finish is not None:
                yield ev.request
