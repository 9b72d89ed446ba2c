"""Batched generation on the model's static KV cache: one left-padded prefill, then one-token decode steps.

The prompt is never recomputed. Sampling happens on the model's device in float32; the non-streaming loop
only asks the device "are all rows done?" every `check_every` steps (one host sync per check), while the
streaming loop syncs once per step because it must hand tokens to the caller.
generate_continuous (continuous batching, on engine.Engine) instead keeps a fixed set of cache rows busy: a row
whose answer ends is refilled with the next prompt, prefilled alone into that cache row, while the other rows go
on decoding; it syncs once per step, since which rows finish is a host decision.
Shape letters: B rows, P padded prompt length, V vocabulary.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from ..attention import CacheStep
from .engine import Engine, Request
from ..rope import runs_past_context
from .sampling import SamplingParams, next_token, seen_mask

__all__ = ["generate", "generate_stream", "generate_continuous", "decode_step", "stop_reason", "SamplingParams"]

CACHE_ROUND = 512  # compiled decoding attends over the whole cache: lengths are rounded up to reuse it (and the graph)


def decode_step(model, tokens: torch.Tensor, step: CacheStep) -> torch.Tensor:
    """One cached forward of a single new token per row. tokens (B, 1) -> float32 logits (B, V)."""
    return model(tokens, start_pos=step)[:, -1]


_compiled_decode_step = None


def _compiled_step():
    """decode_step under torch.compile(mode="reduce-overhead") (CUDA graphs on GPU), built once per process.

    dynamic=True: batch size and cache length are symbolic, so one compile serves every size above one row (a
    single row is specialised by torch: a second compile); CUDA graphs are still recorded per concrete shape.
    """
    global _compiled_decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(decode_step, mode="reduce-overhead", dynamic=True)
    return _compiled_decode_step


def cache_len_for(n: int, compile: bool) -> int:
    """The KV cache length to allocate for n slots: exact when eager, rounded up to CACHE_ROUND when compiled."""
    return -(-n // CACHE_ROUND) * CACHE_ROUND if compile else n


def stop_reason(new_tokens: Sequence[int], max_new_tokens: int) -> str:
    """"stop" if the row ended on a stop token, "length" if it used all max_new_tokens (stops are not returned)."""
    return "length" if len(new_tokens) >= max_new_tokens else "stop"


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


def _ensure_cache(model, batch: int, seq_len: int) -> None:
    """Reuse the model's KV cache when it holds batch x seq_len (in the model's dtype, on its device), else allocate
    one of exactly that size."""
    cache, weight = model.layers[0].attention.cache, model.tok_embeddings.weight
    dtype = weight.dtype if weight.is_floating_point() else torch.bfloat16
    if (cache is None or cache.k.shape[0] < batch or cache.k.shape[2] < seq_len or cache.k.dtype != dtype
            or cache.k.device != weight.device):
        model.setup_cache(batch, seq_len)


@dataclass
class _Run:
    """What every decoding loop sets up the same way: device, sampler state, stop tokens, the step function."""

    device: torch.device
    params: SamplingParams
    generator: torch.Generator
    stop: torch.Tensor  # (n_stop,) long on the device
    step_fn: object  # decode_step, or its compiled twin
    src: Optional[int]  # global rank whose sampled tokens every tensor-parallel rank feeds; None in one process
    process_group: object

    def pick(self, logits: torch.Tensor, seen: Optional[torch.Tensor]) -> torch.Tensor:
        """Each row's next token (B,); under tensor parallelism rank 0's choice wins on every rank."""
        nxt = next_token(logits, self.params, seen, self.generator)
        if self.src is not None:
            dist.broadcast(nxt, src=self.src, group=self.process_group)
        return nxt


def _setup(model, params: SamplingParams, stop_ids, seed: Optional[int], compile: bool, process_group) -> _Run:
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    stop = torch.tensor(sorted(set(int(s) for s in stop_ids)), dtype=torch.long, device=device)
    src = None if process_group is None else dist.get_global_rank(process_group, 0)
    return _Run(device, params, generator, stop, _compiled_step() if compile else decode_step, src, process_group)


@torch.no_grad()
def _steps(model, prompts: list[list[int]], max_new_tokens: int, run: _Run, compile: bool,
           pad_id: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield per step (tokens (B,), emitted (B,) bool, done (B,) bool), all on the device. prompts are checked.

    emitted marks rows whose token is real output (not a stop token, row not already finished).
    Finished rows keep decoding pad_id so every step has a fixed shape; their output is masked out.
    """
    device = run.device
    B, P = len(prompts), max(len(p) for p in prompts)
    _ensure_cache(model, B, cache_len_for(P + max_new_tokens, compile))

    tokens = torch.full((B, P), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = torch.tensor(p)  # left padding: every row's last prompt token sits at slot P-1
    tokens = tokens.to(device)
    pad_list = [P - len(p) for p in prompts]
    pad = torch.tensor(pad_list, device=device)  # (B,)
    pad_lens = pad if any(pad_list) else None  # None lets the kernels use their plain causal path

    seen = None
    if run.params.repetition_penalty != 1.0:
        # pad slots copy the row's last token so only real prompt tokens count as seen
        real = torch.arange(P, device=device)[None] >= pad[:, None]  # (B, P)
        seen = seen_mask(torch.where(real, tokens, tokens[:, -1:]), model.args.vocab_size)

    hidden = model(tokens, start_pos=CacheStep(0, pad_lens), return_hidden=True)  # (B, P, D)
    logits = model.output(hidden[:, -1]).float()  # (B, V): only the last position's logits are needed
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # compiled: a device-side position, so one graph serves every step; eager: an int, shapes grow
    step = CacheStep(torch.tensor(P, device=device) if compile else P, pad_lens)
    for i in range(max_new_tokens):
        nxt = run.pick(logits, seen)  # (B,)
        is_stop = torch.isin(nxt, run.stop)
        emitted = ~done & ~is_stop
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        done = done | is_stop
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        yield nxt, emitted, done
        if i + 1 < max_new_tokens:  # the last token is never fed back
            if compile:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are consumed
                logits = run.step_fn(model, nxt[:, None], step)  # (B, V)
                step.start += 1  # in place: the graph reads the same tensor
            else:
                logits = run.step_fn(model, nxt[:, None], step)  # (B, V)
                step = CacheStep(step.start + 1, pad_lens)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Optional[SamplingParams] = None,
             *, stop_ids: Sequence[int] = (), seed: Optional[int] = None, truncate_left: bool = False,
             max_seq_len: Optional[int] = None, compile: bool = False, process_group=None, pad_id: int = 0,
             check_every: int = 16) -> list[list[int]]:
    """New tokens for each prompt (token-id lists of any lengths), each row cut before its first stop token.

    sampling: temperature / top-p / top-k / repetition penalty (default greedy). max_seq_len caps prompt + new
    tokens (default: the model's context; with dynamic NTK scaling it may exceed it, as in HF); prompts that do not
    fit raise unless truncate_left. process_group: the tensor-parallel group, whose rank 0 broadcasts each sampled
    token. check_every: steps between the host syncs that end the loop once every row stopped.
    """
    params = sampling or SamplingParams()
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
    prompts = _check_prompts(model, prompts, max_new_tokens, max_seq_len, truncate_left)
    run = _setup(model, params, stop_ids, seed, compile, process_group)
    toks, keep = [], []
    for i, (nxt, emitted, done) in enumerate(_steps(model, prompts, max_new_tokens, run, compile, pad_id)):
        toks.append(nxt)
        keep.append(emitted)
        if (i + 1) % check_every == 0 and bool(done.all()):
            break
    toks = torch.stack(toks, dim=1).tolist()  # (B, steps): the one transfer to the host
    keep = torch.stack(keep, dim=1).tolist()
    return [[t for t, k in zip(row, ks) if k] for row, ks in zip(toks, keep)]


