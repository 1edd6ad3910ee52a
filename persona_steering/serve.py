"""The ``serve`` stage: an OpenAI- and Ollama-compatible HTTP server whose model ids are personas.

Every request becomes a ``Job`` for the one continuous-batching decode loop (``scheduler``); the
persona or ad-hoc weights of a request choose its row's steering vector (``catalog``). Errors
have OpenAI's shape ``{"error": {"message", "type", "code"}}``; no request can stop the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from persona_steering import __version__
from persona_steering.catalog import Catalog, UnknownPersona
from persona_steering.config import Config, ConfigError
from persona_steering.generation import messages_text
from persona_steering.runtime import Runtime, load_runtime
from persona_steering.scheduler import Event, Job, QueueFull, Sampling, Scheduler

log = logging.getLogger(__name__)
ROLES = ("system", "developer", "user", "assistant")
RETRY_AFTER_S = 1
POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


@dataclass
class Chat:
    """One chat request, checked: the persona's job and how to answer."""

    model: str
    job: Job
    stream: bool
    include_usage: bool = False


def run_serve(cfg: Config) -> None:
    """Load the model once and serve until interrupted (the ``serve`` command)."""
    import uvicorn

    cfg.model.require_one_process("serve")
    rt = load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
    app = build_app(cfg, rt, os.environ.get(cfg.serve.api_key_env) or None)
    auth = f"; Bearer key from ${cfg.serve.api_key_env}" if os.environ.get(cfg.serve.api_key_env) else ""
    print(f"serving {rt.model_id} at http://{cfg.serve.host}:{cfg.serve.port}/ (OpenAI API at /v1{auth})")
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning")


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread for the block (port 0: a free one); yields its URL."""
    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="persona-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def build_app(cfg: Config, rt: Runtime, api_key: str | None = None) -> FastAPI:
    """The FastAPI app; the decode loop runs while the app does. ``api_key`` None = no auth."""
    scheduler = Scheduler(rt, cfg.serve.max_queue, cfg.serve.max_rows)
    catalog = Catalog(cfg, rt.slug, rt.fingerprint)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="persona-steering", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.catalog = scheduler, catalog

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 429 else None
        body = {"error": {"message": exc.message, "type": exc.type, "code": exc.code, "param": None}}
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")  # the server goes on; the client gets OpenAI's error shape
        message = f"internal error: {type(exc).__name__}: {exc}"
        body = {
            "error": {"message": message, "type": "server_error", "code": "internal_error", "param": None}
        }
        return JSONResponse(body, status_code=500)

    async def check_key(request: Request) -> None:
        """A dependency, not a middleware: Starlette's BaseHTTPMiddleware hides client disconnects."""
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise ApiError(
                    401, "wrong or missing API key: send Authorization: Bearer <key>", code="invalid_api_key"
                )

    api = APIRouter(dependencies=[Depends(check_key)])

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("persona_steering").joinpath("serve_page.html").read_text()

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(p, rt) for p in catalog.personas()]}

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        chat = _chat(await _json(request), cfg, scheduler, catalog)
        _submit(scheduler, chat.job)
        if chat.stream:
            return StreamingResponse(_sse(chat, rt), media_type="text/event-stream")
        return JSONResponse(await _completion(chat, rt, request))

    @api.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [_ollama_tag(p) for p in catalog.personas()]}

    @api.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @api.post("/api/chat")
    async def ollama_chat(request: Request) -> Any:
        body = await _json(request)
        chat = _chat(_from_ollama(body), cfg, scheduler, catalog)
        _submit(scheduler, chat.job)
        if chat.stream:
            return StreamingResponse(_ollama_lines(chat), media_type="application/x-ndjson")
        return JSONResponse(await _ollama_whole(chat, request))

    app.include_router(api)
    return app


# -- requests ----------------------------------------------------------------------------------


