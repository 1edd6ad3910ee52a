"""Real processes: a second optimize on the same save dir is refused; SIGTERM and SIGINT mid-judging
exit within two seconds (143, 130) with the checkpoint valid and every completed verdict kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests_helpers import JUDGE_KEY as KEY
from tests_helpers import JUDGE_KEY_ENV as KEY_ENV
from tests_helpers import assert_same_run, judge_score

from persona_steering.cache import Cache
from persona_steering.cli import main
from persona_steering.fake_openai import FakeOpenAI

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONCURRENCY = 2


def _args(overrides: list[str], server: FakeOpenAI, tmp_path: Path, name: str) -> list[str]:
    extra = [
        "judge.backend=openai",
        f"judge.base_url={server.base_url}",
        f"judge.api_key_env={KEY_ENV}",
        f"judge.concurrency={CONCURRENCY}",
        "optimize.max_iterations=4",
        f"optimize.save_dir={tmp_path / ('runs-' + name)}",
        f"cache_dir={tmp_path / ('cache-' + name)}",
    ]
    return ["optimize", *sum((["--set", o] for o in overrides + extra), [])]


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, KEY_ENV: KEY, "NO_PROXY": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(var, None)
    return subprocess.Popen(
        [sys.executable, "-m", "persona_steering", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell without job control starts background jobs with SIGINT ignored, and Python keeps
        # an inherited SIG_IGN; the user pressing Ctrl-C has it at its default.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_mid_judging(proc: subprocess.Popen, server: FakeOpenAI, ckpt: Path, sig: int) -> float:
    """Send ``sig`` while the judge is busy after the first checkpoint; seconds until the exit."""
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    seen = len(server.requests)
    while len(server.requests) < seen + 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    sent = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout=30)
    return time.monotonic() - sent


def test_lock_and_signals_on_real_processes(project, monkeypatch, capsys):
    tmp_path, overrides = project
    monkeypatch.chdir(tmp_path)  # no configs/default.yaml, in this process or the children
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with FakeOpenAI(delay=0.05) as server:
        server.content_fn = judge_score
        # The uninterrupted reference, in this process.
        assert main(_args(overrides, server, tmp_path, "ref")) == 0
        reference_requests = len(server.requests)
        ref = json.loads((tmp_path / "runs-ref" / "p1_optimization.json").read_text())
        server.requests.clear()
        args = _args(overrides, server, tmp_path, "k")
        ckpt = tmp_path / "runs-k" / "p1_checkpoint.json"
        first = _start(args, tmp_path)
        # A second run on the same persona and save dir is refused while the first runs.
        deadline = time.time() + 120
        while not (tmp_path / "runs-k" / "p1.lock").exists() and time.time() < deadline:
            time.sleep(0.01)
        second = _start(args, tmp_path)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert "already running" in err and f"process {first.pid}" in err, err
        # SIGTERM mid-judging: out within two seconds, code 143.
        took = _interrupt_mid_judging(first, server, ckpt, signal.SIGTERM)
        assert first.returncode == 143 and took < 2.0, (first.returncode, took, first.communicate())
        times = [took]
        state = json.loads(ckpt.read_text())
        assert 1 <= state["iteration"] < 4
        with Cache(tmp_path / "cache-k") as cache:
            kept = cache.count("verdict")
        # SIGINT on the resumed run: code 130, same guarantees.
        again = _start(args, tmp_path)
        took = _interrupt_mid_judging(again, server, ckpt, signal.SIGINT)
        assert again.returncode == 130 and took < 2.0, (again.returncode, took, again.communicate())
        times.append(took)
        json.loads(ckpt.read_text())
        with Cache(tmp_path / "cache-k") as cache:
            assert cache.count("verdict") >= kept
        assert main(args) == 0
        assert "resuming after iteration" in capsys.readouterr().out
    resumed = json.loads((tmp_path / "runs-k" / "p1_optimization.json").read_text())
    assert_same_run(resumed, ref)
    # Nothing completed was asked twice: only the verdicts in flight at each signal (at most one
    # persona-fit verdict, six calls, per thread) were lost.
    assert len(server.requests) <= reference_requests + 2 * 6 * CONCURRENCY
    assert not list((tmp_path / "runs-k").glob("*.tmp")) and not list((tmp_path / "runs-k").glob(".*.tmp"))
    with capsys.disabled():
        print(f"\nSIGTERM exit after {times[0]:.2f} s, SIGINT after {times[1]:.2f} s")
