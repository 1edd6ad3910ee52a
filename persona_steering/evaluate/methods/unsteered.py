"""``base``: the model as it is, no system prompt and no steering; the reference for persona fit."""

from __future__ import annotations

from persona_steering.evaluate.core import Context, Method, Plan
from persona_steering.generation import Request


def plan(ctx: Context, prompts: list[str]) -> Plan:
    """Every prompt unsteered."""
    return Plan([Request(p) for p in prompts], ctx.zeros(len(prompts)))


METHODS = [Method("base", "no steering, no system prompt", plan, order=0)]
