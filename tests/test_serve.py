"""The persona server through the real openai SDK, on 127.0.0.1, with a tiny random model."""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai SDK brings

from serve_helpers import PERSONAS, TRAITS, Server, serve_config, write_persona  # noqa: E402
from tests_helpers import write_fake_vectors  # noqa: E402

from persona_steering.config import load_config  # noqa: E402
from persona_steering.runtime import identify, load_runtime  # noqa: E402

KEY = "test-key-123"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """A running server over the tiny model with three personas; yields (server, root, cfg)."""
    import torch

    torch.set_num_threads(1)  # tiny model: a second thread only spin-waits on this shared machine
    root = tmp_path_factory.mktemp("serve")
    cfg = serve_config(root, tiny_model_dir)
    ident = identify(cfg.model)
    write_fake_vectors(root / "vectors" / ident.slug, ident.fingerprint, ident.model_id, TRAITS)
    for pid, weights in PERSONAS.items():
        write_persona(root / "runs", pid, weights)
    rt = load_runtime(cfg.model, cfg.cache_dir)
    with Server(cfg, rt, KEY) as server:
        yield server, root, cfg


@pytest.fixture()
def client(served):
    server, _, _ = served
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, model: str, text: str = "how was your weekend ?", **kw) -> str:
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)
    return out.choices[0].message.content


def test_models_lists_base_and_personas_with_metadata(client):
    models = {m.id: m for m in client.models.list().data}
    assert {"base", *PERSONAS} <= set(models)
    meta = models["grandpa"].model_extra["metadata"]
    assert meta["weights"] == PERSONAS["grandpa"]
    assert meta["layer"] == 2 and meta["alpha"] == 2.0 and meta["score"] == 0.42
    assert meta["scores"] == {"style": 0.5, "relevance": 0.3}


def test_completion_with_usage_system_and_multi_turn(client):
    messages = [
        {"role": "system", "content": "be warm"},
        {"role": "user", "content": "hello !"},
        {"role": "assistant", "content": "hi friend"},
        {"role": "user", "content": "how was your day ?"},
    ]
    out = client.chat.completions.create(model="grandpa", messages=messages, max_tokens=5)
    assert out.object == "chat.completion" and out.model == "grandpa"
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 10
    assert 1 <= out.usage.completion_tokens <= 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_steering_changes_the_answer_and_adhoc_weights_equal_the_persona(client):
    base, grandpa = ask(client, "base"), ask(client, "grandpa")
    assert base != grandpa
    adhoc = ask(
        client, "base", extra_body={"steering": {"weights": PERSONAS["grandpa"], "alpha": 2.0, "layer": 2}}
    )
    assert adhoc == grandpa


