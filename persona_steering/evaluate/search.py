"""The search baselines' shared parts (random_search, grid): where CMA-ES started, its objective on the
training prompts, and the two searches as pure functions of an objective.

Both baselines get what the optimiser got: the same start (``x0`` from ``optimize.initial_weights``,
step ``optimize.sigma0``), the same bounds, the same budget (the optimisation result's
``num_evaluations``) and the same objective (``optimize.Objective.score`` on the training prompts,
minimised). Only the way candidates are chosen differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from persona_steering.evaluate.core import Context, MethodSkipped
from persona_steering.optimize import Objective, Scored, _initial_weights

Evaluate = Callable[[np.ndarray], np.ndarray]
"""Objective values [n] (lower is better, NaN = no verdict) of candidates [n, k]."""


@dataclass(frozen=True)
class Start:
    """What CMA-ES started from, and how far a search may go."""

    x0: np.ndarray  # [k]
    sigma0: float
    bound: float
    budget: int  # objective evaluations the optimiser spent


def search_start(ctx: Context) -> Start:
    """The optimiser's start and budget, read from the effective config and the optimisation result."""
    assert ctx.result is not None, "the stage skips methods that need an optimisation result"
    opt = ctx.cfg.optimize
    return Start(_initial_weights(ctx.cfg), opt.sigma0, opt.bound, ctx.result.num_evaluations)


def training_objective(ctx: Context) -> Objective:
    """``optimize.Objective`` on the training prompts with the first judge, built once per evaluation."""
    if "objective" not in ctx.memo:
        ctx.memo["objective"] = Objective(
            ctx.rt, ctx.cfg, ctx.basis, ctx.persona, ctx.train_prompts, ctx.judge, ctx.cache
        )
    return ctx.memo["objective"]  # type: ignore[no-any-return]


def scorer(objective: Objective, log: list[Scored]) -> Evaluate:
    """An ``Evaluate`` over ``objective`` that appends every candidate's ``Scored`` to ``log``."""

    def evaluate(candidates: np.ndarray) -> np.ndarray:
        scored, _ = objective.score(candidates)
        log.extend(scored)
        return np.array([s.objective if s.verdicts else math.nan for s in scored])

    return evaluate


def gaussian_candidates(start: Start, rng: np.random.Generator) -> np.ndarray:
    """``start.budget`` draws from N(x0, sigma0^2 I), clipped to +-bound: [budget, k]."""
    draws = rng.normal(start.x0, start.sigma0, size=(start.budget, start.x0.size))
    return np.clip(draws, -start.bound, start.bound)


@dataclass(frozen=True)
class CoordinateResult:
    """The end point of a coordinate search, its objective value and every batch it tried."""

    best: np.ndarray  # [k]
    value: float
    trials: list[np.ndarray]  # one [per_axis, k] batch per trait, in trait order

    @property
    def evaluations(self) -> int:
        return sum(len(t) for t in self.trials)


def coordinate_search(start: Start, evaluate: Evaluate) -> CoordinateResult:
    """One pass of coordinate search from x0 along each trait axis in turn.

    Axis i gets ``budget // k`` values evenly spaced over x0_i +- 2 sigma0 (clipped to the bound;
    x0_i alone when only one value fits), all other weights held at the current point, scored in one
    batch. The point moves to the best of them when it beats the current point's value (on the first
    axis the current point has none), then the next axis is searched from there.

    Raises:
        MethodSkipped: the budget is smaller than the number of traits, or no candidate got a verdict.
    """
    k = start.x0.size
    per_axis = start.budget // k
    if per_axis < 1:
        raise MethodSkipped(f"grid: a budget of {start.budget} evaluations cannot cover {k} traits")
    point = start.x0.astype(np.float64).copy()
    value = math.nan
    trials: list[np.ndarray] = []
    for i in range(k):
        # point[i] is still x0_i here: each axis is searched once, in turn.
        low = max(start.x0[i] - 2 * start.sigma0, -start.bound)
        high = min(start.x0[i] + 2 * start.sigma0, start.bound)
        axis = np.linspace(low, high, per_axis) if per_axis > 1 else start.x0[i : i + 1]
        batch = np.repeat(point[None, :], per_axis, axis=0)  # [per_axis, k]
        batch[:, i] = axis
        values = np.asarray(evaluate(batch), dtype=np.float64)
        trials.append(batch)
        if not np.isfinite(values).any():
            continue  # no verdict on this axis: stay where we are
        j = int(np.nanargmin(values))
        if math.isnan(value) or values[j] < value:
            point, value = batch[j].copy(), float(values[j])
    if math.isnan(value):
        raise MethodSkipped("grid: the judge gave no verdict for any candidate")
    return CoordinateResult(point, value, trials)