def generate_stream(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    sampling: Optional[SamplingParams] = None, *, stop_ids: Sequence[int] = (),
                    seed: Optional[int] = None, truncate_left: bool = False, max_seq_len: Optional[int] = None,
                    compile: bool = False, process_group=None, pad_id: int = 0) -> Iterator[list[tuple[int, int]]]:
    """Like generate, but yields each step's new tokens as [(row, token), ...] as soon as they exist.

    Rows that stopped produce nothing; the iteration ends when every row stopped or after max_new_tokens steps.
    Concatenating a row's tokens over all steps gives exactly generate()'s output for that row. Bad arguments
    raise here, before the first step.
    """
    params = sampling or SamplingParams()
    prompts = _check_prompts(model, prompts, max_new_tokens, max_seq_len, truncate_left)
    run = _setup(model, params, stop_ids, seed, compile, process_group)
    return _stream(_steps(model, prompts, max_new_tokens, run, compile, pad_id))


def _stream(steps) -> Iterator[list[tuple[int, int]]]:
    for nxt, emitted, done in steps:
        pairs = [(b, t) for b, (t, e) in enumerate(zip(nxt.tolist(), emitted.tolist())) if e]
        if pairs:
            yield pairs
        if bool(done.all()):
            return


def generate_continuous(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int,
                        sampling: Optional[SamplingParams] = None, *, stop_ids: Sequence[int] = (),
                        seed: Optional[int] = None, truncate_left: bool = False, max_seq_len: Optional[int] = None,
                        compile: bool = False, process_group=None,
                        pad_id: int = 0) -> Iterator[tuple[int, list[int], str]]:
    """Continuous batching: yield (prompt index, new tokens, stop reason) as each prompt finishes.

    At most batch_size prompts are in flight; when one ends (stop token or max_new_tokens) its cache row is
    refilled with the next pending prompt, prefilled alone at slot 0, and every step decodes one token for all
    busy rows together (engine.Engine). Greedy outputs equal generate() on each prompt alone. Sampled outputs are
    reproducible for a given seed, prompt order and batch_size, but they depend on the schedule (one generator
    serves all rows), so they differ from generate()'s. Arguments as in generate(); bad ones raise before the first
    prefill.
    """
    params = sampling or SamplingParams()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    prompts = _check_prompts(model, prompts, max_new_tokens, max_seq_len, truncate_left)
    stop = frozenset(int(s) for s in stop_ids)
    engine = Engine(model, min(batch_size, len(prompts)),
                    cache_len_for(max(len(p) for p in prompts) + max_new_tokens, compile), seed=seed,
                    step_fn=_compiled_step() if compile else decode_step, compile=compile,
                    process_group=process_group, pad_id=pad_id)
    for i, p in enumerate(prompts):
        engine.submit(Request(p, max_new_tokens, params, stop, key=i))
    return _finished(engine)


def _finished(engine: Engine) -> Iterator[tuple[int, list[int], str]]:
    while engine.busy:
        for ev in engine.step():
            if ev.finish is not None:
                yield ev.request.key, ev.request.output, ev.finish
