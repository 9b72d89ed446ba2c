"""What the server says about its requests: the API key check, one log line per request, Prometheus metrics.

Observe is an ASGI middleware around the routes (pure ASGI, so a streamed answer is logged when its last byte is
sent and a client's disconnect still reaches the route). A route fills the request's Record (scope["state"]["record"]:
the job id, tokens in and out, the first token's time); the middleware adds the status and the duration.
"""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

# no key needed: liveness, and the static page and its renderer (the page asks for the key itself)
OPEN_PATHS = ("/health", "/", "/markdown.js")
ROUTES = ("/", "/markdown.js", "/health", "/metrics", "/v1/models", "/v1/chat/completions",
          "/v1/completions")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Record:
    """One HTTP request as the log line and the metrics see it."""

    method: str
    route: str
    start: float = field(default_factory=time.perf_counter)
    status: int = 0
    id: Optional[str] = None  # the job id (chat/completions only)
    n_in: int = 0  # prompt tokens
    n_out: int = 0  # completion tokens
    first_token: Optional[float] = None  # perf_counter() when the first token arrived

    def ttft(self) -> Optional[float]:
        return None if self.first_token is None else self.first_token - self.start


def route_of(path: str) -> str:
    """A metrics label with bounded values: the route's template, "other" for anything unknown."""
    if path in ROUTES:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


class Metrics:
    """The Prometheus series, in a registry of their own (two servers in one process do not collide)."""

    def __init__(self, stats: Callable[[], dict]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("minillama_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("minillama_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("minillama_completion_tokens", "generated tokens", registry=r)
        Gauge("minillama_queue_depth", "requests waiting for a cache row", registry=r).set_function(
            lambda: stats()["waiting"])
        Gauge("minillama_running_rows", "requests being decoded now", registry=r).set_function(
            lambda: stats()["running"])
        self.ttft = Histogram("minillama_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=r)

    def record(self, rec: Record) -> None:
        self.requests.labels(rec.route, str(rec.status)).inc()
        if rec.id is not None:
            self.prompt_tokens.inc(rec.n_in)
            self.completion_tokens.inc(rec.n_out)
        if rec.ttft() is not None:
            self.ttft.observe(rec.ttft())

    def text(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def make_metrics(stats: Callable[[], dict]) -> Optional[Metrics]:
    """Metrics, or None without prometheus_client (GET /metrics then says how to install it)."""
    try:
        return Metrics(stats)
    except ImportError:
        return None


def _bearer(scope) -> Optional[str]:
    for k, v in scope.get("headers", ()):
        if k == b"authorization":
            scheme, _, token = v.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


UNAUTHORIZED = {"error": {"message": "Incorrect or missing API key: send the header 'Authorization: Bearer KEY' with "
                                     "this server's --api_key", "type": "invalid_request_error", "param": None,
                          "code": "invalid_api_key"}}


class Observe:
    """ASGI middleware: 401 without the key (api_key set), then a Record per request, logged and counted."""

    def __init__(self, app, api_key: Optional[str], metrics: Optional[Metrics], log: Optional[Callable[[str], None]]):
        self.app, self.api_key, self.metrics, self.log = app, api_key, metrics, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rec = Record(scope["method"], route_of(scope["path"]))
        scope.setdefault("state", {})["record"] = rec

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                rec.status = msg["status"]
            await send(msg)
        try:
            given = _bearer(scope)
            if self.api_key and scope["path"] not in OPEN_PATHS and not (
                    given is not None and hmac.compare_digest(given.encode(), self.api_key.encode())):
                body = json.dumps(UNAUTHORIZED).encode()
                await send_status({"type": "http.response.start", "status": 401,
                                   "headers": [(b"content-type", b"application/json"),
                                               (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
            await self.app(scope, receive, send_status)
        finally:
            self.finish(rec)

    def finish(self, rec: Record) -> None:
        rec.status = rec.status or 499  # the client left before an answer started
        if self.metrics is not None:
            self.metrics.record(rec)
        if self.log is not None and rec.route not in ("/health", "/metrics"):
            ttft = "" if rec.ttft() is None else f" ttft={rec.ttft():.3f}s"
            self.log(f"[request {rec.id or '-'} {rec.method} {rec.route} {rec.status} in={rec.n_in} "
                     f"out={rec.n_out} {time.perf_counter() - rec.start:.3f}s{ttft}]")
