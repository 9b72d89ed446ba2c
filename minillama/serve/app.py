"""The HTTP side: FastAPI routes for the OpenAI endpoints, server-sent events, and the chat page at GET /.

    app = create_app(served, loop)     # served: protocol.Served, loop: worker.BatchLoop (started)
    app = create_app(served, loop, api_key="KEY", log=print)   # 401 without the key; one log line per request

Every request is checked (protocol.parse_*) before it reaches the batching loop; a bad one gets HTTP 400 with an
OpenAI error body naming the field. A client that disconnects (closes the stream, or gives up waiting) has its
request cancelled, which frees its cache row at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
from importlib import resources
from typing import Callable, Optional

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..inference.request import Event, Request
from . import protocol
from .observe import Observe, Record, make_metrics
from .protocol import APIError
from .text import TextStream

POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


def chat_page(name: str = "chat.html") -> str:
    """The chat page, or its Markdown renderer (markdown.js), from the package."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


class Answer:
    """One request's run in the batching loop: its events arrive on an asyncio queue and become text pieces."""

    def __init__(self, req: Request, served, loop, record: Optional[Record] = None):
        self.req, self.loop = req, loop
        self.record = record or Record("POST", "")
        self.record.id = req.reply.id
        if req.fork_of is None:  # a prompt counts once, whatever its number of samples
            self.record.n_in += len(req.prompt)
        self.text = TextStream(served.tok, req.reply.stop)
        self.events: asyncio.Queue = asyncio.Queue()
        self.tokens, self.finish = 0, None
        self.logprobs: list = []  # TokenLogprob per answer token, when the request asked for logprobs
        aio = asyncio.get_running_loop()
        self.key = loop.submit(req, lambda ev: aio.call_soon_threadsafe(self.events.put_nowait, ev))

    async def pieces(self, poll=None):
        """Yield text pieces until the answer ends; self.finish is then "stop" or "length". self.logprobs grows with
        the tokens."""
        while self.finish is None:
            try:
                ev: Event = await asyncio.wait_for(self.events.get(), POLL_S) if poll else await self.events.get()
            except asyncio.TimeoutError:
                if await poll():
                    self.cancel()
                    return
                continue
            if ev.finish == "error":
                raise RuntimeError("the model failed while generating this answer (see the server log)")
            if ev.finish is not None:
                self.key = None  # the engine freed the row itself
            piece = ""
            if ev.token is not None and not self.text.stopped:
                self.tokens += 1
                self.record.n_out += 1
                if self.record.first_token is None:
                    self.record.first_token = time.perf_counter()
                piece = self.text.push(ev.token)
                if ev.logprob is not None:
                    self.logprobs.append(ev.logprob)
            if self.text.stopped:  # a stop string: the row is freed now, not after max_tokens
                self.cancel()
                self.finish = "stop"
            elif ev.finish is not None:
                self.finish = ev.finish
                piece += self.text.finish(cut=ev.finish == "length")
            if piece:
                yield piece

    def cancel(self) -> None:
        """Free the request's row (a no-op once it ended)."""
        if self.key is not None:
            self.loop.cancel(self.key)
            self.key = None


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _chunks(answer: Answer, tok):
    """One choice's chunks: the echo (with the prompt's logprobs), its pieces with their tokens' logprobs (and the
    usage so far when asked), the end. With tools, whether the answer is a call is known at its end: it comes as one
    piece."""
    req, sent, before = answer.req, 0, b""
    n_prompt = len(req.prompt)
    if req.reply.tool_format is not None:
        yield protocol.chunk(req, text=req.reply.echo, first=True)
        text = "".join([p async for p in answer.pieces()])
        calls = protocol.tool_calls(req, text)
        yield protocol.chunk(req, calls=calls) if calls else protocol.chunk(req, text=text)
        yield protocol.chunk(req, finish="tool_calls" if calls else answer.finish)
        return
    echo_logprobs = bool(req.reply.echo) and req.reply.logprobs is not None  # completions: they ride on the echo

    def echo():
        lps = protocol.completion_logprobs(tok, req.prompt, req.reply.prompt_source.prompt_token_logprobs)
        return protocol.chunk(req, text=req.reply.echo, first=True, logprobs=lps)
    if not echo_logprobs:
        yield protocol.chunk(req, text=req.reply.echo, first=True)
    async for piece in answer.pieces():
        if echo_logprobs:  # the prompt's logprobs are known once it is prefilled: before this answer's first piece
            yield echo()
            before, echo_logprobs = b"".join(tok.token_bytes(t) for t in req.prompt), False
        new, sent, lps = answer.logprobs[sent:], len(answer.logprobs), None
        if req.reply.logprobs is not None and req.reply.kind == "chat":
            lps = protocol.chat_logprobs(tok, new)
        elif req.reply.logprobs is not None:
            lps = protocol.completion_logprobs(tok, [e.token for e in new], new, before)
            before += b"".join(tok.token_bytes(e.token) for e in new)
        yield protocol.chunk(req, text=piece, logprobs=lps, running=protocol.usage(n_prompt, answer.tokens))
    if echo_logprobs:
        yield echo()
    yield protocol.chunk(req, finish=answer.finish, running=protocol.usage(n_prompt, answer.tokens))


