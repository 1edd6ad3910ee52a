"""Two CPU processes on gloo (Fabric launches the second): same vectors and same optimisation result
as one process, rank 0 alone writes, and a killed two-process run resumes to the same result."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from persona_steering.cache import Cache
from persona_steering.config import load_config
from persona_steering.fake_openai import FakeOpenAI
from persona_steering.optimize import run_optimize
from persona_steering.store import load_vectors

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)
TWO_RANKS = ["--devices", "2", "--accelerator", "cpu", "--strategy", "ddp"]
# Anything that would make Fabric think it was started by torchrun, srun or `fabric run`.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LT_CLI_USED")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV and not k.startswith("SLURM_")}
    env = {k: v for k, v in env.items() if "proxy" not in k.lower()}  # the judge server is on 127.0.0.1
    return env | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _command(stage: str, overrides: list[str], *extra: str) -> list[str]:
    args = [sys.executable, "-m", "persona_steering", stage]
    for o in overrides:
        args += ["--set", o]
    return args + [*TWO_RANKS, *extra]


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # cwd: a folder without configs/default.yaml, so the CLI reads only the overrides, as load_config does.
    done = subprocess.run(cmd, cwd=cwd, env=_env() | env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, _why(done.stderr)
    assert "[rank 0/2]" in done.stderr and "[rank 1/2]" in done.stderr, done.stderr[-3000:]
    return done


def _why(stderr: str) -> str:
    """What the ranks themselves said before failing, then the end: a launcher's own traceback
    (torchrun, `fabric run`) fills the tail and would hide a rank's abort message."""
    said = [
        line for line in stderr.splitlines() if re.search(r"error|terminate|what\(\)|abort|fatal", line, re.I)
    ]
    return "\n".join(said[:40]) + "\n...\n" + stderr[-1500:]


def _files(folder: Path) -> list[str]:
    """Every file but the lock the writing rank holds (``<slug>/.lock``, kept like optimize's)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != ".lock")


def test_vectors_on_two_ranks_equal_one_process(project):
    tmp_path, overrides = project  # the fixture ran the vectors stage in this one process
    two = tmp_path / "vectors-2"
    done = _run(
        _command("vectors", overrides, "--out-dir", str(two), "--cache-dir", str(tmp_path / "c2")), tmp_path
    )
    _same_vectors(tmp_path, two, tmp_path / "c2", done.stdout)


@pytest.mark.parametrize("launcher", ["torchrun", "fabric run"])
def test_vectors_started_by_an_outside_launcher_equal_one_process(project, launcher):
    """torchrun and `fabric run` start both processes themselves; Fabric must join, not launch again."""
    if launcher == "fabric run":
        pytest.importorskip("click", reason="`fabric run` needs click")
    tmp_path, overrides = project
    out, cache = tmp_path / "vectors-l", tmp_path / "c-l"
    stage = _command("vectors", overrides, "--out-dir", str(out), "--cache-dir", str(cache))[3:]
    bin_dir = Path(sys.executable).parent
    if launcher == "torchrun":
        cmd = [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "persona_steering"]
    else:  # its own flags place the processes; ours follow `--`
        cmd = [str(bin_dir / "fabric"), "run", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
        cmd += [str(Path(__file__).parents[1] / "persona_steering" / "__main__.py"), "--"]
    done = _run(cmd + stage, tmp_path)
    _same_vectors(tmp_path, out, cache, done.stdout)


def _same_vectors(tmp_path: Path, two: Path, cache: Path, stdout: str) -> None:
    """The vectors in ``two`` equal the one-process ones, rank 0 alone printed and stored the rows."""
    one = tmp_path / "vectors"
    assert stdout.count("vectors in ") == 1  # rank 0 alone prints
    slug = next(one.iterdir()).name
    assert _files(two) == _files(one) == [f"{slug}/T1.safetensors", f"{slug}/T2.safetensors"]  # no temp files
    for name in _files(one):
        a, b = load_vectors(one / name), load_vectors(two / name)
        assert set(a.tensors) == set(b.tensors)
        for key in a.tensors:
            torch.testing.assert_close(b.tensors[key], a.tensors[key], atol=1e-5, rtol=0, msg=key)
        assert (
            b.meta["pairs_kept"] == a.meta["pairs_kept"]
            and b.meta["inputs_digest"] == a.meta["inputs_digest"]
        )
    # Rank 0 stored every row the two ranks generated, each once: the same entries as one process.
    with Cache(tmp_path / "cache") as c1, Cache(cache) as c2:
        assert c2.count("generation") == c1.count("generation") > 0


def _same_result(a: dict, b: dict) -> None:
    """Equal but for where the run was saved and how it was placed."""
    assert [k for k in a if a[k] != b[k]] in ([], ["config"])
    for section in a["config"]:
        if section not in ("model", "cache_dir", "optimize"):
            assert a["config"][section] == b["config"][section], section
    assert {**a["config"]["optimize"], "save_dir": None} == {**b["config"]["optimize"], "save_dir": None}
    placement = ("devices", "strategy", "accelerator")
    assert {k: v for k, v in a["config"]["model"].items() if k not in placement} == {
        k: v for k, v in b["config"]["model"].items() if k not in placement
    }


@pytest.fixture()
def reference(project):
    """The one-process result of the optimisation the two-process runs repeat."""
    tmp_path, overrides = project
    overrides = [o for o in overrides if not o.startswith(("optimize.max_iterations", "optimize.save_dir"))]
    overrides += ["optimize.max_iterations=5"]
    cfg = load_config(None, overrides + [f"optimize.save_dir={tmp_path / 'runs-1'}"])
    return tmp_path, overrides, run_optimize(cfg, log=lambda *_: None)


def test_optimize_on_two_ranks_equals_one_process(reference):
    tmp_path, overrides, one = reference
    save = tmp_path / "runs-2"
    done = _run(
        _command("optimize", overrides, "--save-dir", str(save), "--cache-dir", str(tmp_path / "c2")),
        tmp_path,
    )
    assert done.stdout.count("persona fit   best candidate") == 1 and done.stdout.count("cache: ") == 1
    assert _files(save) == [
        "p1.lock",
        "p1_best_weights.json",
        "p1_checkpoint.json",
        "p1_convergence.png",
        "p1_optimization.json",
    ]
    _same_result(one, json.loads((save / "p1_optimization.json").read_text()))
    # After every iteration each rank logged the digest of the CMA-ES state it holds: the same on both
    # ranks, iteration by iteration, and the same as the one-process run's.
    states = _state_lines(done.stderr)
    assert states[0] == states[1] == one["history"]["state_digest"]
    assert len(states[0]) == 5 and len(set(states[0])) == 5


def _state_lines(stderr: str) -> dict[int, list[str]]:
    """{rank: [CMA-ES state digest after iteration 1, 2, ...]} from the ranks' log lines."""
    found: dict[int, list[str]] = {0: [], 1: []}
    for rank, iteration, value in re.findall(
        r"\[rank (\d)/2\] p1 iteration (\d+) CMA-ES state (\w+)", stderr
    ):
        assert int(iteration) == len(found[int(rank)]) + 1
        found[int(rank)].append(value)
    return found


