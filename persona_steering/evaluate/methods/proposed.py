"""``proposed`` and ``prompt+proposed``: the CMA-ES best trait weights, alone and under the profile;
``proposed-mean``: the mean of CMA-ES's final search distribution.

The best weights are the maximum over every noisy evaluation of the run, so their training score
is biased upward (the winner's curse); the distribution mean, which CMA-ES moved by the ranking
of whole populations, is the less selected estimate of where the good weights lie.
"""

from __future__ import annotations

import torch

from persona_steering.evaluate.core import Context, Method, MethodSkipped, Plan
from persona_steering.generation import Request


def plan(ctx: Context, prompts: list[str]) -> Plan:
    """Every prompt steered by the optimiser's best weights."""
    return _plan(ctx, prompts, system=None)


def plan_with_prompt(ctx: Context, prompts: list[str]) -> Plan:
    """Every prompt steered by the best weights and under the persona profile as system prompt."""
    return _plan(ctx, prompts, system=ctx.persona.profile)


def plan_mean(ctx: Context, prompts: list[str]) -> Plan:
    """Every prompt steered by the mean of CMA-ES's final search distribution."""
    assert ctx.result is not None, "the stage skips methods that need an optimisation result"
    mean = ctx.result.data.get("mean_weights")
    if not isinstance(mean, dict) or set(mean) != set(ctx.basis.traits):
        raise MethodSkipped("the optimisation result records no distribution mean for these traits")
    return _steered(ctx, prompts, None, {t: float(mean[t]) for t in ctx.basis.traits})


def _plan(ctx: Context, prompts: list[str], system: str | None) -> Plan:
    assert ctx.result is not None, "the stage skips methods that need an optimisation result"
    # From the file, not a float32 tensor: the report shows the weights exactly as found.
    return _steered(ctx, prompts, system, {t: ctx.result.best_weights[t] for t in ctx.basis.traits})


def _steered(ctx: Context, prompts: list[str], system: str | None, weights: dict[str, float]) -> Plan:
    deltas = ctx.weight_deltas(torch.tensor(list(weights.values())), len(prompts))  # [prompts, hidden]
    info = {"weights": weights, "norm": float(deltas[0].norm()) if prompts else 0.0}
    return Plan([Request(p, system=system) for p in prompts], deltas, info)


METHODS = [
    Method("proposed", "CMA-ES best trait weights", plan, needs_optimization=True, order=50),
    Method(
        "prompt+proposed",
        "persona profile as system prompt and CMA-ES best weights",
        plan_with_prompt,
        needs_optimization=True,
        order=60,
    ),
    Method(
        "proposed-mean",
        "mean of CMA-ES's final search distribution",
        plan_mean,
        needs_optimization=True,
        order=55,
    ),
]