async def _stream(answers: list[Answer], tok):
    """Server-sent events of every choice, interleaved as their pieces come."""
    reqs, queue = [a.req for a in answers], asyncio.Queue()

    async def pump(answer):
        try:
            async for c in _chunks(answer, tok):
                await queue.put(c)
        except RuntimeError as e:
            await queue.put(e)
        finally:
            await queue.put(None)
    tasks = [asyncio.create_task(pump(a)) for a in answers]
    try:
        left = len(answers)
        while left:
            item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, RuntimeError):
                yield _sse({"error": {"message": str(item), "type": "server_error", "param": None, "code": None}})
                return
            else:
                yield _sse(item)
        if reqs[0].reply.include_usage:
            u = protocol.request_usage(reqs, sum(a.tokens for a in answers))
            yield _sse(protocol.chunk(reqs[0], usage_only=u))
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away mid-stream (the response task is cancelled)
        for task in tasks:
            task.cancel()
        for a in answers:
            a.cancel()


async def _collect(answer: Answer, http: HTTPRequest) -> protocol.Choice:
    try:
        text = "".join([p async for p in answer.pieces(poll=http.is_disconnected)])
    finally:
        answer.cancel()
    return protocol.Choice(answer.req, text, answer.finish, answer.tokens, answer.logprobs)


async def _run(http: HTTPRequest, reqs: list[Request], served, loop):
    record = getattr(http.state, "record", None)
    answers = [Answer(req, served, loop, record) for req in reqs]
    if reqs[0].reply.stream:
        return StreamingResponse(_stream(answers, served.tok), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        choices = await asyncio.gather(*[_collect(a, http) for a in answers])
    finally:
        for a in answers:
            a.cancel()
    if any(c.finish is None for c in choices):  # the client left; nobody reads this
        return JSONResponse({}, status_code=499)
    return JSONResponse(protocol.response(choices, served.tok))


def create_app(served, loop, api_key: Optional[str] = None, log: Optional[Callable[[str], None]] = None):
    """The routes; served describes the model, loop is the running worker.BatchLoop. api_key: required as
    'Authorization: Bearer KEY' on every route but /health and the page; log: gets one line per request."""
    app = FastAPI(title="minillama", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = make_metrics(lambda: loop.stats())  # read at each scrape

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return JSONResponse(APIError(str(e)).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(f"{request.method} {request.url.path}: {e.detail}", kind=kind).body(),
                            status_code=e.status_code)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request, e):  # it left mid-body: nobody reads an answer, and it is not a server error
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):  # a bug: say so, keep serving
        return JSONResponse(APIError(f"{type(e).__name__}: {e}", kind="server_error").body(), status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(chat_page())

    @app.get("/markdown.js")
    async def markdown():
        return Response(chat_page("markdown.js"), media_type="text/javascript")

    @app.get("/health")
    async def health():
        return {"status": "ok", **loop.stats()}

    @app.get("/metrics")
    async def scrape():
        if metrics is None:
            raise APIError("GET /metrics needs prometheus_client: pip install -e '.[serve]'", status=501,
                           kind="server_error")
        body, content_type = metrics.text()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return protocol.models(served)

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        return protocol.model_card(served, name)

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        return await _run(http, protocol.parse_chat(protocol.parse_body(await http.body()), served), served, loop)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await _run(http, protocol.parse_completion(protocol.parse_body(await http.body()), served), served,
                          loop)

    return Observe(app, api_key, metrics, log)
