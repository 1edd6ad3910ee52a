"""``random_search``: as many uniformly random weight vectors as CMA-ES evaluated, scored the same way.

The control for the optimiser: same budget (``num_evaluations`` candidates from the optimisation
result), same training prompts, same objective (``optimize.Objective``: persona fit against the
base answers, with the same coherence penalty), same bounds. The candidate with the best training
objective is then steered on the held-out prompts like ``proposed``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from persona_steering.evaluate.core import Context, Method, MethodSkipped, Plan
from persona_steering.generation import Request
from persona_steering.optimize import Objective

SEED_OFFSET = 7919
"""Keeps the random candidates independent of the seeds that CMA-ES itself drew from."""


def plan(ctx: Context, prompts: list[str]) -> Plan:
    """Search on the training prompts in one batched call, then steer with the best candidate."""
    assert ctx.result is not None, "the stage skips methods that need an optimisation result"
    budget = int(ctx.result["num_evaluations"])
    bound = ctx.cfg.optimize.bound
    rng = np.random.default_rng([ctx.cfg.seed, SEED_OFFSET])
    candidates = rng.uniform(-bound, bound, size=(budget, len(ctx.basis.traits)))  # [budget, k]
    objective = Objective(ctx.rt, ctx.cfg, ctx.basis, ctx.persona, ctx.train_prompts, ctx.judge, ctx.cache)
    scored, _ = objective.score(candidates)
    values = np.array([s.objective if s.verdicts else math.nan for s in scored])
    if not np.isfinite(values).any():
        raise MethodSkipped("random_search: the judge gave no verdict for any candidate")
    best = int(np.nanargmin(values))
    weights = torch.tensor(candidates[best], dtype=torch.float32)
    info = {
        "evaluations": budget,
        "bound": bound,
        "train_prompts": len(ctx.train_prompts),
        "weights": dict(zip(ctx.basis.traits, map(float, weights), strict=True)),
        "train_fit": scored[best].fit,
        "train_fit_proposed": ctx.result.get("best_score"),
        "missing_verdicts": int(sum(s.expected - s.verdicts for s in scored)),
    }
    return Plan([Request(p) for p in prompts], ctx.weight_deltas(weights, len(prompts)), info)


METHODS = [
    Method(
        "random_search",
        "best of as many random weight vectors as CMA-ES evaluated",
        plan,
        needs_optimization=True,
        order=40,
    )
]
