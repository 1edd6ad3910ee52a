"""evaluate-models: two tiny local models and an OpenAI-compatible one answered by the local test server,
judged by the embedding judge (trait scores n/a) or by the server (exact trait scores and gaps); warm
re-runs load no model and send no request; failed answers are not cached; bad specs are refused."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from tests_helpers import perturbed_copy

from persona_steering.cli import main
from persona_steering.config import GenerationConfig
from persona_steering.evaluate import models as zoo
from persona_steering.fake_openai import FakeOpenAI
from persona_steering.generation import Request, generate

KEY_ENV = "PS_ZOO_TEST_KEY"
SECRET = "sk-zoo-secret-123"
QUESTIONS = {
    "T1": ["how was your weekend ?", "what should i cook ?"],
    "T2": ["hello !", "how was work today ?"],
}
INSTRUCTIONS = {"T1": ("be formal and warm", "be casual and cold"), "T2": ("talk about me", "talk about you")}
CONDITIONS = ["unprompted", "positive", "negative"]
ROWS = 2 * 3 * 2  # traits x conditions x questions


@pytest.fixture(autouse=True)
def offline_http(monkeypatch):
    """One torch thread (tiny models on a shared 2-core machine), the key set, no proxy for 127.0.0.1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv(KEY_ENV, SECRET)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, tiny_model_dir) -> Path:
    return perturbed_copy(tiny_model_dir, tmp_path_factory.mktemp("zoo") / "other-llama")


