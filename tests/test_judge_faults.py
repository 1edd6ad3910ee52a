"""An optimisation judged over real HTTP by a faulty OpenAI-compatible server loses no verdict and
ends where the healthy run ends; a quota that runs out stops it cleanly, and a re-run finishes it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from tests_helpers import JUDGE_KEY, JUDGE_KEY_ENV, RUN_KEYS, judge_score

from persona_steering.cache import Cache
from persona_steering.cli import main
from persona_steering.config import load_config
from persona_steering.fake_openai import FakeOpenAI
from persona_steering.judges.openai import OpenAIJudge
from persona_steering.optimize import run_optimize

KEY_ENV, KEY = JUDGE_KEY_ENV, JUDGE_KEY
FAULTS = {
    "429": 0.30,  # with Retry-After (0.05 s)
    "500": 0.05,
    "503": 0.05,
    "hang": 0.05,  # past the client's timeout
    "drop": 0.02,
    "malformed-json": 0.02,  # truncated JSON body
    "non-json": 0.02,
    "non-utf8": 0.01,
}
SAME = (*(k for k in RUN_KEYS if k != "config_digest"), "mean_score")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)  # no configs/default.yaml: the CLI and load_config(None) agree
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv(KEY_ENV, KEY)
    # The stage's own judge, with a short backoff (Retry-After still sets the floor).
    monkeypatch.setattr(
        "persona_steering.optimize.build_judge", lambda cfg, rt, cache_dir: OpenAIJudge(cfg, backoff=0.01)
    )
    with FakeOpenAI(hang=0.6) as srv:
        srv.content_fn = judge_score
        yield srv


def _overrides(project, server: FakeOpenAI, name: str, *extra: str) -> list[str]:
    tmp_path, overrides = project
    return overrides + [
        "judge.backend=openai",
        f"judge.base_url={server.base_url}",
        f"judge.api_key_env={KEY_ENV}",
        "judge.timeout=0.3",
        "judge.max_attempts=10",
        "judge.max_retry_seconds=60",
        "judge.concurrency=8",
        "optimize.max_iterations=3",
        f"optimize.save_dir={tmp_path / ('runs-' + name)}",
        f"cache_dir={tmp_path / ('cache-' + name)}",
        *extra,
    ]


def _seed_caches(tmp_path: Path) -> None:
    """Each run gets its own copy of the vectors stage's cache (so generations are shared, verdicts not)."""
    import shutil

    for name in ("healthy", "faulty", "quota"):
        shutil.copytree(tmp_path / "cache", tmp_path / f"cache-{name}")


def _no_key_under(tmp_path: Path) -> None:
    for path in tmp_path.rglob("*"):
        if path.is_file() and (path.name.startswith("cache") or "runs" in str(path.relative_to(tmp_path))):
            assert KEY.encode() not in path.read_bytes(), path
    for folder in (
        "cache-healthy",
        "cache-faulty",
        "cache-quota",
        "runs-healthy",
        "runs-faulty",
        "runs-quota",
    ):
        for path in (tmp_path / folder).rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), path


def test_heavy_faults_lose_no_verdict_and_equal_the_healthy_run(project, server, capsys, caplog):
    tmp_path, _ = project
    _seed_caches(tmp_path)
    started = time.perf_counter()
    # More iterations, candidates, prompts, longer answers and coherence: more verdicts, more faults.
    more = (
        "optimize.max_iterations=6",
        "optimize.population_size=8",
        "optimize.num_prompts=3",
        "generation.max_new_tokens=10",
        "judge.coherence=true",
    )
    healthy = run_optimize(
        load_config(None, _overrides(project, server, "healthy", *more)), log=lambda *_: None
    )
    healthy_s = time.perf_counter() - started
    healthy_requests = len(server.requests)
    server.faults = dict(FAULTS)
    server.injected.clear()
    started = time.perf_counter()
    faulty = run_optimize(
        load_config(None, _overrides(project, server, "faulty", *more)), log=lambda *_: None
    )
    faulty_s = time.perf_counter() - started
    injected = {k: server.injected[k] for k in [*FAULTS, "ok"]}
    summary = (
        f"\nfault mix {json.dumps(injected)}; healthy {healthy_s:.1f} s ({healthy_requests} requests), "
        f"faulty {faulty_s:.1f} s ({sum(injected.values())} requests)"
    )
    assert all(injected[k] > 0 for k in FAULTS), injected  # every kind of fault happened
    assert healthy["missing_verdicts"] == faulty["missing_verdicts"] == 0
    assert len(faulty["history"]["verdicts"]) == 6
    assert all(v == [3] * 8 for v in faulty["history"]["verdicts"])  # 8 candidates x 3 prompts each
    for key in SAME:
        assert faulty[key] == healthy[key], key
    assert faulty["config_digest"] == healthy["config_digest"]
    with Cache(tmp_path / "cache-healthy") as a, Cache(tmp_path / "cache-faulty") as b:
        assert a.count("verdict") == b.count("verdict") > 0
    _no_key_under(tmp_path)
    captured = capsys.readouterr()
    assert "RateLimitError" in caplog.text  # the retries were logged, and the key was not
    assert KEY not in caplog.text + captured.out + captured.err
    with capsys.disabled():
        print(summary)


def test_quota_running_out_stops_cleanly_and_a_rerun_equals_the_healthy_run(project, server, capsys):
    tmp_path, _ = project
    _seed_caches(tmp_path)
    marks = []  # requests sent when each iteration's line is logged

    def mark(line: str) -> None:
        if line.startswith("iter "):
            marks.append(len(server.requests))

    healthy = run_optimize(load_config(None, _overrides(project, server, "healthy")), log=mark)
    # The quota runs out in the first iteration after the first that asks the judge something new.
    stop = next(i for i in range(1, len(marks)) if marks[i] - marks[i - 1] > 2)
    server.requests.clear()
    server.push(*["ok"] * (marks[stop - 1] + 2), "quota")
    args = ["optimize", *sum((["--set", o] for o in _overrides(project, server, "quota")), [])]
    capsys.readouterr()
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "it/s]" not in line and line.strip()]
    assert len(err) == 1, err  # one line (progress bars aside)
    assert "quota exhausted" in err[0] and "re-run the same command to resume" in err[0], err
    assert KEY not in err[0]
    checkpoint = json.loads((tmp_path / "runs-quota" / "p1_checkpoint.json").read_text())
    assert checkpoint["iteration"] == stop and not (tmp_path / "runs-quota" / "p1_optimization.json").exists()
    with Cache(tmp_path / "cache-quota") as cache:
        kept = cache.count("verdict")
    assert kept > 0  # every verdict received before the quota ran out
    assert main(args) == 0  # the server is healthy again
    out = capsys.readouterr().out
    assert f"resuming after iteration {stop}" in out
    resumed = json.loads((tmp_path / "runs-quota" / "p1_optimization.json").read_text())
    for key in (*SAME, "config_digest"):
        assert resumed[key] == healthy[key], key
    _no_key_under(tmp_path)
