"""``proposed`` and ``prompt+proposed``: the CMA-ES best trait weights, alone and under the profile."""

from __future__ import annotations

from persona_steering.evaluate.core import Context, Method, Plan
from persona_steering.generation import Request


def plan(ctx: Context, prompts: list[str]) -> Plan:
    """Every prompt steered by the optimiser's best weights."""
    return _plan(ctx, prompts, system=None)


def plan_with_prompt(ctx: Context, prompts: list[str]) -> Plan:
    """Every prompt steered by the best weights and under the persona profile as system prompt."""
    return _plan(ctx, prompts, system=ctx.persona.profile)


def _plan(ctx: Context, prompts: list[str], system: str | None) -> Plan:
    weights = ctx.proposed_weights()
    assert weights is not None, "the stage skips methods that need an optimisation result"
    deltas = ctx.weight_deltas(weights, len(prompts))  # [prompts, hidden]
    info = {
        # From the file, not the float32 tensor: the report shows the weights exactly as found.
        "weights": {t: ctx.result.best_weights[t] for t in ctx.basis.traits} if ctx.result else {},
        "norm": float(deltas[0].norm()) if prompts else 0.0,
    }
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
]
