"""Single persona vectors (the meandiff and pca baselines): the persona's samples minus the model.

The direction is ``persona_axis.persona_directions`` (training prompts only), the same one
``optimize`` weighs as axis 'P' with ``steering.persona_axis``.

Strength: a single vector is steered like trait directions, ``unit(v) * alpha * scale * s``
(scale = the basis' mean residual norm at the layer). ``s`` is ``evaluate.vector_strength``
when set, else the length of the proposed combination ``|w @ U|``, so both steer with vectors of
equal norm and differ only in direction; 1.0 (one trait at weight 1) without a proposed vector.
"""

from __future__ import annotations

from typing import Any

import torch

from persona_steering.evaluate.core import Context, MethodSkipped, Plan
from persona_steering.generation import Request
from persona_steering.persona_axis import NoContrastError
from persona_steering.persona_axis import persona_directions as compute_directions
from persona_steering.vectors import unit


def single_vector_plan(ctx: Context, prompts: list[str], method: str) -> Plan:
    """Every prompt steered by the persona's ``method`` direction at the basis layer.

    Args:
        ctx: the evaluation context.
        prompts: held-out prompts.
        method: 'mean_diff' or 'pca'.
    """
    directions = persona_directions(ctx)
    strength = vector_strength(ctx)
    direction = unit(directions[method])  # [hidden]
    delta = direction * ctx.cfg.steering.alpha * ctx.basis.scale * strength  # [hidden]
    info: dict[str, Any] = {
        "strength": strength,
        "norm": float(delta.norm()),
        "pairs": ctx.memo["contrast_pairs"],
        "cosine_with_traits": {
            t: float(u @ direction) for t, u in zip(ctx.basis.traits, ctx.basis.directions, strict=True)
        },
    }
    weights = ctx.proposed_weights()
    if weights is not None:
        proposed = weights @ ctx.basis.directions  # [hidden]
        if float(proposed.norm()) > 0:
            info["cosine_with_proposed"] = float(unit(proposed) @ direction)
    return Plan([Request(p) for p in prompts], delta.repeat(len(prompts), 1), info)


def vector_strength(ctx: Context) -> float:
    """The single vectors' length in alpha * scale units (see the module docstring)."""
    if ctx.cfg.evaluate.vector_strength is not None:
        return float(ctx.cfg.evaluate.vector_strength)
    weights = ctx.proposed_weights()
    if weights is None:
        return 1.0
    return float((weights @ ctx.basis.directions).norm())


def persona_directions(ctx: Context) -> dict[str, torch.Tensor]:
    """{'mean_diff', 'pca'}: [hidden] directions at the basis layer, computed once and memoised."""
    if "persona_directions" not in ctx.memo:
        try:
            out, pairs = compute_directions(ctx.rt, ctx.cfg, ctx.persona, ctx.cache, ctx.basis.layer)
        except NoContrastError as exc:
            raise MethodSkipped(str(exc)) from None
        ctx.memo["persona_directions"] = out
        ctx.memo["contrast_pairs"] = pairs
    return ctx.memo["persona_directions"]  # type: ignore[no-any-return]
