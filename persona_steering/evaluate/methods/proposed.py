"""The optimiser's weights: ``proposed`` steers with the ones the run serves (``optimize.select``),
``prompt+proposed`` with them under the profile; ``proposed-mean`` and ``proposed-best`` steer with the
final search mean and with the best candidate, whichever the run does not serve.

The best candidate is the maximum over every noisy evaluation of the run, so its training score is
biased upward (the winner's curse); the distribution mean, which CMA-ES moved by the ranking of whole
populations, is the less selected estimate (docs/proposed_mean.md measured it carrying over better).
"""

from __future__ import annotations

import torch

from persona_steering.evaluate.core import Context, Method, MethodSkipped, Plan
from persona_steering.generation import Request


def plan(ctx: Context, prompts: list[str]) -> Plan:
    """Every prompt steered by the weights the optimisation serves."""
    return _plan(ctx, prompts, system=None)


def plan_with_prompt(ctx: Context, prompts: list[str]) -> Plan:
    """Every prompt steered by the served weights and under the persona profile as system prompt."""
    return _plan(ctx, prompts, system=ctx.persona.profile)


def plan_mean(ctx: Context, prompts: list[str]) -> Plan:
    """Every prompt steered by the mean of CMA-ES's final search distribution."""
    return _alternative(ctx, prompts, "mean", "mean_weights")


def plan_best(ctx: Context, prompts: list[str]) -> Plan:
    """Every prompt steered by the best candidate CMA-ES evaluated."""
    return _alternative(ctx, prompts, "best", "best_weights")


def _alternative(ctx: Context, prompts: list[str], which: str, key: str) -> Plan:
    assert ctx.result is not None, "the stage skips methods that need an optimisation result"
    if ctx.result.selected == which:
        raise MethodSkipped(f"the run serves these weights (optimize.select={which}): they are `proposed`")
    weights = ctx.result.data.get(key)
    if not isinstance(weights, dict) or set(weights) != set(ctx.basis.traits):
        raise MethodSkipped(f"the optimisation result records no {key} for these traits")
    return _steered(ctx, prompts, None, {t: float(weights[t]) for t in ctx.basis.traits})


def _plan(ctx: Context, prompts: list[str], system: str | None) -> Plan:
    assert ctx.result is not None, "the stage skips methods that need an optimisation result"
    # From the file, not a float32 tensor: the report shows the weights exactly as found.
    return _steered(ctx, prompts, system, {t: ctx.result.selected_weights[t] for t in ctx.basis.traits})


def _steered(ctx: Context, prompts: list[str], system: str | None, weights: dict[str, float]) -> Plan:
    deltas = ctx.weight_deltas(torch.tensor(list(weights.values())), len(prompts))  # [prompts, hidden]
    info = {"weights": weights, "norm": float(deltas[0].norm()) if prompts else 0.0}
    return Plan([Request(p, system=system) for p in prompts], deltas, info)


METHODS = [
    Method("proposed", "the optimiser's weights (optimize.select)", plan, needs_optimization=True, order=50),
    Method(
        "prompt+proposed",
        "persona profile as system prompt and the optimiser's weights",
        plan_with_prompt,
        needs_optimization=True,
        order=60,
    ),
    Method(
        "proposed-mean",
        "mean of CMA-ES's final search distribution (when the run serves the best candidate)",
        plan_mean,
        needs_optimization=True,
        order=55,
    ),
    Method(
        "proposed-best",
        "best candidate CMA-ES evaluated (when the run serves the search mean)",
        plan_best,
        needs_optimization=True,
        order=56,
    ),
]
