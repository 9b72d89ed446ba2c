"""The OpenAI protocol: request bodies checked field by field into an engine Request (with the Reply it is answered
in), and the response / chunk shapes.

A bad field raises APIError, which the app turns into HTTP 400 with OpenAI's error body
{"error": {"message", "type": "invalid_request_error", "param", "code"}}.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from ..inference.engine import Request
from ..inference.sampling import SamplingParams

MAX_STOP_STRINGS = 16
MAX_N = 16  # choices per request (each takes a cache row)
# request fields this server does not implement, with the values that mean "off"
UNSUPPORTED = {"suffix": ("",), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
               "function_call": ("none",), "response_format": ({"type": "text"},), "parallel_tool_calls": (True, False),
               "audio": (), "modalities": (["text"],), "prediction": (), "reasoning_effort": (),
               "web_search_options": ()}
# the fields each endpoint reads (or accepts as bookkeeping with no effect on the answer: user, metadata, store,
# service_tier); any other field is a 400 naming it, never silently ignored
COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "min_p",
                 "repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias", "seed", "stop", "n",
                 "logprobs", "user", "metadata", "store", "service_tier", *UNSUPPORTED}
FIELDS = {"chat": COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"},
          "completion": COMMON_FIELDS | {"prompt", "echo", "best_of"}}


class APIError(Exception):
    """An error the client caused (400) or a missing resource (404); param names the request field."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Served:
    """What the server offers: the tokenizer, model names, the context limit and the default sampling settings."""

    tok: object
    base_name: str
    adapters: list  # adapter names, servable next to the base model
    base_servable: bool  # False when an adapter is merged into the weights (tensor parallel)
    max_seq_len: int
    sampling: SamplingParams  # used for the fields a request leaves out (the checkpoint's generation_config)
    max_new_tokens: Optional[int]  # default max_tokens cap; None = the rest of the context
    created: int = field(default_factory=lambda: int(time.time()))

    def model_names(self) -> list[str]:
        return ([self.base_name] if self.base_servable else []) + list(self.adapters)


@dataclass
class Reply:
    """How a request is answered: its endpoint's shape, streaming, stop strings; Request.reply holds it."""

    kind: str  # "chat" | "completion"
    model: str
    stop: list  # stop strings (the text stream cuts at them)
    stream: bool
    include_usage: bool = False
    echo: str = ""  # completions with echo: the prompt text, prepended to the answer
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])  # shared by the choices of one HTTP request
    created: int = field(default_factory=lambda: int(time.time()))
    index: int = 0  # which choice of its HTTP request (prompt number * n + sample number)
    logprobs: Optional[int] = None  # top alternatives per token in the answer's logprobs (None: no logprobs)
    prompt_source: object = None  # the sample (Request) that prefills the prompt and holds its logprobs


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body (NaN/Infinity are not JSON)."""
    def reject(name):
        raise ValueError(f"{name} is not valid JSON")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=reject)
    except UnicodeDecodeError as e:
        raise APIError(f"request body is not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise APIError(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        raise APIError(f"request body: {e}") from None
    if not isinstance(body, dict):
        raise APIError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


# ---- field checks: each names its field ----

def _number(body: dict, name: str, default, ok, rule: str):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise APIError(f"{name} must be {rule}, got {v!r}", name)
    return v


def _int(body: dict, name: str, default, ok, rule: str):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not ok(v):
        raise APIError(f"{name} must be {rule}, got {v!r}", name)
    return v


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise APIError(f"{name} must be true or false, got {v!r}", name)
    return v


def _logit_bias(body: dict, vocab: int) -> tuple:
    v = body.get("logit_bias")
    if v is None:
        return ()
    rule = f"an object mapping token ids (0..{vocab - 1}) to numbers in [-100, 100]"
    if not isinstance(v, dict):
        raise APIError(f"logit_bias must be {rule}, got {v!r:.100}", "logit_bias")
    out = []
    for k, b in v.items():
        tid = int(k) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else -1
        if not 0 <= tid < vocab or isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise APIError(f"logit_bias must be {rule}, got {k!r}: {b!r}", "logit_bias")
        out.append((tid, float(b)))
    return tuple(sorted(out))


def _sampling(body: dict, served: Served) -> SamplingParams:
    d = served.sampling
    temperature = _number(body, "temperature", d.temperature, lambda v: v >= 0, "a number >= 0 (0 = greedy)")
    top_p = _number(body, "top_p", d.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = _int(body, "top_k", d.top_k, lambda v: v >= -1, "an integer >= 0 (0 or -1 = off)")
    penalty = _number(body, "repetition_penalty", d.repetition_penalty, lambda v: v > 0, "a number > 0 (1 = off)")
    in_2 = lambda v: -2 <= v <= 2  # noqa: E731
    freq = _number(body, "frequency_penalty", d.frequency_penalty, in_2, "a number in [-2, 2]")
    presence = _number(body, "presence_penalty", d.presence_penalty, in_2, "a number in [-2, 2]")
    min_p = _number(body, "min_p", d.min_p, lambda v: 0 <= v <= 1, "a number in [0, 1] (0 = off)")
    return SamplingParams(float(temperature), float(top_p), max(int(top_k), 0), float(penalty), float(freq),
                          float(presence), _logit_bias(body, served.tok.vocab_size) or d.logit_bias, float(min_p))


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) \
            or len(stops) > MAX_STOP_STRINGS:
        raise APIError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings, "
                       f"got {v!r:.100}", "stop")
    return stops


def _model(body: dict, served: Served) -> tuple[str, Optional[str]]:
    """(model name, adapter name or None) of the request's "model" field."""
    name = body.get("model")
    valid = served.model_names()
    if not isinstance(name, str) or name not in valid:
        why = "" if served.base_servable else f" ({served.base_name} is served only with its merged adapter)"
        raise APIError(f"model {name!r} does not exist; this server has: {', '.join(valid)}{why}", "model")
    return name, (name if name in served.adapters else None)


