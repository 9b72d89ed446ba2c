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

from ..inference import constraints
from ..inference.constraints import Constraint
from ..inference.request import Request
from ..inference.sampling import SamplingParams
from ..tokenizer import tools as tl

MAX_STOP_STRINGS = 16
MAX_N = 16  # choices per request (each takes a cache row)
# request fields this server does not implement, with the values that mean "off"
UNSUPPORTED = {"suffix": ("",), "functions": ([],), "function_call": ("none",), "parallel_tool_calls": (True, False),
               "audio": (), "modalities": (["text"],), "prediction": (), "reasoning_effort": (),
               "web_search_options": ()}
# the fields each endpoint reads (or accepts as bookkeeping with no effect on the answer: user, metadata, store,
# service_tier); any other field is a 400 naming it, never silently ignored
COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "min_p",
                 "repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias", "seed", "stop", "n",
                 "logprobs", "response_format", "user", "metadata", "store", "service_tier", *UNSUPPORTED}
FIELDS = {"chat": COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice"},
          "completion": COMMON_FIELDS | {"prompt", "echo", "best_of"}}


class APIError(Exception):
    """An error the client caused (400) or a missing resource (404); param names the request field."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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
    constrained: bool = True  # response_format / forced tool calls available (not under --speculate)

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
    tool_format: Optional[str] = None  # chat format whose tool calls are parsed from the answer (None: no tools)
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (vLLM's): usage so far in every chunk
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
    except RecursionError:
        raise APIError("request body is nested too deeply to read") from None
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


def unknown_model(name, served: Served) -> APIError:
    """OpenAI's answer to a model it does not have: 404 with code model_not_found."""
    why = "" if served.base_servable else f" ({served.base_name} is served only with its merged adapter)"
    return APIError(f"model {name!r} does not exist; this server has: {', '.join(served.model_names())}{why}",
                    "model", status=404, code="model_not_found")


def _model(body: dict, served: Served) -> tuple[str, Optional[str]]:
    """(model name, adapter name or None) of the request's "model" field."""
    name = body.get("model")
    if not isinstance(name, str):
        raise APIError(f"model must be a string naming one of: {', '.join(served.model_names())}", "model")
    if name not in served.model_names():
        raise unknown_model(name, served)
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
        role = {"developer": "system", "ipython": "tool"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(f"messages[{i}].role must be system, user, assistant or tool, got {m.get('role')!r}",
                           f"messages[{i}].role")
        calls = m.get("tool_calls") if role == "assistant" else None
        msg = {"role": role, "content": "" if calls and m.get("content") is None else _content(m, i)}
        if calls:
            msg["tool_calls"] = calls
        if role == "tool":
            msg.update({k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)})
        out.append(msg)
    return out


def _tools(body: dict) -> tuple[list, object]:
    """(checked tools, tool_choice): "auto" (the default with tools), "none", "required" or a named function."""
    raw, choice = body.get("tools"), body.get("tool_choice")
    try:
        tools = tl.check_tools(raw) if raw else []
    except ValueError as e:
        raise APIError(str(e), "tools") from None
    if choice is None:
        choice = "auto" if tools else "none"
    named = isinstance(choice, dict) and choice.get("type", "function") == "function" and \
        isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)
    if choice not in ("auto", "none", "required") and not named:
        raise APIError(f"tool_choice must be auto, none, required or {{type: function, function: {{name}}}}, got "
                       f"{choice!r:.100}", "tool_choice")
    if choice != "none" and not tools:
        raise APIError(f"tool_choice {choice!r:.60} needs a non-empty tools list", "tool_choice")
    return tools, choice


def _constraint(c: Optional[Constraint], served: Served, param: str) -> Optional[Constraint]:
    """c checked against the model's vocabulary now, so a bad schema is a 400 and not a failed answer."""
    if c is None:
        return None
    if not served.constrained:
        raise APIError(f"{param}: constrained decoding is not available on a server run with --speculate", param)
    try:
        constraints.check(c, constraints.grammar_vocab(served.tok))
    except ValueError as e:
        raise APIError(f"{param}: {e}", param) from None
    return c


def _structured(body: dict, served: Served, tools: list, choice) -> Optional[Constraint]:
    """What the answer must match: the response_format, or one call of the tool(s) tool_choice forces."""
    try:
        c = constraints.parse_response_format(body.get("response_format"))
    except ValueError as e:
        raise APIError(f"response_format {e}", "response_format") from None
    forced = choice == "required" or isinstance(choice, dict)
    if c is not None and forced:
        raise APIError("response_format and a forced tool call (tool_choice required or named) cannot be combined",
                       "tool_choice")
    if forced:
        try:
            grammar = tl.tool_call_grammar(served.tok.chat_format, served.tok, tools, choice)
        except ValueError as e:
            raise APIError(str(e), "tool_choice") from None
        return _constraint(Constraint("lark", grammar), served, "tool_choice")
    return _constraint(c, served, "response_format")


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
    return dict(sampling=_sampling(body, served), seed=_int(body, "seed", None, lambda v: -2**63 <= v < 2**64,
                                                        "an integer in [-2**63, 2**64)"),
                stop=_stop(body), stream=_bool(body, "stream"), include_usage=bool((opts or {}).get("include_usage")),
                continuous_usage=bool((opts or {}).get("continuous_usage_stats")), n=n, logprobs=_logprobs(body, kind))


