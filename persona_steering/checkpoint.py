"""CMA-ES state as data: a JSON checkpoint of what the optimiser was told, rebuilt by replay.

A checkpoint never holds a pickle. It records, per iteration, the candidates CMA-ES asked for and
the objective values it was told, plus numpy's RNG state and the history. Resume rebuilds the
strategy from its seeded start by replaying ask/tell, then checks the rebuilt state (mean, step
size, covariance, evolution paths, counters: ``state_digest``) and the RNG state against the stored
ones, bit for bit, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persona_steering.cache import atomic_write_json

CHECKPOINT_VERSION = 2
KEYS = {"version", "digest", "iteration", "evaluations", "best", "history", "told", "numpy_rng"}


class ResumeError(ValueError):
    """An existing run does not match this configuration, or its checkpoint cannot be used."""


@dataclass(frozen=True)
class Start:
    """What a strategy is built from: the same values build the same CMA-ES, bit for bit."""

    x0: list[float]
    sigma0: float
    popsize: int
    seed: int
    bound: float
    max_iterations: int


def new_state(start: Start, run_digest: str) -> dict[str, Any]:
    """A fresh, seeded CMA-ES and an empty record of what it was told."""
    import cma

    np.random.seed(start.seed)  # cma samples from numpy's global generator
    es = cma.CMAEvolutionStrategy(
        list(start.x0),
        start.sigma0,
        {
            "popsize": start.popsize,
            "seed": start.seed + 1,
            "bounds": [-start.bound, start.bound],
            "verbose": -9,
            "maxiter": start.max_iterations,
        },
    )
    return {
        "es": es,
        "numpy_rng": np.random.get_state(),
        "iteration": 0,
        "history": new_history(),
        "digest": run_digest,
        "evaluations": 0,
        "best": None,
        "told": [],
    }


def ask(state: dict[str, Any]) -> np.ndarray:
    """The next population [popsize, k], drawn from this run's own numpy RNG stream."""
    np.random.set_state(state["numpy_rng"])
    candidates = np.asarray(state["es"].ask())
    state["numpy_rng"] = np.random.get_state()
    return candidates


def tell(state: dict[str, Any], candidates: np.ndarray, objectives: list[float]) -> None:
    """Tell CMA-ES the objectives of ``candidates`` and remember both for replay."""
    np.random.set_state(state["numpy_rng"])
    state["es"].tell(candidates.tolist(), list(objectives))
    state["numpy_rng"] = np.random.get_state()
    state["told"].append({"candidates": candidates.tolist(), "objectives": [float(o) for o in objectives]})


def state_digest(state: dict[str, Any]) -> str:
    """Digest of the CMA-ES state that decides the next populations: mean, step size, covariance,
    both evolution paths and the iteration count. (numpy's RNG position is left out: cma draws
    numbers it throws away, so it differs between a resumed and an uninterrupted run whose
    candidates are identical.)"""
    es = state["es"]
    parts = [np.asarray(es.mean), np.asarray(es.sigma), np.asarray(es.sm.C), np.asarray(es.pc)]
    parts += [np.asarray(getattr(es.adapt_sigma, "ps", [])), np.asarray(es.countiter)]
    h = hashlib.sha256()
    for a in parts:
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write the state as JSON (everything but the live strategy, which replay rebuilds)."""
    data = {k: v for k, v in state.items() if k != "es"}
    data["numpy_rng"] = _rng_to_json(state["numpy_rng"])
    atomic_write_json(path, {**data, "version": CHECKPOINT_VERSION})


def load_checkpoint(path: Path, start: Start, run_digest: str) -> dict[str, Any]:
    """The checkpoint at ``path`` with its strategy rebuilt by replay; ResumeError when it cannot be
    read, belongs to another configuration, or does not replay to the state it stored."""
    redo = "rerun with --restart to start over"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ResumeError(f"checkpoint {path} is unreadable ({exc}); {redo}") from None
    if not isinstance(data, dict) or set(data) != KEYS or data["version"] != CHECKPOINT_VERSION:
        raise ResumeError(f"checkpoint {path} has unexpected contents; {redo}")
    if data["digest"] != run_digest:
        raise ResumeError(
            f"an optimisation with another configuration ({data['digest']}, this one is {run_digest}) "
            f"is in {path.parent}; use another --save-dir, or --restart to discard it"
        )
    try:
        state = _replay(start, run_digest, data)
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise ResumeError(f"checkpoint {path} has unexpected contents ({exc}); {redo}") from None
    if state is None:
        raise ResumeError(
            f"checkpoint {path} does not replay to the state it stored (another cma or numpy "
            f"version, or an edited file); {redo}"
        )
    return state


def _replay(start: Start, run_digest: str, data: dict[str, Any]) -> dict[str, Any] | None:
    """Rebuild the strategy by replaying every ask/tell; None if anything differs from the record."""
    state = new_state(start, run_digest)
    told, held = data["told"], data["history"]["state_digest"]
    if len(told) != data["iteration"] or len(held) != len(told):
        return None
    for step, stored in zip(told, held, strict=True):
        asked = ask(state)
        if asked.tolist() != step["candidates"]:  # exact float equality: JSON keeps every bit
            return None
        tell(state, asked, [float(o) for o in step["objectives"]])
        if state_digest(state) != stored:
            return None
    if _rng_to_json(state["numpy_rng"]) != data["numpy_rng"]:
        return None
    state.update({k: data[k] for k in ("iteration", "evaluations", "best", "history")})
    return state


def _rng_to_json(rng: tuple[Any, ...]) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = rng
    return {
        "name": str(name),
        "keys": [int(k) for k in keys],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def new_history() -> dict[str, list[Any]]:
    return {
        "best_parts": [],
        "iterations": [],
        "best_scores": [],
        "best_weights": [],
        "generation_best": [],
        "generation_mean": [],
        "sigma": [],
        "mean_weights": [],
        "verdicts": [],
        "expected_verdicts": [],
        "candidates": [],
        "state_digest": [],
    }
