"""JSON checkpoints: replay rebuilds CMA-ES bit for bit; edited, foreign and pickled files are refused."""

import json
import pickle

import numpy as np
import pytest

from persona_steering.checkpoint import (
    ResumeError,
    Start,
    ask,
    load_checkpoint,
    new_state,
    save_checkpoint,
    state_digest,
    tell,
)
from persona_steering.cli import main

START = Start(x0=[0.0, 0.5, -0.25], sigma0=0.5, popsize=5, seed=7, bound=3.0, max_iterations=20)


def _objective(c: np.ndarray) -> float:
    return float(np.sum((c - 1.0) ** 2))


def _steps(state, n):
    for _ in range(n):
        cands = ask(state)
        tell(state, cands, [_objective(c) for c in cands])
        state["iteration"] += 1
        state["history"]["state_digest"].append(state_digest(state))


def test_replay_continues_exactly_like_the_uninterrupted_strategy(tmp_path):
    state = new_state(START, "d1")
    _steps(state, 4)
    path = tmp_path / "ck.json"
    save_checkpoint(path, state)
    assert json.loads(path.read_text())["version"] == 2  # plain JSON, readable by anyone
    resumed = load_checkpoint(path, START, "d1")
    assert state_digest(resumed) == state_digest(state)
    for name in ("mean", "pc"):
        assert np.array_equal(getattr(resumed["es"], name), getattr(state["es"], name))
    assert np.array_equal(resumed["es"].sm.C, state["es"].sm.C) and resumed["es"].sigma == state["es"].sigma
    # the next populations are the same, bit for bit (so also in float32)
    for _ in range(3):
        a, b = ask(state), ask(resumed)
        assert a.tolist() == b.tolist()
        tell(state, a, [_objective(c) for c in a])
        tell(resumed, b, [_objective(c) for c in b])


def test_edited_or_foreign_checkpoint_is_refused(tmp_path):
    state = new_state(START, "d1")
    _steps(state, 3)
    path = tmp_path / "ck.json"
    save_checkpoint(path, state)
    with pytest.raises(ResumeError, match="another configuration"):
        load_checkpoint(path, START, "d2")
    data = json.loads(path.read_text())
    data["told"][1]["objectives"].reverse()  # CMA-ES uses ranks: a reordering changes its state
    path.write_text(json.dumps(data))
    with pytest.raises(ResumeError, match="does not replay"):
        load_checkpoint(path, START, "d1")
    data["extra"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ResumeError, match="unexpected contents"):
        load_checkpoint(path, START, "d1")


class _WritesAFile:
    """Unpickling this would create ``target``: what a malicious checkpoint or cache row does."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickled_checkpoints_are_never_loaded(project, capsys):
    tmp_path, overrides = project
    target = tmp_path / "pwned"
    runs = tmp_path / "runs"
    runs.mkdir()
    payload = pickle.dumps(_WritesAFile(target))
    args = ["optimize", *sum((["--set", o] for o in overrides), [])]
    # an old-style .pkl checkpoint: a one-line message, not loaded
    (runs / "p1_checkpoint.pkl").write_bytes(payload)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "never loaded" in err[0] and "--restart" in err[0], err
    assert not target.exists()
    # a pickle where the JSON checkpoint belongs: unreadable, not unpickled
    (runs / "p1_checkpoint.pkl").unlink()
    (runs / "p1_checkpoint.json").write_bytes(payload)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreadable" in err[0], err
    assert not target.exists()
