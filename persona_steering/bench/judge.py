"""The judges' costs: OpenAIJudge calls at the configured concurrency against one at a time, served by
the package's fake OpenAI-compatible server (``fake_openai``, the tests' too) replying after a delay;
and the offline judge's fluency log-probabilities with the prompt shared against every row whole."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from persona_steering.config import JudgeConfig
from persona_steering.fake_openai import FakeOpenAI

if TYPE_CHECKING:
    from persona_steering.bench.generation import Population

BENCH_KEY_ENV = "PERSONA_STEERING_BENCH_DUMMY_KEY"
"""Variable holding the dummy key of the judge run: never the user's real OPENAI_API_KEY."""


def fake_judge(server: FakeOpenAI, concurrency: int, base: JudgeConfig | None = None) -> JudgeConfig:
    """``base`` (default settings when None) as an OpenAI judge of the package's fake server, its
    dummy key read from ``BENCH_KEY_ENV``."""
    return dataclasses.replace(
        base or JudgeConfig(),
        backend="openai",
        model="bench",
        base_url=server.base_url,
        api_key_env=BENCH_KEY_ENV,
        concurrency=concurrency,
        timeout=30.0,
        max_attempts=2,
    )


def bench_judge(judge_cfg: JudgeConfig, verdicts: int, delay: float, log: Any = print) -> dict[str, Any]:
    """``verdicts`` OpenAIJudge calls against a local server that answers after ``delay`` seconds,
    at the configured concurrency and one at a time. The dummy key lives in the environment only
    for this call."""
    from persona_steering.judges import Query
    from persona_steering.judges.openai import OpenAIJudge

    queries = [Query("coherence", f"question {i}", f"answer {i}") for i in range(verdicts)]
    out: dict[str, Any] = {"verdicts": verdicts, "delay_s": delay, "concurrency": judge_cfg.concurrency}
    with (
        FakeOpenAI(
            content="90",
            delay=delay,
            max_requests=4 * verdicts,
            max_seconds=60 + 3 * verdicts * (delay + 0.5),
        ) as server,
        temporary_env(BENCH_KEY_ENV, "sk-bench-dummy"),
    ):
        for label, concurrency in (("ours", judge_cfg.concurrency), ("one_at_a_time", 1)):
            jc = fake_judge(server, concurrency, judge_cfg)
            judge = OpenAIJudge(jc, env_file=os.devnull)
            started = time.perf_counter()
            got = judge.judge(queries, None)
            out[f"{label}_s"] = time.perf_counter() - started
            out[f"{label}_ok"] = sum(v.ok for v in got)
            log(f"  judge {label:<14} concurrency {concurrency}: {out[f'{label}_s']:7.2f} s")
    out["speedup"] = out["one_at_a_time_s"] / out["ours_s"]
    return out


def bench_fluency(run: Population, answers: list[list[int]]) -> dict[str, Any]:
    """The offline judge's fluency log-probabilities (``judges.offline.mean_logprobs``) of the per-row
    answers and of their word shuffles, in the judge's batches: every row run whole, then the prompt
    run once per question and shared. Seconds of each, and the largest difference between them."""
    from persona_steering.bench.generation import sync
    from persona_steering.judges.offline import LOGPROB_BATCH, mean_logprobs, shuffled

    texts = [run.rt.tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]
    pairs = sorted(
        {
            (run.prompts[p], t)
            for ((_, p), text) in zip(run.rows, texts, strict=True)
            for t in (text, shuffled(text))
        }
    )
    out: dict[str, Any] = {"rows": len(pairs), "batch": LOGPROB_BATCH}
    values = {}
    for label, shared in (("whole_rows", False), ("shared_prompt", True)):  # whole rows bear any warm-up
        started = time.perf_counter()
        values[label] = [
            v
            for start in range(0, len(pairs), LOGPROB_BATCH)
            for v in mean_logprobs(run.rt, pairs[start : start + LOGPROB_BATCH], shared)
        ]
        sync(run.rt)
        out[f"{label}_s"] = time.perf_counter() - started
    out["speedup"] = out["whole_rows_s"] / out["shared_prompt_s"]
    finite = [
        (a, b) for a, b in zip(values["whole_rows"], values["shared_prompt"], strict=True) if math.isfinite(a)
    ]
    out["max_abs_diff"] = max((abs(a - b) for a, b in finite), default=0.0)
    return out


@contextmanager
def temporary_env(name: str, value: str) -> Iterator[None]:
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