def _requests(kind: str, head: tuple, prompt: int, ids: list, served: Served, more: tuple) -> list[Request]:
    """The engine Requests (n samples) of one checked prompt, the prompt-th of its HTTP request; head: (model,
    adapter, _common's fields); more: (max_tokens, echo text, whether the prompt's logprobs are wanted, the chat
    format whose tool calls are parsed or None, the constraint or None). The first sample prefills the prompt, the
    others fork its keys/values; seeded samples get seed, seed + 1, ..."""
    (model, adapter, c), out, rid = head, [], uuid.uuid4().hex[:24]
    max_tokens, echo, prompt_logprobs, tool_format, constraint = more
    for j in range(c["n"]):
        index = prompt * c["n"] + j
        reply = Reply(kind, model, c["stop"], c["stream"], c["include_usage"], echo, tool_format,
                      c["continuous_usage"], index=index, logprobs=c["logprobs"])
        seed = None if c["seed"] is None else c["seed"] + j
        out.append(Request(ids, max_tokens, c["sampling"], frozenset(served.tok.stop_ids), seed, adapter,
                           key=f"{rid}-{index}", reply=reply, constraint=constraint, logprobs=c["logprobs"],
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
    tools, choice = _tools(body)
    offered = tools if choice != "none" else None
    try:
        ids = served.tok.encode_dialog(msgs, add_generation_prompt=True, tools=offered)
    except ValueError as e:  # e.g. roles out of order for an [INST] format, a format without tools
        raise APIError(f"messages: {e}", "tools" if offered and "tool-calling" in str(e) else "messages") from None
    more = (_max_tokens(body, served, len(ids), "messages"), "", False,
            served.tok.chat_format if offered else None, _structured(body, served, tools, choice))
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
    constraint = _structured(body, served, [], "none")
    for i, prompt in enumerate(_prompts(body, served.tok.vocab_size)):
        ids = served.tok.encode(prompt, bos=True) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(f"prompt {i} encodes to no tokens", "prompt")
        text = (prompt if isinstance(prompt, str) else served.tok.decode(ids)) if echo else ""
        more = (_max_tokens(body, served, len(ids), "prompt"), text, echo and head[2]["logprobs"] is not None, None,
                constraint)
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


def tool_calls(req: Request, text: str) -> list:
    """The answer's tool calls in OpenAI's shape ([] for a plain answer or a request without tools)."""
    r = req.reply
    if r.tool_format is None:
        return []
    return [c.openai(i) if c.id else {**c.openai(i), "id": f"call_{r.id}_{r.index}_{i}"}
            for i, c in enumerate(tl.parse_tool_calls(r.tool_format, text))]


def _chat_choice(c: Choice, tok) -> dict:
    """One chat choice; an answer that is a tool call comes back as tool_calls, finish "tool_calls"."""
    calls = tool_calls(c.req, c.text)
    message = {"role": "assistant", "content": None, "tool_calls": calls} if calls else \
        {"role": "assistant", "content": c.text}
    return {"index": c.req.reply.index, "message": message, "logprobs": choice_logprobs(tok, c),
            "finish_reason": "tool_calls" if calls else c.finish}


def response(choices: list[Choice], tok) -> dict:
    """The non-streamed answer of an HTTP request's choices."""
    r = choices[0].req.reply
    u = request_usage([c.req for c in choices], sum(c.tokens for c in choices))
    if r.kind == "chat":
        out = [_chat_choice(c, tok) for c in choices]
        return {"id": f"chatcmpl-{r.id}", "object": "chat.completion", "created": r.created, "model": r.model,
                "choices": out, "usage": u}
    out = [{"index": c.req.reply.index, "text": c.req.reply.echo + c.text, "logprobs": choice_logprobs(tok, c),
            "finish_reason": c.finish} for c in choices]
    return {"id": f"cmpl-{r.id}", "object": "text_completion", "created": r.created, "model": r.model,
            "choices": out, "usage": u}


def chunk(req: Request, text: Optional[str] = None, finish: Optional[str] = None, first: bool = False,
          usage_only: Optional[dict] = None, logprobs: Optional[dict] = None, calls: Optional[list] = None,
          running: Optional[dict] = None) -> dict:
    """One streamed chunk of a choice: a piece of text (with its tokens' logprobs), tool calls, the final
    finish_reason, or (stream_options.include_usage) the usage; running: the usage so far, sent with
    stream_options.continuous_usage_stats."""
    r = req.reply
    if r.kind == "chat":
        head = {"id": f"chatcmpl-{r.id}", "object": "chat.completion.chunk", "created": r.created, "model": r.model}
        delta = {"role": "assistant", "content": text or ""} if first else ({} if text is None else {"content": text})
        if calls:
            delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
        choices = [] if usage_only else [{"index": r.index, "delta": delta, "logprobs": logprobs,
                                          "finish_reason": finish}]
    else:
        head = {"id": f"cmpl-{r.id}", "object": "text_completion", "created": r.created, "model": r.model}
        choices = [] if usage_only else [{"index": r.index, "text": text or "", "logprobs": logprobs,
                                          "finish_reason": finish}]
    out = {**head, "choices": choices}
    if r.include_usage:
        out["usage"] = usage_only
    if r.continuous_usage and running is not None and usage_only is None:
        out["usage"] = running
    return out


def model_card(served: Served, name: str) -> dict:
    """GET /v1/models/{name}: one model; an adapter's parent is the base model."""
    if name not in served.model_names():
        raise unknown_model(name, served)
    return {"id": name, "object": "model", "created": served.created, "owned_by": "minillama",
            "root": served.base_name, "parent": None if name == served.base_name else served.base_name}


def models(served: Served) -> dict:
    """GET /v1/models: the base model (when servable) and every adapter, whose parent is the base."""
    return {"object": "list", "data": [model_card(served, name) for name in served.model_names()]}
