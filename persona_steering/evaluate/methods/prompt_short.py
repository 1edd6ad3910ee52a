"""``prompt-short``: a one-line style instruction as the system prompt, no steering.

The fair prompting baseline for a steering vector that carries a few traits: one sentence, not the
whole profile. It comes from ``personas/<id>/persona_short_prompt.txt``; without that file the
profile's first sentence stands in, and the method's info says so.
"""

from __future__ import annotations

import re

from persona_steering.evaluate.core import Context, Method, Plan
from persona_steering.generation import Request

SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def plan(ctx: Context, prompts: list[str]) -> Plan:
    """Every prompt under the persona's short prompt as system prompt, unsteered."""
    short = ctx.persona.short_prompt
    source = "persona_short_prompt.txt"
    if short is None:
        short = first_sentence(ctx.persona.profile)
        source = "first sentence of persona_profile.txt (no persona_short_prompt.txt)"
    info = {"system_prompt": short, "source": source}
    return Plan([Request(p, system=short) for p in prompts], ctx.zeros(len(prompts)), info)


def first_sentence(text: str) -> str:
    """The first sentence of the first non-empty line of ``text``."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return SENTENCE_END.split(line, maxsplit=1)[0]


METHODS = [
    Method("prompt-short", "one-line style instruction as the system prompt, no steering", plan, order=15)
]
