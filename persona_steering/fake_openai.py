"""A real HTTP server on 127.0.0.1 that speaks enough OpenAI chat completions for the SDK, with faults.

The one fake endpoint: the tests inject faults through it, and ``make bench`` times the judge's
fan-out against it (``delay`` per reply, ``max_requests`` and ``max_seconds`` as a budget).

Each request consumes the next scripted behaviour (``"ok"`` once the script is empty):

- ``"ok"``: reply ``server.content`` (or ``server.content_fn(request)``); with logprobs when asked,
  ``server.top_logprobs`` as the first token's top_logprobs (default: the content with probability 1).
- ``("logprobs", {token: logprob})``: like ok, with this distribution; its likeliest token is the text.
- ``"text:<content>"``: like ok, replying ``<content>`` (one token of that text when logprobs are asked).
- ``"nologprobs"``: like ok, but ``logprobs: null`` even when asked.
- ``"429"`` or ``("429", retry_after_seconds)``: rate limited, with a Retry-After header if given.
- ``"quota"``: 429 with error code insufficient_quota.
- ``"500"``, ``"503"``: server errors.
- ``"hang"``: say nothing for ``server.hang`` seconds (past the client's timeout), then reply ok.
- ``"400"``, ``"401"`` (echoes the bearer token in its message, as a worst case), ``"404"``.
- ``"400-logprobs"``: 400 if the request asked for logprobs, else ok.
- ``"malformed-json"``: 200 whose body is cut in the middle of the JSON.
- ``"non-json"``: 200 with an HTML page (text/html), as a proxy in the way would send.
- ``"non-utf8"``: 200, application/json, whose body is not UTF-8.
- ``"drop"``: close the connection without a reply.
- past ``max_requests`` requests or ``max_seconds`` after the server started, every request gets
  a 503 ("budget spent"), so a runaway client cannot keep it busy.

With ``server.faults = {behaviour: probability}`` and the script empty, each request draws its
behaviour from that mix (seeded by ``server.seed``; "ok" for the rest); ``server.injected`` counts
what was served, faults and ok alike.

Every request is recorded (path, headers, raw body) in ``server.requests``.
"""

from __future__ import annotations

import json
import math
import random
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Behaviour = str | tuple[str, Any]


@dataclass
class Recorded:
    """One request as the server received it."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


class FakeOpenAI:
    """Context manager running the server in a background thread; stops it (and any hang) on exit."""

    def __init__(
        self,
        content: str = "4",
        delay: float = 0.0,
        hang: float = 2.0,
        max_requests: int | None = None,
        max_seconds: float | None = None,
    ) -> None:
        self.content = content
        self.content_fn: Callable[[dict[str, Any]], str] | None = None
        """When set, ok replies answer content_fn(request body) instead of ``content``."""
        self.top_logprobs: dict[str, float] | None = None
        self.delay = delay
        """Seconds every non-hanging reply waits first (for concurrency tests)."""
        self.hang = hang
        self.requests: list[Recorded] = []
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self._started = time.monotonic()
        self.faults: dict[str, float] = {}
        self.seed = 0
        self.injected: Counter[str] = Counter()
        self._rng: random.Random | None = None
        self._script: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        # A short poll interval makes shutdown (every test's teardown) take milliseconds, not 0.5 s.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-openai", daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def push(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, in order."""
        with self._lock:
            self._script.extend(behaviours)

    def __enter__(self) -> FakeOpenAI:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # wakes hanging handlers
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # Called from handler threads.
    def _next(self, record: Recorded) -> Behaviour:
        with self._lock:
            self.requests.append(record)
            if self._spent():
                self.injected["budget"] += 1
                return "budget"
            behaviour = self._script.popleft() if self._script else self._draw()
            self.injected[behaviour if isinstance(behaviour, str) else behaviour[0]] += 1
            return behaviour

    def _spent(self) -> bool:
        over_count = self.max_requests is not None and len(self.requests) > self.max_requests
        over_time = self.max_seconds is not None and time.monotonic() - self._started > self.max_seconds
        return over_count or over_time

    def _draw(self) -> Behaviour:
        if not self.faults:
            return "ok"
        if self._rng is None:
            self._rng = random.Random(self.seed)
        u, acc = self._rng.random(), 0.0
        for name, p in self.faults.items():
            acc += p
            if u < acc:
                return ("429", 0.05) if name == "429" else name
        return "ok"

    def _wait(self, seconds: float) -> None:
        self._stop.wait(seconds)


