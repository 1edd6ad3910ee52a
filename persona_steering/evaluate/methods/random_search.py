"""``random_search``: as many draws from CMA-ES's start distribution as CMA-ES evaluated, scored alike.

The control for the optimiser: candidates come from N(x0, sigma0^2 I), the distribution CMA-ES
samples its first population from (``optimize.initial_weights`` and ``optimize.sigma0``), clipped
to +-``optimize.bound``; same budget (``num_evaluations`` of the optimisation result), same training
prompts and same objective (``optimize.Objective``, see ``evaluate/search.py``). What CMA-ES adds
over this is adapting the distribution. The candidate with the best training objective is then
steered on the held-out prompts like ``proposed``.
"""

from __future__ import annotations

import numpy as np
import torch

from persona_steering.evaluate.core import Context, Method, MethodSkipped, Plan
from persona_steering.evaluate.search import gaussian_candidates, scorer, search_start, training_objective
from persona_steering.generation import Request
from persona_steering.optimize import Scored

SEED_OFFSET = 7919
"""Keeps the random candidates independent of the seeds that CMA-ES itself drew from."""


def plan(ctx: Context, prompts: list[str]) -> Plan:
    """Search on the training prompts in one batched call, then steer with the best candidate."""
    assert ctx.result is not None, "the stage skips methods that need an optimisation result"
    start = search_start(ctx)
    rng = np.random.default_rng([ctx.cfg.seed, SEED_OFFSET])
    candidates = gaussian_candidates(start, rng)  # [budget, k]
    scored: list[Scored] = []
    values = scorer(training_objective(ctx), scored)(candidates)
    if not np.isfinite(values).any():
        raise MethodSkipped("random_search: the judge gave no verdict for any candidate")
    best = int(np.nanargmin(values))
    weights = torch.tensor(candidates[best], dtype=torch.float32)
    info = {
        "evaluations": start.budget,
        "x0": dict(zip(ctx.basis.traits, map(float, start.x0), strict=True)),
        "sigma0": start.sigma0,
        "bound": start.bound,
        "train_prompts": len(ctx.train_prompts),
        "weights": dict(zip(ctx.basis.traits, map(float, weights), strict=True)),
        "train_fit": scored[best].fit,
        "train_fit_proposed": ctx.result.score,
        "missing_verdicts": int(sum(s.expected - s.verdicts for s in scored)),
    }
    return Plan([Request(p) for p in prompts], ctx.weight_deltas(weights, len(prompts)), info)


METHODS = [
    Method(
        "random_search",
        "best of as many draws from N(x0, sigma0^2) as CMA-ES evaluated",
        plan,
        needs_optimization=True,
        order=40,
    )
]