def test_two_ranks_ask_the_judge_once_per_verdict(project):
    """Rank 0 alone calls the judge (here a real OpenAI-compatible server) and broadcasts verdicts,
    judging ahead for two personas in lockstep: every rank generates both personas' unsteered
    answers at the same point (rank 1, without a cache, once skipped the second persona's)."""
    tmp_path, overrides = project
    cache = tmp_path / "c-judge"
    personas = tmp_path / "personas"
    shutil.copytree(personas / "p1", personas / "p2")
    (personas / "p2" / "persona_profile.txt").write_text("A calm engineer who answers in short facts.")
    with FakeOpenAI(content="4") as server:
        judge = [
            "judge.backend=openai",
            f"judge.base_url={server.base_url}",
            "judge.model=judge-model",
            "judge.api_key_env=PS_TEST_DIST_KEY",
            "optimize.max_iterations=2",
        ]
        cmd = _command(
            "optimize", overrides + judge, "--save-dir", str(tmp_path / "r-judge"), "--personas", "p1,p2"
        )
        _run(
            cmd + ["--cache-dir", str(cache)], tmp_path, PS_TEST_DIST_KEY="sk-test-dist", NO_PROXY="127.0.0.1"
        )
        calls = len(server.requests)
    with Cache(cache) as c:
        # Each verdict asked for once, not once per rank: six calls per persona-fit verdict (three
        # parts, both answer orders), the only kind this run asks for.
        assert calls == 6 * c.count("verdict") > 0
    assert sorted(p.name for p in (tmp_path / "r-judge").glob("*_optimization.json")) == [
        "p1_optimization.json",
        "p2_optimization.json",
    ]


def test_killed_two_rank_run_resumes_to_the_same_result(reference):
    tmp_path, overrides, one = reference
    save = tmp_path / "runs-k"
    cmd = _command("optimize", overrides, "--save-dir", str(save), "--cache-dir", str(tmp_path / "ck"))
    # Its own session, so one SIGKILL to the group takes both ranks down, as losing the node would.
    proc = _spawn_session(cmd, tmp_path)
    ckpt = save / "p1_checkpoint.json"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (save / "p1_optimization.json").exists(), "killed too early or too late"
    done = _run(cmd, tmp_path)
    assert "resuming after iteration" in done.stdout
    assert not [f for f in _files(save) if f.endswith(".tmp")]
    _same_result(one, json.loads((save / "p1_optimization.json").read_text()))


def _spawn_session(cmd: list[str], cwd: Path) -> subprocess.Popen:
    """The command in its own session, so that one signal to the group reaches every rank."""
    return subprocess.Popen(
        cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # fields: state, ppid, ...
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_dead_rank_0_ends_the_other_rank_within_seconds(reference):
    """Rank 0 SIGKILLed alone (the OOM killer's way): rank 1 would otherwise wait in a collective."""
    tmp_path, overrides, _ = reference
    save = tmp_path / "runs-dead0"
    cmd = _command("optimize", overrides, "--save-dir", str(save), "--cache-dir", str(tmp_path / "cd"))
    proc = _spawn_session(cmd, tmp_path)
    try:
        deadline = time.time() + 120
        while not (save / "p1_checkpoint.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        ranks = [
            c for c in _children(proc.pid) if "persona_steering" in Path(f"/proc/{c}/cmdline").read_text()
        ]
        assert len(ranks) == 1, ranks
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        while _alive(ranks[0]) and time.monotonic() - killed < 60:
            time.sleep(0.05)
        assert not _alive(ranks[0]), "rank 1 outlived rank 0 by a minute"
        assert time.monotonic() - killed < 5
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.num_nodes=0", "model.num_nodes must be >= 1"),
        ("model.strategy=fsdp", "model.strategy must be"),
    ],
)
def test_bad_placement_options_are_refused(override, message):
    from persona_steering.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_processes_started_by_torchrun_must_match_devices(monkeypatch):
    """torchrun with the default --devices 1 would run two full single-process jobs, both writing."""
    from persona_steering.config import ConfigError, ModelConfig
    from persona_steering.runtime import build_fabric

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="2 processes were started"):
        build_fabric(ModelConfig(accelerator="cpu"), 0)
    monkeypatch.delenv("WORLD_SIZE")
    assert build_fabric(ModelConfig(accelerator="cpu"), 0).world_size == 1