def _handler(state: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep pytest output clean
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            record = Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            behaviour = state._next(record)
            try:
                self._respond(behaviour, record)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout): nothing to answer

        def _respond(self, behaviour: Behaviour, record: Recorded) -> None:
            if record.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, "not_found", f"no route {record.path}")
            name, arg = behaviour if isinstance(behaviour, tuple) else (behaviour, None)
            request = json.loads(record.body)
            if name == "hang":
                state._wait(state.hang)
                if state._stop.is_set():
                    return None
                return self._ok(request, state.content, state.top_logprobs)
            if name == "budget":
                return self._error(503, None, "fake server budget spent")
            if name == "429":  # at once, delay or not: the pause it asks for is what tests measure
                headers = {"Retry-After": str(arg)} if arg is not None else {}
                return self._error(429, "rate_limit_exceeded", "Rate limit reached", headers)
            state._wait(state.delay)
            if name == "ok":
                content = state.content_fn(request) if state.content_fn else state.content
                return self._ok(request, content, state.top_logprobs)
            if name == "logprobs":
                top: dict[str, float] = arg or {}
                return self._ok(request, max(top, key=lambda t: top[t]), top)
            if name.startswith("text:"):
                return self._ok(request, name[len("text:") :], None)
            if name == "nologprobs":
                return self._ok(request, state.content, None, null_logprobs=True)
            if name == "quota":
                return self._error(429, "insufficient_quota", "You exceeded your current quota")
            if name in ("500", "503"):
                return self._error(int(name), None, "The server had an error")
            if name == "400" or (name == "400-logprobs" and request.get("logprobs")):
                return self._error(400, "invalid_request_error", "Invalid request")
            if name == "400-logprobs":
                return self._ok(request, state.content, state.top_logprobs)
            if name == "401":
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                return self._error(401, "invalid_api_key", f"Incorrect API key provided: {token}.")
            if name == "404":
                return self._error(404, "model_not_found", "The model does not exist")
            if name == "malformed-json":
                return self._send(200, b'{"id": "chatcmpl-x", "choices": [{"index": 0, "mess')
            if name == "non-json":
                return self._send(200, b"<html><body>502 Bad Gateway</body></html>", content_type="text/html")
            if name == "non-utf8":
                return self._send(200, b'{"id": "chatcmpl-\xff\xfe", "choices": []}')
            if name == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            raise ValueError(f"unknown behaviour {behaviour!r}")

        def _ok(
            self,
            request: dict[str, Any],
            content: str,
            top: dict[str, float] | None,
            null_logprobs: bool = False,
        ) -> None:
            logprobs = None
            if request.get("logprobs") and not null_logprobs:
                top = top or {content: 0.0}
                first = max(top, key=top.get)  # type: ignore[arg-type]
                entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top.items()]
                logprobs = {
                    "content": [
                        {
                            "token": first,
                            "logprob": top[first],
                            "bytes": list(first.encode()),
                            "top_logprobs": entries,
                        }
                    ]
                }
            payload = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 0,
                "model": request.get("model", "fake"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "logprobs": logprobs,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            self._send(200, json.dumps(payload).encode())

        def _error(
            self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None
        ) -> None:
            body = {
                "error": {"message": message, "type": code or "server_error", "param": None, "code": code}
            }
            self._send(status, json.dumps(body).encode(), headers)

        def _send(
            self,
            status: int,
            body: bytes,
            headers: dict[str, str] | None = None,
            content_type: str = "application/json",
        ) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout): nothing to answer

    return Handler


def ln(p: float) -> float:
    """Natural log, for writing top_logprobs as probabilities."""
    return math.log(p)
