"""The one request type, from the HTTP route (or generate()) to the engine and back, and what a step reports for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .constraints import Constraint
from .sampling import SamplingParams


@dataclass(eq=False)
class Request:
    """One prompt to answer, from the HTTP route (or generate()) to the model and back. output, finish and
    cached_tokens are filled in by the engine."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset = frozenset()
    seed: Optional[int] = None  # its own generator: its draws do not depend on the batch (None: the engine's)
    adapter: Optional[str] = None  # which adapter this row runs (None: the base model)
    key: object = None  # the caller's handle (a prompt index, a request id)
    reply: object = None  # what the caller needs to answer it (the server's response shape); the engine never reads it
    output: list[int] = field(default_factory=list)  # the answer so far, stop token excluded
    finish: Optional[str] = None  # "stop" | "length" | "cancelled" once it ended
    cached_tokens: int = 0  # prompt tokens whose keys/values were reused instead of prefilled
    constraint: Optional[Constraint] = None  # what the answer must match (a JSON schema, regex, grammar); None: free
    logprobs: Optional[int] = None  # each answer token's logprob and this many top alternatives (None: none)
    prompt_logprobs: bool = False  # fill prompt_token_logprobs (the prompt is then prefilled whole, never copied)
    fork_of: object = None  # the key of a request with the same prompt: copy its prefilled keys/values (n samples)
    prompt_token_logprobs: list = field(default_factory=list)  # per prompt token (the first None): TokenLogprob


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (raw float32 logits, no processor), and the top alternatives."""

    token: int
    logprob: float
    top: list  # [(token id, logprob)], most likely first


@dataclass
class Event:
    """What a step did for one request: a new answer token, and/or its end ("stop", "length", "cancelled")."""

    request: Request
    token: Optional[int] = None
    finish: Optional[str] = None
    logprob: Optional[TokenLogprob] = None  # the token's, when the request asked for logprobs
