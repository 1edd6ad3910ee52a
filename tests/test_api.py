"""api.ChatClient, the one OpenAI-compatible client, over real HTTP to persona_steering/fake_openai.py."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from tests_helpers import isolated_server

from persona_steering.api import ChatClient
from persona_steering.config import JudgeConfig
from persona_steering.fake_openai import FakeOpenAI
from persona_steering.judges import JudgeError

KEY_ENV = "API_TEST_KEY"
KEY = "sk-api-test-0123456789"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    yield from isolated_server(monkeypatch, tmp_path, KEY_ENV, KEY)


def client(server: FakeOpenAI, **overrides) -> ChatClient:
    # Far above any delay here, so a loaded machine never adds a timeout retry to the request counts.
    fields = dict(backend="openai", model="m", base_url=server.base_url, api_key_env=KEY_ENV, timeout=5.0)
    fields.update(overrides)
    return ChatClient(JudgeConfig(**fields), "the test", options="--the-options", backoff=0.01)


@pytest.mark.parametrize("fault", ["malformed-json", "non-json", "non-utf8", "503"])
def test_transient_failures_are_retried_for_every_user(server: FakeOpenAI, fault: str) -> None:
    server.push(fault)
    c = client(server)
    response = c.chat(HELLO, temperature=0, max_tokens=3)
    assert response.choices[0].message.content == "4" and c.attempts == 2
    assert server.requests[-1].json["model"] == "m" and server.requests[-1].json["max_tokens"] == 3


def test_fatal_errors_name_the_caller_and_the_fix_without_the_key(server: FakeOpenAI) -> None:
    c = client(server)
    assert KEY not in repr(c)
    server.push("401")  # its message quotes the key back
    with pytest.raises(JudgeError, match=f"the test at .*AuthenticationError \\(401\\).*{KEY_ENV}") as err:
        c.chat(HELLO)
    assert KEY not in str(err.value) and c.attempts == 1
    server.push("404")
    with pytest.raises(JudgeError, match="no model 'm'.*--the-options"):
        c.chat(HELLO)


def test_breaker_stops_until_reset(server: FakeOpenAI) -> None:
    c = client(server, max_attempts=10, max_consecutive_failures=3)
    server.push(*["500"] * 3)
    with pytest.raises(JudgeError, match="failed 3 times in a row"):
        c.chat(HELLO)
    with pytest.raises(JudgeError, match="failed 3 times in a row"):
        c.chat(HELLO)  # stopped: no request sent
    assert len(server.requests) == 3
    c.reset()
    assert c.chat(HELLO).choices[0].message.content == "4"


def test_missing_key_names_the_caller_and_the_variable(server: FakeOpenAI, monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=f"the test needs an API key: set {KEY_ENV}"):
        client(server)


def test_fake_server_refuses_past_its_request_budget(server: FakeOpenAI) -> None:
    server.max_requests = 2
    c = client(server, max_attempts=1)
    assert c.chat(HELLO, temperature=0, max_tokens=3).choices[0].message.content == "4"
    assert c.chat(HELLO, temperature=0, max_tokens=3).choices[0].message.content == "4"
    with pytest.raises(openai.InternalServerError, match="budget spent"):
        c.chat(HELLO, temperature=0, max_tokens=3)
    assert server.injected["budget"] == 1 and len(server.requests) == 3