@pytest.fixture()
def root(tmp_path) -> Path:
    for name, questions in QUESTIONS.items():
        pos, neg = INSTRUCTIONS[name]
        data = {
            "name": name,
            "instruction": [{"pos": pos, "neg": neg}, {"pos": "unused", "neg": "unused"}],
            "questions": {"extract": questions, "eval": questions},
            "eval_prompt": "TRAIT score from 0 to 100. question: {question} answer: {answer}",
        }
        (tmp_path / "traits").mkdir(exist_ok=True)
        (tmp_path / "traits" / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return tmp_path


def cli(root: Path, models: str, *extra: str, **settings: str) -> int:
    sets = {
        "cache_dir": str(root / "cache"),
        "model.accelerator": "cpu",
        "generation.max_new_tokens": "6",
        "judge.api_key_env": KEY_ENV,
        "evaluate.bootstrap": "200",
        **settings,
    }
    args = ["evaluate-models", "--models", models, "--traits", "T1,T2", "--trait-dir", str(root / "traits")]
    args += ["--out-dir", str(root / "out"), *sum((["--set", f"{k}={v}"] for k, v in sets.items()), [])]
    return main([*args, *extra])


def load_out(root: Path) -> dict:
    return json.loads((root / "out" / "models.json").read_text())


def test_two_local_models_and_an_api_model_then_warm_rerun_does_nothing(
    root, tiny_model_dir, other_model, tiny_rt, monkeypatch, capsys
):
    real_load = zoo.load_runtime
    alive: list[weakref.ref] = []

    def counting_load(config, *args, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in alive), "a model was still alive when the next one loaded"
        rt = real_load(config, *args, **kwargs)
        alive.append(weakref.ref(rt.model))
        return rt

    monkeypatch.setattr(zoo, "load_runtime", counting_load)
    replies = [f"answer {i} is good" for i in range(ROWS)]
    with FakeOpenAI() as server:
        server.push(*(f"text:{r}" for r in replies))
        models = f"{tiny_model_dir},{other_model},openai:chat"
        code = cli(root, models, "--base-url", server.base_url, **{"judge.concurrency": "1"})
        assert code == 0
        sent = list(server.requests)
        data = load_out(root)
        labels = [m["label"] for m in data["models"]]
        assert len(alive) == 2 and labels[2] == "openai:chat" and len(set(labels)) == 3
        assert [m["kind"] for m in data["models"]] == ["local", "local", "openai"]

        # The API model got the same chat messages, greedy, max_tokens = max_new_tokens, in row order.
        assert len(sent) == ROWS
        expected = [
            (q, None if c == "unprompted" else INSTRUCTIONS[t][c == "negative"])
            for t in ("T1", "T2")
            for c in CONDITIONS
            for q in QUESTIONS[t]
        ]
        for request, (question, system) in zip(sent, expected, strict=True):
            body = request.json
            assert body["model"] == "chat" and body["temperature"] == 0 and body["max_tokens"] == 6
            system_msgs = [{"role": "system", "content": system}] if system else []
            assert body["messages"] == [*system_msgs, {"role": "user", "content": question}]
            assert request.headers["authorization"] == f"Bearer {SECRET}"
        api = data["results"]["openai:chat"]
        got = [a for t in ("T1", "T2") for c in CONDITIONS for a in api[t][c]["answers"]]
        assert got == replies

        # Local answers are generate()'s answers to the same requests.
        first = data["results"][labels[0]]["T1"]
        gen = GenerationConfig(max_new_tokens=6)
        direct = generate(tiny_rt, [Request(q, "be formal and warm") for q in QUESTIONS["T1"]], gen)
        assert first["positive"]["answers"] == [a.text for a in direct]

        # The embedding judge scores coherence but not traits: n/a, never a number, never "missing".
        assert not data["trait_score_supported"] and data["judge"]["backend"] == "embedding"
        for label in labels:
            for t in ("T1", "T2"):
                for c in CONDITIONS:
                    e = data["results"][label][t][c]
                    assert e["trait"]["mean"] is None and not e["trait"]["supported"]
                    assert e["trait"]["missing"] == 0
                    coh = e["coherence"]
                    assert coh["n"] == 2 and coh["missing"] == 0 and coh["low"] <= coh["mean"] <= coh["high"]
                assert data["results"][label][t]["pos_neg_gap"]["mean"] is None
        assert data["missing_answers"] == dict.fromkeys(labels, 0)

        md = (root / "out" / "models.md").read_text()
        assert "| model | T1 unprompted | T1 pos | T1 neg | T1 pos-neg gap | T2 unprompted" in md
        assert all(f"| {label} |" in md for label in labels) and "n/a" in md
        assert md in capsys.readouterr().out
        assert (root / "out" / "models.png").read_bytes()[:4] == b"\x89PNG"
        # The key travels in the header only: never in the cache or the outputs.
        for path in [*(root / "cache").rglob("*"), *(root / "out").rglob("*")]:
            assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path

        def no_work(*args, **kwargs):
            raise AssertionError("a warm re-run must not load a model or judge")

        monkeypatch.setattr(zoo, "load_runtime", no_work)
        monkeypatch.setattr("persona_steering.judges.embedding.EmbeddingJudge._judge", no_work)
        assert cli(root, models, "--base-url", server.base_url, **{"judge.concurrency": "1"}) == 0
        assert len(server.requests) == ROWS  # no HTTP request either
    assert load_out(root) == data


def judge_and_models(request: dict) -> str:
    """The server as answering models and as judge: 'obedient' follows T1's instructions, 'stubborn'
    never does; the judge gives 90 to formal answers, 10 to casual ones, 50 otherwise."""
    text = request["messages"][-1]["content"]
    if "TRAIT score" in text:
        answer = text.split("answer: ")[1]
        return "90" if "formal" in answer else "10" if "casual" in answer else "50"
    if "coherent" in text:
        return "80"
    system = request["messages"][0]["content"] if len(request["messages"]) == 2 else ""
    if request["model"] == "obedient" and "formal" in system:
        return "i am formal"
    if request["model"] == "obedient" and "casual" in system:
        return "i am casual"
    return "hello"


def test_llm_judge_gives_trait_scores_and_the_pos_neg_gap(root, capsys):
    with FakeOpenAI() as server:
        server.content_fn = judge_and_models
        server.push("400")  # the first answer fails: missing, and not cached
        opts = {"judge.backend": "openai", "judge.base_url": server.base_url, "judge.concurrency": "1"}
        models = "openai:obedient,openai:stubborn"
        assert cli(root, models, "--base-url", server.base_url, **opts) == 0
        data = load_out(root)
        obedient, stubborn = data["results"]["openai:obedient"], data["results"]["openai:stubborn"]
        t1 = obedient["T1"]
        assert t1["unprompted"]["answers"] == [None, "hello"]
        assert t1["unprompted"]["trait"]["per_question"] == [None, 50.0]
        assert t1["unprompted"]["trait"]["missing"] == 1 and t1["unprompted"]["coherence"]["missing"] == 1
        assert (t1["positive"]["trait"]["mean"], t1["negative"]["trait"]["mean"]) == (90.0, 10.0)
        gap = t1["pos_neg_gap"]
        assert (gap["mean"], gap["low"], gap["high"], gap["n"]) == (80.0, 80.0, 80.0, 2)
        assert stubborn["T1"]["pos_neg_gap"]["mean"] == 0.0
        assert obedient["T2"]["pos_neg_gap"]["mean"] == 0.0  # T2's instructions say nothing formal
        assert stubborn["T2"]["negative"]["coherence"]["mean"] == 80.0
        assert data["missing_answers"] == {"openai:obedient": 1, "openai:stubborn": 0}
        md = (root / "out" / "models.md").read_text()
        assert (
            "| openai:obedient | 50.0 [50.0, 50.0] | 90.0 [90.0, 90.0] | 10.0 [10.0, 10.0] | +80.0 [+80.0, +80.0] |"
            in md
        )
        assert "No answer (endpoint failures, not cached): openai:obedient 1" in md

        # Only the failed answer is asked again; its verdicts are cached already ('hello' to the same
        # question came from the stubborn model), so that is the only request.
        before = len(server.requests)
        assert cli(root, models, "--base-url", server.base_url, **opts) == 0
        assert len(server.requests) == before + 1
        again = load_out(root)["results"]["openai:obedient"]["T1"]["unprompted"]
        assert again["answers"] == ["hello", "hello"] and again["trait"]["mean"] == 50.0


def assert_refused(root: Path, models: str, message: str, capsys, *extra: str) -> None:
    """Exit 2, one line naming the problem, nothing written (no outputs, not even a cache folder)."""
    capsys.readouterr()
    code = cli(root, models, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (root / "out").exists() and not (root / "cache").exists()


@pytest.mark.parametrize(
    "models, message",
    [
        ("openai:", "'openai:' names no model"),
        ("/no/such/model", "model path /no/such/model not found"),
        ("not a model!", "'not a model!' is neither embedded"),
        ("embedded,,openai:x", "none of them empty"),
    ],
)
def test_bad_model_spec_one_line_nothing_written(root, capsys, models, message):
    assert_refused(root, models, message, capsys)


def test_same_model_twice_missing_key_and_bad_options_are_refused(root, tiny_model_dir, monkeypatch, capsys):
    assert_refused(root, f"{tiny_model_dir},{tiny_model_dir}/", "are the same model", capsys)
    assert_refused(root, str(tiny_model_dir), "--num-questions must be >= 1", capsys, "--num-questions", "0")
    assert_refused(root, str(tiny_model_dir), "unknown trait 'T9'", capsys, "--traits", "T9")
    monkeypatch.delenv(KEY_ENV)
    assert_refused(root, "openai:gpt-x", f"openai:gpt-x needs an API key: set {KEY_ENV}", capsys)


def test_rejected_key_stops_with_one_line_without_the_key(root, capsys):
    with FakeOpenAI() as server:
        server.push("401")  # echoes the bearer token in its message
        code = cli(root, "openai:chat", "--base-url", server.base_url, **{"judge.concurrency": "1"})
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "openai:chat at" in err[0] and "401" in err[0], err
    assert SECRET not in err[0] and not (root / "out").exists()
