"""``pca``: one persona vector, the first principal direction of samples and base answers pooled."""

from __future__ import annotations

from persona_steering.evaluate.core import Context, Method, Plan
from persona_steering.evaluate.persona_vector import single_vector_plan


def plan(ctx: Context, prompts: list[str]) -> Plan:
    """Every prompt steered by the persona's PCA direction, sign-aligned with the mean difference."""
    return single_vector_plan(ctx, prompts, "pca")


METHODS = [Method("pca", "single persona vector: first principal direction, sign-aligned", plan, order=30)]
