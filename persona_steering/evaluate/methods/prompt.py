"""``prompt``: the persona's free-text profile as the system prompt, no steering."""

from __future__ import annotations

from persona_steering.evaluate.core import Context, Method, Plan
from persona_steering.generation import Request


def plan(ctx: Context, prompts: list[str]) -> Plan:
    """Every prompt under the persona profile as system prompt, unsteered."""
    return Plan([Request(p, system=ctx.persona.profile) for p in prompts], ctx.zeros(len(prompts)))


METHODS = [Method("prompt", "persona profile as the system prompt, no steering", plan, order=10)]
