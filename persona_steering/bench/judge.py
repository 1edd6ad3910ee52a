"""Judge fan-out: OpenAIJudge calls at the configured concurrency against one at a time, served by
a local OpenAI-compatible server that replies after a fixed delay."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from persona_steering.cache import canonical_json
from persona_steering.config import JudgeConfig

BENCH_KEY_ENV = "PERSONA_STEERING_BENCH_DUMMY_KEY"
"""Variable holding the dummy key of the judge run: never the user's real OPENAI_API_KEY."""


def bench_judge(judge_cfg: JudgeConfig, verdicts: int, delay: float, log: Any = print) -> dict[str, Any]:
    """``verdicts`` OpenAIJudge calls against a local server that answers after ``delay`` seconds,
    at the configured concurrency and one at a time. The dummy key lives in the environment only
    for this call."""
    from persona_steering.judges import Query
    from persona_steering.judges.openai import OpenAIJudge

    queries = [Query("coherence", f"question {i}", f"answer {i}") for i in range(verdicts)]
    out: dict[str, Any] = {"verdicts": verdicts, "delay_s": delay, "concurrency": judge_cfg.concurrency}
    with (
        _DelayedServer(
            delay, max_requests=4 * verdicts, max_seconds=60 + 3 * verdicts * (delay + 0.5)
        ) as server,
        _env(BENCH_KEY_ENV, "sk-bench-dummy"),
    ):
        for label, concurrency in (("ours", judge_cfg.concurrency), ("one_at_a_time", 1)):
            jc = dataclasses.replace(
                judge_cfg,
                backend="openai",
                model="bench",
                base_url=server.base_url,
                api_key_env=BENCH_KEY_ENV,
                concurrency=concurrency,
                timeout=30.0,
                max_attempts=2,
            )
            judge = OpenAIJudge(jc, env_file=os.devnull)
            started = time.perf_counter()
            got = judge.judge(queries, None)
            out[f"{label}_s"] = time.perf_counter() - started
            out[f"{label}_ok"] = sum(v.ok for v in got)
            log(f"  judge {label:<14} concurrency {concurrency}: {out[f'{label}_s']:7.2f} s")
    out["speedup"] = out["one_at_a_time_s"] / out["ours_s"]
    return out


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the block only."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class _DelayedServer:
    """A minimal OpenAI-compatible chat endpoint on 127.0.0.1 that replies "90" after ``delay`` s.

    Bounded: after ``max_requests`` requests or ``max_seconds`` it answers 503, and it stops (waking
    any sleeping handler) when the block ends.
    """

    def __init__(self, delay: float, max_requests: int, max_seconds: float) -> None:
        self.delay, self.max_requests, self.deadline = delay, max_requests, time.monotonic() + max_seconds
        self.count = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _delayed_handler(self))
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def admit(self) -> bool:
        with self.lock:
            self.count += 1
            return self.count <= self.max_requests and time.monotonic() < self.deadline

    def __enter__(self) -> _DelayedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _delayed_handler(state: _DelayedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no access log on stderr
            pass

        def do_POST(self) -> None:
            request = _json_body(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if not state.admit():
                return self._send(
                    503, {"error": {"message": "bench server budget spent", "type": "server_error"}}
                )
            state.stop.wait(state.delay)
            token = {"token": "90", "logprob": 0.0, "bytes": [57, 48]}
            logprobs = {"content": [token | {"top_logprobs": [token]}]} if request.get("logprobs") else None
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": "90"},
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
            self._send(
                200,
                {
                    "id": "bench",
                    "object": "chat.completion",
                    "created": 0,
                    "model": "bench",
                    "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                },
            )

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            body = canonical_json(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up: nothing to answer

    return Handler


def _json_body(raw: bytes) -> dict[str, Any]:
    import json

    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