def test_streaming_chunks_add_up_to_the_whole_answer(client):
    whole = ask(client, "pirate", max_tokens=10)
    stream = client.chat.completions.create(
        model="pirate",
        messages=[{"role": "user", "content": "how was your weekend ?"}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_stream_ends_with_done(served):
    server, _, _ = served
    body = {
        "model": "base",
        "messages": [{"role": "user", "content": "hello !"}],
        "stream": True,
        "max_tokens": 3,
    }
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"


def test_sampling_n_seed_and_stop(client):
    kw = {"temperature": 1.5, "top_p": 0.9, "seed": 7, "n": 3, "max_tokens": 8}
    first = client.chat.completions.create(model="calm", messages=[{"role": "user", "content": "hi"}], **kw)
    again = client.chat.completions.create(model="calm", messages=[{"role": "user", "content": "hi"}], **kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    short = client.chat.completions.create(
        model="calm", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3
    )
    assert short.usage.completion_tokens <= 3
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    whole = ask(client, "base", max_tokens=12)
    words = whole.split()
    if len(words) >= 3:
        cut = ask(client, "base", max_tokens=12, stop=[words[2]])
        assert words[2] not in cut and whole.startswith(cut)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "nobody", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
        (
            {"model": "../runs/grandpa", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "model_not_found",
        ),
        ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "invalid_n"),
        (
            {"model": "base", "messages": [{"role": "user", "content": "hi"}], "stop": [1]},
            400,
            "invalid_stop",
        ),
        ({"model": "base", "messages": []}, 400, "invalid_messages"),
        ({"model": "base", "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_messages"),
        (
            {"model": "base", "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
            400,
            "invalid_temperature",
        ),
        (
            {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
            400,
            "invalid_max_tokens",
        ),
        (
            {"model": "base", "messages": [{"role": "user", "content": "hi " * 600}]},
            400,
            "context_length_exceeded",
        ),
        (
            {
                "model": "base",
                "messages": [{"role": "user", "content": "hi"}],
                "steering": {"weights": {"R9": 1}},
            },
            400,
            "invalid_steering",
        ),
    ],
)
def test_errors_have_openai_shape(served, body, status, code):
    server, _, _ = served
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]


def test_sdk_raises_on_unknown_persona_and_wrong_key(served, client):
    server, _, _ = served
    with pytest.raises(openai.NotFoundError, match="nobody"):
        ask(client, "nobody")
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json")
    assert r.status_code == 401  # the key is checked first
    r = httpx.post(
        f"{server.url}/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_full_queue_answers_429_with_retry_after(served):
    from persona_steering.scheduler import QueueFull

    server, _, _ = served
    scheduler = server.scheduler
    original = scheduler.submit

    def full(job):
        raise QueueFull("64 requests are waiting (serve.max_queue)")

    scheduler.submit = full
    try:
        body = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(
            f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        )
    finally:
        scheduler.submit = original
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "queue_full"


def test_scheduler_bounds_its_queue(served):
    import asyncio

    from persona_steering.scheduler import Job, QueueFull, Sampling, Scheduler, Steering

    server, _, _ = served
    scheduler = Scheduler(
        server.scheduler.rt, max_queue=2, max_rows=4
    )  # not started: nothing leaves the queue

    async def fill() -> None:
        for _ in range(2):
            scheduler.submit(Job([5, 6], Steering(), Sampling(max_tokens=2)))
        with pytest.raises(QueueFull, match="max_queue"):
            scheduler.submit(Job([5, 6], Steering(), Sampling(max_tokens=2)))
        with pytest.raises(ValueError, match="max_rows"):
            scheduler.submit(Job([5, 6], Steering(), Sampling(max_tokens=2), n=5))

    asyncio.run(fill())
    assert scheduler.load == {"rows": 0, "waiting": 2}


def test_ollama_chat_and_tags(served):
    server, _, _ = served
    auth = {"Authorization": f"Bearer {KEY}"}
    tags = httpx.get(f"{server.url}/api/tags", headers=auth).json()
    assert {"base", *PERSONAS} <= {m["name"] for m in tags["models"]}
    body = {
        "model": "grandpa:latest",
        "messages": [{"role": "user", "content": "how was your weekend ?"}],
        "stream": False,
        "options": {"num_predict": 12},
    }
    whole = httpx.post(f"{server.url}/api/chat", json=body, headers=auth).json()
    assert whole["done"] is True and whole["message"]["role"] == "assistant"
    body["stream"] = True
    lines = [
        json.loads(x) for x in httpx.post(f"{server.url}/api/chat", json=body, headers=auth).text.splitlines()
    ]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] >= 1
    assert "".join(x["message"]["content"] for x in lines) == whole["message"]["content"]


def test_disconnect_mid_stream_frees_the_row(served, monkeypatch):
    server, _, _ = served
    scheduler = server.scheduler
    step = scheduler._step

    def slow_step():  # the tiny model would finish 480 tokens before the client reads 4 lines
        time.sleep(0.02)
        step()

    monkeypatch.setattr(scheduler, "_step", slow_step)
    monkeypatch.setattr(scheduler, "eos", set())  # no end of turn: the answer would run to max_tokens
    before = scheduler.cancelled
    body = {
        "model": "pirate",
        "messages": [{"role": "user", "content": "tell me a story"}],
        "stream": True,
        "max_tokens": 480,
    }
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(8)]  # the first token is sent before its row joins the batch
        assert scheduler.load["rows"] == 1, (seen, scheduler.load)
    deadline = time.time() + 5
    while scheduler.load["rows"] and time.time() < deadline:
        time.sleep(0.01)
    assert scheduler.load["rows"] == 0
    assert scheduler.cancelled == before + 1


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_row(served, monkeypatch):
    server, _, _ = served
    scheduler = server.scheduler
    step = scheduler._step

    def slow_step():
        time.sleep(0.02)
        step()

    monkeypatch.setattr(scheduler, "_step", slow_step)
    monkeypatch.setattr(scheduler, "eos", set())
    before = scheduler.cancelled
    body = {"model": "calm", "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 480}
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes the connection
        httpx.post(
            f"{server.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=0.5,
        )
    deadline = time.time() + 5
    while scheduler.load["rows"] and time.time() < deadline:
        time.sleep(0.01)
    assert scheduler.load["rows"] == 0 and scheduler.cancelled == before + 1


def test_concurrent_requests_equal_their_answers_alone(served, client, monkeypatch):
    """16 requests, different personas and prompts, decoded together: each equals its answer alone."""
    scheduler = served[0].scheduler
    step = scheduler._step

    def slow_step():  # so that all 16 are in flight together, not one after another
        time.sleep(0.02)
        step()

    monkeypatch.setattr(scheduler, "_step", slow_step)
    prompts = [
        "how was your weekend ?",
        "what should i cook ?",
        "hello !",
        "tell me about a trip",
        "how was work today ?",
        "what do you remember ?",
        "i feel sad today",
        "do you like music ?",
    ]
    models = ["base", *PERSONAS]
    other_layers = [  # ad-hoc rows at other layers and positions share the batch too
        {"steering": {"weights": {"T1": 1.0}, "layer": 1, "positions": "all"}},
        {"steering": {"weights": {"T2": -1.0}, "layer": 3, "positions": "prompt"}},
        None,
        None,
    ]
    jobs = [(models[i % 4], prompts[i % 8], 6 + i % 7, other_layers[(i // 4) % 4]) for i in range(16)]

    def run(job):
        model, prompt, tokens, extra = job
        return ask(client, model, prompt, max_tokens=tokens, extra_body=extra)

    alone = [run(j) for j in jobs]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, jobs))
    assert together == alone
    assert scheduler.peak >= 12  # they did share the batch
    assert len(set(alone)) > 4  # the personas really answer differently


def test_server_answer_equals_the_offline_generate_path(served, client):
    from persona_steering.generation import Request, generate
    from persona_steering.steering import SteeringSpec

    server, _, cfg = served
    rt = server.scheduler.rt
    persona = server.app.state.catalog.get("grandpa")
    gen = dataclasses.replace(cfg.generation, max_new_tokens=12)
    steering = SteeringSpec(2, persona.steering.delta[None])
    offline = generate(rt, [Request("how was your weekend ?")], gen, steering=steering)
    assert ask(client, "grandpa", max_tokens=12).strip() == offline[0].text


def test_a_persona_saved_while_serving_appears(served, client):
    _, root, _ = served
    assert "late" not in {m.id for m in client.models.list().data}
    write_persona(root / "runs", "late", {"T1": 0.5, "T2": 0.5})
    assert "late" in {m.id for m in client.models.list().data}
    assert isinstance(ask(client, "late", max_tokens=3), str)


def test_a_persona_with_its_own_axis_is_served(served, client):
    """optimize with steering.persona_axis weighs a sixth axis 'P' read from <id>_axis.safetensors."""
    import torch

    from persona_steering.basis import save_axis

    server, root, _ = served
    write_persona(root / "runs", "axis", {"T1": 0.5, "T2": 0.0, "P": 1.0})
    data = json.loads((root / "runs" / "axis_optimization.json").read_text())
    data["traits"] = ["T1", "T2", "P"]
    (root / "runs" / "axis_optimization.json").write_text(json.dumps(data))
    assert "axis" not in {m.id for m in client.models.list().data}  # no axis file yet: not servable
    basis = server.app.state.catalog._basis(("T1", "T2"), 2, "mean_diff", "response_avg")
    save_axis(
        root / "runs" / "axis_axis.safetensors",
        torch.randn(32, generator=torch.Generator().manual_seed(1)),
        basis,
    )
    (root / "runs" / "axis_optimization.json").write_text(json.dumps(data))  # a new mtime: read again
    models = {m.id: m for m in client.models.list().data}
    assert models["axis"].model_extra["metadata"]["weights"]["P"] == 1.0
    assert ask(client, "axis") != ask(
        client, "base", extra_body={"steering": {"weights": {"T1": 0.5}, "alpha": 2.0, "layer": 2}}
    )


def test_a_restart_loses_nothing(served, tiny_model_dir):
    """A second server over the same folders lists the same personas and answers the same."""
    server, root, cfg = served
    first = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    before = (sorted(m.id for m in first.models.list().data), ask(first, "grandpa"))
    rt = load_runtime(cfg.model, cfg.cache_dir)
    with Server(cfg, rt, None) as again:
        second = openai.OpenAI(base_url=f"{again.url}/v1", api_key="unused", max_retries=0)
        after = (sorted(m.id for m in second.models.list().data), ask(second, "grandpa"))
    assert after == before


def test_page_is_self_contained(served):
    server, _, _ = served
    html = httpx.get(server.url).text
    assert "<script" in html and "http://" not in html and "https://" not in html


def test_serve_config_is_checked_and_holds_no_key():
    from persona_steering.config import ConfigError

    with pytest.raises(ConfigError, match="serve.port"):
        load_config(None, ["serve.port=70000"])
    with pytest.raises(ConfigError, match="serve.max_queue"):
        load_config(None, ["serve.max_queue=0"])
    cfg = load_config(None, [])
    assert cfg.serve.host == "127.0.0.1" and "key" not in repr(cfg.serve).replace("api_key_env", "")


def test_bench_serve_runs_end_to_end(tmp_path, tiny_model_dir):
    from dataclasses import replace

    from persona_steering.config import ServeBenchConfig
    from persona_steering.serve_bench import run_serve_bench

    repo = Path(__file__).resolve().parents[1]
    cfg = serve_config(tmp_path, tiny_model_dir, f"optimize.prompts_file={repo / 'configs' / 'prompts.yaml'}")
    settings = ServeBenchConfig(
        requests=4,
        personas=2,
        max_tokens=4,
        background=0,
        probes=1,
        repeats=1,
        out_dir=str(tmp_path / "bench"),
    )
    result = run_serve_bench(replace(cfg, serve_bench=settings), log=lambda *_: None)
    assert result["peak_rows"] >= 2 and result["same_answers"] == 4
    assert result["speedup"] > 0 and result["ttft_median_s"] > 0
    assert (tmp_path / "bench" / "serve.json").is_file() and "throughput ratio" in (
        tmp_path / "bench" / "serve.md"
    ).read_text()


@pytest.mark.parametrize("stage", ["serve", "bench-serve"])
def test_serve_stages_refuse_several_processes(stage, capsys, tmp_path, monkeypatch):
    from persona_steering.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([stage, "--devices", "2", "--accelerator", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{stage} runs in one process" in err[0], err
    assert list(tmp_path.iterdir()) == []
