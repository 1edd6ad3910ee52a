"""``grid``: coordinate search along one trait at a time, with CMA-ES's start, budget and objective.

From x0, each trait axis in turn gets ``num_evaluations // k`` evenly spaced values over
x0_i +- 2 sigma0 (clipped to +-``optimize.bound``), scored in one batch by the optimiser's objective
on the training prompts; the point moves to the best and the next axis is searched from there
(``evaluate/search.py``, ``coordinate_search``). It asks whether the traits can be tuned one by
one, without CMA-ES modelling how they interact. The end point steers the held-out prompts.
"""

from __future__ import annotations

import torch

from persona_steering.evaluate.core import Context, Method, Plan
from persona_steering.evaluate.search import coordinate_search, scorer, search_start, training_objective
from persona_steering.generation import Request
from persona_steering.optimize import Scored


def plan(ctx: Context, prompts: list[str]) -> Plan:
    """Search on the training prompts (one batched call per trait), then steer with the end point."""
    assert ctx.result is not None, "the stage skips methods that need an optimisation result"
    start = search_start(ctx)
    scored: list[Scored] = []
    found = coordinate_search(start, scorer(training_objective(ctx), scored))
    weights = torch.tensor(found.best, dtype=torch.float32)
    info = {
        "evaluations": found.evaluations,
        "budget": start.budget,
        "per_trait": len(found.trials[0]),
        "x0": dict(zip(ctx.basis.traits, map(float, start.x0), strict=True)),
        "sigma0": start.sigma0,
        "bound": start.bound,
        "train_prompts": len(ctx.train_prompts),
        "weights": dict(zip(ctx.basis.traits, map(float, found.best), strict=True)),
        "train_objective": found.value,
        "train_fit_proposed": ctx.result.score,
        "missing_verdicts": int(sum(s.expected - s.verdicts for s in scored)),
    }
    return Plan([Request(p) for p in prompts], ctx.weight_deltas(weights, len(prompts)), info)


METHODS = [
    Method(
        "grid",
        "coordinate search, one trait at a time, with CMA-ES's budget",
        plan,
        needs_optimization=True,
        order=45,
    )
]