async def _json(request: Any) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _chat(body: dict[str, Any], cfg: Config, scheduler: Scheduler, catalog: Catalog) -> Chat:
    """Check an OpenAI chat request and turn it into a job; ApiError naming the bad field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(
            400, "model is required: a persona id from /v1/models, or 'base'", code="missing_model"
        )
    try:
        persona = catalog.get(model)
        steering = persona.steering if body.get("steering") is None else catalog.adhoc(body["steering"])
    except UnknownPersona as exc:
        raise ApiError(404, str(exc), code="model_not_found") from None
    except ConfigError as exc:
        raise ApiError(400, str(exc), code="invalid_steering") from None
    text = messages_text(scheduler.rt.tokenizer, _messages(body.get("messages")))
    max_tokens = _field(body, "max_completion_tokens", int, None, 1)
    max_tokens = max_tokens or _field(body, "max_tokens", int, cfg.serve.max_tokens, 1)
    temperature = _field(body, "temperature", float, cfg.generation.temperature, 0.0, 2.0)
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=_field(body, "top_p", float, cfg.generation.top_p, 0.0, 1.0),
        seed=_field(body, "seed", int, cfg.seed),
        stop=_stops(body.get("stop")),
        repetition_penalty=cfg.generation.repetition_penalty,
    )
    n = _field(body, "n", int, 1, 1, cfg.serve.max_rows)
    prompt = scheduler.encode(text)
    limit = int(getattr(scheduler.rt.model.config, "max_position_embeddings", 0) or 0)
    if limit and len(prompt) + max_tokens > limit:
        raise ApiError(
            400,
            f"the prompt has {len(prompt)} tokens and max_tokens is {max_tokens}, more than the model's "
            f"{limit}: shorten the messages or lower max_tokens",
            code="context_length_exceeded",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false")
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
    return Chat(model, Job(prompt, steering, sampling, n), stream, include_usage)


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", code="invalid_messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(
                400, f"messages[{i}].role must be one of {', '.join(ROLES)}", code="invalid_messages"
            )
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: the text ones are read
            content = "".join(
                p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be text", code="invalid_messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _field(
    body: dict[str, Any], name: str, kind: type, default: Any, low: Any = None, high: Any = None
) -> Any:
    """``body[name]`` checked to be a ``kind`` within [low, high]; ``default`` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        bounds = f" in [{low}, {high}]" if high is not None else f" >= {low}" if low is not None else ""
        raise ApiError(
            400,
            f"{name} must be {'an integer' if kind is int else 'a number'}{bounds}, got {value!r}",
            code=f"invalid_{name}",
        )
    return kind(value)


def _stops(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(
            400, "stop must be a string or a list of up to 4 non-empty strings", code="invalid_stop"
        )
    return tuple(stops)


def _submit(scheduler: Scheduler, job: Job) -> None:
    try:
        scheduler.submit(job)
    except QueueFull as exc:
        raise ApiError(
            429, f"the server is busy ({exc}); retry in {RETRY_AFTER_S} s", "rate_limit_error", "queue_full"
        ) from None
    except ValueError as exc:
        raise ApiError(400, str(exc), code="invalid_n") from None


async def _events(job: Job, request: Any = None) -> AsyncIterator[Event]:
    """The job's events until each of its answers has finished; a client that goes away (or an
    exception here, such as the stream being closed) cancels the job, freeing its rows."""
    open_rows, checked = job.n, time.monotonic()
    try:
        while open_rows:
            try:
                event = await asyncio.wait_for(job.events.get(), POLL_S)
            except asyncio.TimeoutError:
                event = None
            if request is not None and time.monotonic() - checked >= POLL_S:  # tokens may never pause
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if event is None:
                continue
            if event.finish == "error":
                raise ApiError(500, f"generation failed: {event.text}", "server_error", "generation_failed")
            if event.finish is not None:
                open_rows -= 1
            yield event
    finally:
        if open_rows:
            job.cancel()


# -- OpenAI responses --------------------------------------------------------------------------


def _model_card(persona: Any, rt: Runtime) -> dict[str, Any]:
    return {
        "id": persona.id,
        "object": "model",
        "created": persona.created,
        "owned_by": "persona-steering",
        "root": rt.model_id,
        "metadata": persona.meta,
    }


async def _completion(chat: Chat, rt: Runtime, request: Any) -> dict[str, Any]:
    texts, finish, tokens = [""] * chat.job.n, ["stop"] * chat.job.n, [0] * chat.job.n
    async for e in _events(chat.job, request):
        texts[e.index] += e.text
        tokens[e.index] = e.tokens
        finish[e.index] = e.finish or finish[e.index]
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": texts[i]},
            "finish_reason": finish[i],
            "logprobs": None,
        }
        for i in range(chat.job.n)
    ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": chat.model,
        "system_fingerprint": rt.fingerprint[:12],
        "choices": choices,
        "usage": _usage(chat.job, sum(tokens)),
    }


