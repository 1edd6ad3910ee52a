"""SIGKILL at seeded random moments: 10 during `optimize`, 5 during `vectors`, each kill followed by the
same command; the run that finally completes equals the uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tests_helpers import assert_same_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _command(stage: str, overrides: list[str], *extra: str) -> list[str]:
    args = [sys.executable, "-m", "persona_steering", stage]
    for o in overrides:
        args += ["--set", o]
    return [*args, *extra]


def _env() -> dict[str, str]:
    root = str(Path(__file__).parents[1])
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def _run(
    cmd: list[str],
    cwd: Path,
    marker: str | None = None,
    kill_after: float | None = None,
    done: Callable[[], bool] = lambda: False,
) -> tuple[bool, float, float]:
    """Run ``cmd`` and SIGKILL it ``kill_after`` seconds after ``marker`` shows in its output (after
    its start without a marker). Returns (killed, seconds from the start to the marker, and to when
    ``done()`` first held, or to the end)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    seen, text = threading.Event(), []

    def read() -> None:  # raw chunks: progress bars end their lines with \r, not \n
        while chunk := os.read(proc.stdout.fileno(), 4096):
            text.append(chunk.decode(errors="replace"))
            if marker is None or marker in "".join(text):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while marker is not None and not seen.is_set() and proc.poll() is None:
        seen.wait(0.005)
    began = time.monotonic()
    killed, done_at = False, None
    while proc.poll() is None:
        if done_at is None and done():
            done_at = time.monotonic()
        if kill_after is not None and time.monotonic() - began >= kill_after:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    if not killed:
        assert proc.returncode == 0, "".join(text)[-3000:]
    return killed, began - started, (done_at or time.monotonic()) - started


def _kill_points(seed: int, n: int, span: float) -> list[float]:
    """``n`` moments, uniform over the uninterrupted run's working time (``_run``'s span)."""
    rng = random.Random(seed)
    return [round(rng.uniform(0.0, span), 3) for _ in range(n)]


def test_optimize_killed_at_ten_moments_resumes_to_the_uninterrupted_result(project):
    tmp_path, overrides = project
    n = 8
    overrides = overrides + [f"optimize.max_iterations={n}"]
    ref = tmp_path / "ref" / "p1_optimization.json"
    ref_cmd = _command(
        "optimize", overrides, "--save-dir", str(ref.parent), "--cache-dir", str(tmp_path / "c-ref")
    )
    # The kill window: from the stage's first line to its last checkpoint, and a fifth more (finishing).
    _, began, ended = _run(ref_cmd, tmp_path, "p1: ", done=lambda: _iteration(ref.parent) == n)
    span = 1.2 * (ended - began)
    expected = json.loads(ref.read_text())
    save = tmp_path / "k"
    cmd = _command("optimize", overrides, "--save-dir", str(save), "--cache-dir", str(tmp_path / "c-k"))
    result = save / "p1_optimization.json"
    trail = []  # (moment, killed, iteration the checkpoint held afterwards)
    for moment in _kill_points(1012, 10, span):
        if result.exists():  # this chain of kills ended: check it, then start another (cache kept)
            _same(expected, json.loads(result.read_text()))
            shutil.rmtree(save)
        killed, _, _ = _run(cmd, tmp_path, "p1: ", moment)
        trail.append((moment, killed, _iteration(save)))
    _run(cmd, tmp_path)
    _same(expected, json.loads(result.read_text()))
    print(f"\noptimize: {span:.2f} s kill window; kills (s, killed, checkpoint iteration): {trail}")
    assert sum(killed for _, killed, _ in trail) >= 8, trail
    assert sum(0 < it < n for _, killed, it in trail if killed) >= 3, trail  # mid-optimisation
    assert not [p for p in save.iterdir() if p.name.endswith(".tmp")]


def _iteration(save: Path) -> int:
    ckpt = save / "p1_checkpoint.json"
    return json.loads(ckpt.read_text())["iteration"] if ckpt.exists() else 0


def _same(a: dict, b: dict) -> None:
    assert_same_run(a, b)
    assert a["num_evaluations"] == b["num_evaluations"]


def test_vectors_killed_at_five_moments_resumes_to_the_uninterrupted_result(project):
    tmp_path, overrides = project
    overrides = overrides + ["generation.max_new_tokens=24"]  # a longer stage: a wider kill window
    ref, out = tmp_path / "v-ref", tmp_path / "v-k"
    ref_cmd = _command("vectors", overrides, "--out-dir", str(ref), "--cache-dir", str(tmp_path / "c-ref"))
    # The kill window: from the stage's first line to the last vector file written.
    _, began, ended = _run(ref_cmd, tmp_path, "extracting", done=lambda: _files(ref) == 2)
    span = ended - began
    cmd = _command("vectors", overrides, "--out-dir", str(out), "--cache-dir", str(tmp_path / "c-k"))
    trail = []  # (moment, killed, vector files written)
    for moment in _kill_points(2024, 5, span):
        if _files(out) == 2:  # finished: check it, then start another chain (cache kept)
            _same_vectors(ref, out)
            shutil.rmtree(out)
        killed, _, _ = _run(cmd, tmp_path, "extracting", moment)
        trail.append((moment, killed, _files(out)))
    _run(cmd, tmp_path)
    _same_vectors(ref, out)
    print(f"\nvectors: {span:.2f} s kill window; kills (s, killed, files written): {trail}")
    assert sum(killed for _, killed, _ in trail) >= 3, trail
    assert any(killed and files < 2 for _, killed, files in trail), trail  # some kills mid-stage
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def _files(folder: Path) -> int:
    return len(list(folder.rglob("*.safetensors")))


def _same_vectors(ref: Path, out: Path) -> None:
    want, got = sorted(ref.rglob("*.safetensors")), sorted(out.rglob("*.safetensors"))
    assert [p.relative_to(ref) for p in want] == [p.relative_to(out) for p in got]
    for r, g in zip(want, got, strict=True):
        a, b = load_file(r), load_file(g)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), r.name
