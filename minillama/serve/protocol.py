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
# request fields this server does not implement, with the values that mean "off"
UNSUPPORTED = {"logprobs": (False, 0), "top_logprobs": (0,), "best_of": (1,), "suffix": ("",), "tools": ([],),
               "functions": ([],), "response_format": ({"type": "text"},)}


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
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


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


def _sampling(body: dict, served: Served) -> SamplingParams:
    d = served.sampling
    temperature = _number(body, "temperature", d.temperature, lambda v: v >= 0, "a number >= 0 (0 = greedy)")
    top_p = _number(body, "top_p", d.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = _int(body, "top_k", d.top_k, lambda v: v >= -1, "an integer >= 0 (0 or -1 = off)")
    penalty = _number(body, "repetition_penalty", d.repetition_penalty, lambda v: v > 0, "a number > 0 (1 = off)")
    return SamplingParams(float(temperature), float(top_p), max(int(top_k), 0), float(penalty))


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


def _common(body: dict, served: Served) -> dict:
    if _int(body, "n", 1, lambda v: v == 1, "1 (one choice per request)") != 1:
        raise APIError("n must be 1", "n")
    for name, off in UNSUPPORTED.items():  # said no to, rather than silently ignored
        if body.get(name) not in (None, *off):
            raise APIError(f"{name} is not supported by this server", name)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise APIError("stream_options must be an object", "stream_options")
    return dict(sampling=_sampling(body, served), seed=_int(body, "seed", None, lambda v: True, "an integer"),
                stop=_stop(body), stream=_bool(body, "stream"), include_usage=bool((opts or {}).get("include_usage")))


def _request(kind: str, head: tuple, ids: list, max_tokens: int, served: Served, echo: str = "") -> Request:
    """The engine Request for checked prompt ids; head: (model, adapter, _common's fields). Its key is the reply's
    id."""
    model, adapter, c = head
    reply = Reply(kind, model, c["stop"], c["stream"], c["include_usage"], echo)
    return Request(ids, max_tokens, c["sampling"], frozenset(served.tok.stop_ids), c["seed"], adapter,
                   key=reply.id, reply=reply)


def parse_chat(body: dict, served: Served) -> Request:
    """POST /v1/chat/completions -> Request; the dialog is encoded in the checkpoint's chat format."""
    head = (*_model(body, served), _common(body, served))
    msgs = _messages(body)
    try:
        ids = served.tok.encode_dialog(msgs, add_generation_prompt=True)
    except ValueError as e:  # e.g. roles out of order for an [INST] format
        raise APIError(f"messages: {e}", "messages") from None
    return _request("chat", head, ids, _max_tokens(body, served, len(ids), "messages"), served)


def parse_completion(body: dict, served: Served) -> Request:
    """POST /v1/completions -> Request; the prompt is plain text (or token ids), with BOS as the tokenizer adds it."""
    head = (*_model(body, served), _common(body, served))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    vocab = served.tok.vocab_size
    if isinstance(prompt, str) and prompt:
        ids = served.tok.encode(prompt, bos=True)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                     for t in prompt):
        ids = list(prompt)
    else:
        raise APIError("prompt must be a non-empty string or a list of token ids (one prompt per request)", "prompt")
    if not ids:
        raise APIError("prompt encodes to no tokens", "prompt")
    echo = (prompt if isinstance(prompt, str) else served.tok.decode(ids)) if _bool(body, "echo") else ""
    return _request("completion", head, ids, _max_tokens(body, served, len(ids), "prompt"), served, echo)


# ---- responses ----

def usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def response(req: Request, text: str, finish: str, n_completion: int) -> dict:
    """The non-streamed answer."""
    r, u = req.reply, usage(len(req.prompt), n_completion)
    if r.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        return {"id": f"chatcmpl-{r.id}", "object": "chat.completion", "created": r.created, "model": r.model,
                "choices": [choice], "usage": u}
    choice = {"index": 0, "text": r.echo + text, "logprobs": None, "finish_reason": finish}
    return {"id": f"cmpl-{r.id}", "object": "text_completion", "created": r.created, "model": r.model,
            "choices": [choice], "usage": u}


def chunk(req: Request, text: Optional[str] = None, finish: Optional[str] = None, first: bool = False,
          usage_only: Optional[dict] = None) -> dict:
    """One streamed chunk: a piece of text, the final finish_reason, or (stream_options.include_usage) the usage."""
    r = req.reply
    if r.kind == "chat":
        head = {"id": f"chatcmpl-{r.id}", "object": "chat.completion.chunk", "created": r.created, "model": r.model}
        delta = {"role": "assistant", "content": text or ""} if first else ({} if text is None else {"content": text})
        choices = [] if usage_only else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        head = {"id": f"cmpl-{r.id}", "object": "text_completion", "created": r.created, "model": r.model}
        choices = [] if usage_only else [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
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