async def _sse(chat: Chat, rt: Runtime) -> AsyncIterator[str]:
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": chat.model,
        "system_fingerprint": rt.fingerprint[:12],
    }

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    yield chunk(
        [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            for i in range(chat.job.n)
        ]
    )
    tokens = [0] * chat.job.n
    try:
        async for e in _events(chat.job):
            tokens[e.index] = e.tokens
            if e.text:
                yield chunk([{"index": e.index, "delta": {"content": e.text}, "finish_reason": None}])
            if e.finish:
                yield chunk([{"index": e.index, "delta": {}, "finish_reason": e.finish}])
    except ApiError as exc:
        error = {"message": exc.message, "type": exc.type, "code": exc.code}
        yield f"data: {json.dumps({'error': error})}\n\n"
        return
    finally:  # a closed stream (client gone) frees the rows now, not when the generator is collected
        chat.job.cancel()
    if chat.include_usage:
        yield chunk([], usage=_usage(chat.job, sum(tokens)))
    yield "data: [DONE]\n\n"


def _usage(job: Job, completion: int) -> dict[str, int]:
    prompt = len(job.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# -- Ollama ------------------------------------------------------------------------------------


def _from_ollama(body: dict[str, Any]) -> dict[str, Any]:
    """An Ollama /api/chat body as the OpenAI fields ``_chat`` checks (Ollama streams by default)."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "options must be an object")
    model = body.get("model")
    if isinstance(model, str) and model.endswith(":latest"):
        model = model[: -len(":latest")]
    return {
        "model": model,
        "messages": body.get("messages"),
        "stream": body.get("stream", True),
        "max_tokens": options.get("num_predict"),
        "temperature": options.get("temperature"),
        "top_p": options.get("top_p"),
        "seed": options.get("seed"),
        "stop": options.get("stop"),
        "steering": body.get("steering"),
    }


def _ollama_tag(persona: Any) -> dict[str, Any]:
    modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(persona.created))
    return {
        "name": persona.id,
        "model": persona.id,
        "modified_at": modified,
        "size": 0,
        "digest": "",
        "details": {"family": "persona", "format": "steering", "metadata": persona.meta},
    }


def _ollama_message(chat: Chat, content: str, done: bool, **extra: Any) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "model": chat.model,
        "created_at": now,
        "message": {"role": "assistant", "content": content},
        "done": done,
        **extra,
    }


def _ollama_done(chat: Chat, finish: str, tokens: int) -> dict[str, Any]:
    return {"done_reason": finish, "prompt_eval_count": len(chat.job.prompt_ids), "eval_count": tokens}


async def _ollama_lines(chat: Chat) -> AsyncIterator[str]:
    try:
        async for e in _events(chat.job):
            if e.text:
                yield json.dumps(_ollama_message(chat, e.text, False)) + "\n"
            if e.finish:
                yield (
                    json.dumps(_ollama_message(chat, "", True, **_ollama_done(chat, e.finish, e.tokens)))
                    + "\n"
                )
    except ApiError as exc:
        yield json.dumps({"error": exc.message}) + "\n"
    finally:
        chat.job.cancel()


async def _ollama_whole(chat: Chat, request: Any) -> dict[str, Any]:
    text, finish, tokens = "", "stop", 0
    async for e in _events(chat.job, request):
        text, tokens, finish = text + e.text, e.tokens, e.finish or finish
    return _ollama_message(chat, text, True, **_ollama_done(chat, finish, tokens))