def _content(m: dict, i: int) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text"} parts."""
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise APIError(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant"):
            raise APIError(f"messages[{i}].role must be system, user or assistant, got {m.get('role')!r}",
                           f"messages[{i}].role")
        out.append({"role": role, "content": _content(m, i)})
    return out


def _max_tokens(body: dict, served: Served, n_prompt: int, prompt_field: str) -> int:
    room = served.max_seq_len - n_prompt
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = _int(body, name, None, lambda v: v >= 1, "an integer >= 1")
    if room < 1 or (asked is not None and asked > room):
        raise APIError(f"this server's context is {served.max_seq_len} tokens (--max_seq_len), but the request needs "
                       f"{n_prompt + (asked or 1)} ({n_prompt} in the {prompt_field}, {asked or 1} to generate); "
                       f"shorten the {prompt_field} or lower {name}", prompt_field if room < 1 else name)
    default = room if served.max_new_tokens is None else min(served.max_new_tokens, room)
    return asked if asked is not None else default


def _logprobs(body: dict, kind: str) -> Optional[int]:
    """How many top alternatives per token the answer's logprobs carry; None: no logprobs. Completions: logprobs is
    that number (0..5); chat: logprobs true, with top_logprobs (0..20)."""
    if kind == "completion":
        if body.get("logprobs") is False:  # not OpenAI's type, but plainly "off"
            return None
        return _int(body, "logprobs", None, lambda v: 0 <= v <= 5, "an integer in 0..5 (or null)")
    top = _int(body, "top_logprobs", None, lambda v: 0 <= v <= 20, "an integer in 0..20")
    if not _bool(body, "logprobs"):
        if top:
            raise APIError("top_logprobs needs logprobs: true", "top_logprobs")
        return None
    return top or 0


def _common(body: dict, served: Served, kind: str) -> dict:
    for name in body:
        if name not in FIELDS[kind]:
            raise APIError(f"{name} is not a field this server accepts for {kind}s", name)
    n = _int(body, "n", 1, lambda v: 1 <= v <= MAX_N, f"an integer in 1..{MAX_N}")
    if body.get("best_of") is not None and body["best_of"] != n:
        raise APIError(f"best_of must equal n ({n}): ranking more samples than are returned is not supported",
                       "best_of")
    for name, off in UNSUPPORTED.items():  # said no to, rather than silently ignored
        if body.get(name) not in (None, *off):
            raise APIError(f"{name} is not supported by this server", name)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise APIError("stream_options must be an object", "stream_options")
    return dict(sampling=_sampling(body, served), seed=_int(body, "seed", None, lambda v: True, "an integer"),
                stop=_stop(body), stream=_bool(body, "stream"), include_usage=bool((opts or {}).get("include_usage")),
                n=n, logprobs=_logprobs(body, kind))


def _requests(kind: str, head: tuple, prompt: int, ids: list, served: Served, more: tuple) -> list[Request]:
    """The engine Requests (n samples) of one checked prompt, the prompt-th of its HTTP request; head: (model,
    adapter, _common's fields); more: (max_tokens, echo text, whether the prompt's logprobs are wanted). The first
    sample prefills the prompt, the others fork its keys/values; seeded samples get seed, seed + 1, ..."""
    (model, adapter, c), (max_tokens, echo, prompt_logprobs), out, rid = head, more, [], uuid.uuid4().hex[:24]
    for j in range(c["n"]):
        index = prompt * c["n"] + j
        reply = Reply(kind, model, c["stop"], c["stream"], c["include_usage"], echo, index=index,
                      logprobs=c["logprobs"])
        seed = None if c["seed"] is None else c["seed"] + j
        out.append(Request(ids, max_tokens, c["sampling"], frozenset(served.tok.stop_ids), seed, adapter,
                           key=f"{rid}-{index}", reply=reply, logprobs=c["logprobs"],
                           prompt_logprobs=prompt_logprobs and j == 0, fork_of=out[0].key if out else None))
        reply.prompt_source = out[0]
    return out


def _shared_id(reqs: list[Request]) -> list[Request]:
    """One response id and creation time for all the choices of an HTTP request."""
    for r in reqs[1:]:
        r.reply.id, r.reply.created = reqs[0].reply.id, reqs[0].reply.created
    return reqs


def parse_chat(body: dict, served: Served) -> list[Request]:
    """POST /v1/chat/completions -> one Request per choice (n); the dialog is encoded in the checkpoint's chat
    format."""
    head = (*_model(body, served), _common(body, served, "chat"))
    msgs = _messages(body)
    try:
        ids = served.tok.encode_dialog(msgs, add_generation_prompt=True)
    except ValueError as e:  # e.g. roles out of order for an [INST] format
        raise APIError(f"messages: {e}", "messages") from None
    more = (_max_tokens(body, served, len(ids), "messages"), "", False)
    return _shared_id(_requests("chat", head, 0, ids, served, more))


def _prompts(body: dict, vocab: int) -> list:
    """The prompt field as a list of prompts, each a string or a list of token ids."""
    prompt = body.get("prompt")
    is_ids = lambda p: isinstance(p, list) and p and all(  # noqa: E731
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p)
    if (isinstance(prompt, str) and prompt) or is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all((isinstance(p, str) and p) or is_ids(p) for p in prompt):
        return prompt
    raise APIError(f"prompt must be a non-empty string, a list of token ids (0..{vocab - 1}), or a non-empty list of "
                   f"those", "prompt")


def parse_completion(body: dict, served: Served) -> list[Request]:
    """POST /v1/completions -> one Request per prompt and choice (n); a prompt is plain text (BOS as the tokenizer
    adds it) or token ids."""
    head = (*_model(body, served), _common(body, served, "completion"))
    echo, out = _bool(body, "echo"), []
    for i, prompt in enumerate(_prompts(body, served.tok.vocab_size)):
        ids = served.tok.encode(prompt, bos=True) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(f"prompt {i} encodes to no tokens", "prompt")
        text = (prompt if isinstance(prompt, str) else served.tok.decode(ids)) if echo else ""
        more = (_max_tokens(body, served, len(ids), "prompt"), text, echo and head[2]["logprobs"] is not None)
        out += _requests("completion", head, i, ids, served, more)
    return _shared_id(out)


# ---- responses ----

def usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def request_usage(reqs: list[Request], n_completion: int) -> dict:
    """Usage of an HTTP request's choices: each prompt counted once, every choice's answer tokens."""
    return usage(sum(len(r.prompt) for r in reqs if r.fork_of is None), n_completion)


@dataclass
class Choice:
    """One finished choice: its request, text, finish reason, answer token count and answer tokens' logprobs."""

    req: Request
    text: str
    finish: str
    tokens: int
    logprobs: list  # TokenLogprob per answer token (empty without logprobs)


def token_text(tok, tid: int) -> str:
    """A token as logprobs name it: its text, or "bytes:\\xNN..." when it is a piece of a UTF-8 character."""
    b = tok.token_bytes(tid)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def chat_logprobs(tok, entries: list) -> dict:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def one(tid, lp):
        return {"token": token_text(tok, tid), "logprob": lp, "bytes": list(tok.token_bytes(tid))}
    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(tok, ids: list, entries: list, before: bytes = b"") -> dict:
    """OpenAI's completions shape {tokens, token_logprobs, top_logprobs, text_offset} for tokens ids with their
    TokenLogprobs (None for the prompt's first token); top_logprobs also holds the chosen token, as OpenAI's does.
    text_offset: characters of the text before each token (before: the bytes of the text ahead of ids)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    text = bytearray(before)
    for tid, e in zip(ids, entries):
        out["tokens"].append(token_text(tok, tid))
        out["text_offset"].append(len(text.decode("utf-8", errors="ignore")))
        text += tok.token_bytes(tid)
        out["token_logprobs"].append(None if e is None else e.logprob)
        if e is None:
            out["top_logprobs"].append(None)
            continue
        top = {token_text(tok, t): lp for t, lp in e.top}
        top.setdefault(token_text(tok, tid), e.logprob)
        out["top_logprobs"].append(top)
    return out


def choice_logprobs(tok, c: Choice) -> Optional[dict]:
    """A choice's logprobs in its endpoint's shape (completions with echo: the prompt's tokens first)."""
    r = c.req.reply
    if r.logprobs is None:
        return None
    if r.kind == "chat":
        return chat_logprobs(tok, c.logprobs)
    ids, entries = [e.token for e in c.logprobs], list(c.logprobs)
    if r.echo:
        head = c.req.reply.prompt_source  # the sample that prefilled the prompt holds its logprobs
        ids, entries = list(c.req.prompt) + ids, list(head.prompt_token_logprobs) + entries
    return completion_logprobs(tok, ids, entries)


def response(choices: list[Choice], tok) -> dict:
    """The non-streamed answer of an HTTP request's choices."""
    r = choices[0].req.reply
    u = request_usage([c.req for c in choices], sum(c.tokens for c in choices))
    if r.kind == "chat":
        out = [{"index": c.req.reply.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": choice_logprobs(tok, c), "finish_reason": c.finish} for c in choices]
        return {"id": f"chatcmpl-{r.id}", "object": "chat.completion", "created": r.created, "model": r.model,
                "choices": out, "usage": u}
    out = [{"index": c.req.reply.index, "text": c.req.reply.echo + c.text, "logprobs": choice_logprobs(tok, c),
            "finish_reason": c.finish} for c in choices]
    return {"id": f"cmpl-{r.id}", "object": "text_completion", "created": r.created, "model": r.model,
            "choices": out, "usage": u}


def chunk(req: Request, text: Optional[str] = None, finish: Optional[str] = None, first: bool = False,
          usage_only: Optional[dict] = None, logprobs: Optional[dict] = None) -> dict:
    """One streamed chunk of a choice: a piece of text (with its tokens' logprobs), the final finish_reason, or
    (stream_options.include_usage) the usage."""
    r = req.reply
    if r.kind == "chat":
        head = {"id": f"chatcmpl-{r.id}", "object": "chat.completion.chunk", "created": r.created, "model": r.model}
        delta = {"role": "assistant", "content": text or ""} if first else ({} if text is None else {"content": text})
        choices = [] if usage_only else [{"index": r.index, "delta": delta, "logprobs": logprobs,
                                          "finish_reason": finish}]
    else:
        head = {"id": f"cmpl-{r.id}", "object": "text_completion", "created": r.created, "model": r.model}
        choices = [] if usage_only else [{"index": r.index, "text": text or "", "logprobs": logprobs,
                                          "finish_reason": finish}]
    out = {**head, "choices": choices}
    if r.include_usage:
        out["usage"] = usage_only
    return out


def models(served: Served) -> dict:
    """GET /v1/models: the base model (when servable) and every adapter, whose parent is the base."""
    data = [{"id": name, "object": "model", "created": served.created, "owned_by": "minillama",
             "root": served.base_name, "parent": None if name == served.base_name else served.base_name}
            for name in served.model_names()]
    return {"object": "list", "data": data}
