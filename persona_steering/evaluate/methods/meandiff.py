"""``meandiff``: one persona vector, mean activation of its samples minus the model's own answers."""

from __future__ import annotations

from persona_steering.evaluate.core import Context, Method, Plan
from persona_steering.evaluate.persona_vector import single_vector_plan


def plan(ctx: Context, prompts: list[str]) -> Plan:
    """Every prompt steered by the persona's mean-difference direction (see persona_vector)."""
    return single_vector_plan(ctx, prompts, "mean_diff")


METHODS = [
    Method("meandiff", "single persona vector: mean difference of samples vs base answers", plan, order=20)
]
