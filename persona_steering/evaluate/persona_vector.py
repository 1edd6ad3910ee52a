"""Single persona vectors (the meandiff and pca baselines): the persona's samples minus the model.

The contrast pairs sample ``j`` of the persona with the model's own unsteered answer to training
prompt ``j mod m`` (m = min(#samples, #training prompts)): both are read as the assistant's
answer to that same prompt, so the prompt cancels and the difference is about how the persona
talks. Only training prompts are used: held-out prompts must stay unseen by every method.

Strength: a single vector is steered like trait directions, ``unit(v) * alpha * scale * s``
(scale = the basis' mean residual norm at the layer). ``s`` is ``evaluate.vector_strength``
when set, else the length of the proposed combination ``|w @ U|``, so both steer with vectors of
equal norm and differ only in direction; 1.0 (one trait at weight 1) without a proposed vector.
"""

from __future__ import annotations

from typing import Any

import torch

from persona_steering.cache import digest
from persona_steering.evaluate.core import Context, MethodSkipped, Plan
from persona_steering.extraction import Pair, record_activations
from persona_steering.generation import Request, chat_text, generate
from persona_steering.traits import load_prompts
from persona_steering.vectors import mean_diff, pca_direction, unit

CONTRAST_VERSION = 1
DIRECTIONS = {"mean_diff": mean_diff, "pca": pca_direction}


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
    if "persona_directions" in ctx.memo:
        return ctx.memo["persona_directions"]  # type: ignore[no-any-return]
    pos, neg = contrast_rows(ctx)
    if not pos:
        raise MethodSkipped("no usable persona sample: every sample or base answer tokenised to nothing")
    key = {
        "v": CONTRAST_VERSION,
        "model": ctx.rt.fingerprint,
        "dtype": str(ctx.rt.model.dtype),
        "layer": ctx.basis.layer,
        "rows": digest([[r.prompt_text, list(r.answer_ids)] for r in pos + neg]),
    }
    hit = ctx.cache.get("persona_vector", key)
    if hit is not None:
        out = {name: torch.tensor(hit[name], dtype=torch.float32) for name in DIRECTIONS}
    else:
        acts, _ = record_activations(
            ctx.rt, pos + neg, ctx.cfg.generation.max_batch, desc="persona activations"
        )
        layer_acts = acts["response_avg"][:, ctx.basis.layer]  # [2n, hidden]
        n = len(pos)
        out = {name: fn(layer_acts[:n], layer_acts[n:]) for name, fn in DIRECTIONS.items()}
        ctx.cache.set("persona_vector", key, {name: v.tolist() for name, v in out.items()})
    ctx.memo["persona_directions"] = out
    ctx.memo["contrast_pairs"] = len(pos)
    return out


def contrast_rows(ctx: Context) -> tuple[list[Pair], list[Pair]]:
    """(persona sample rows, base answer rows), paired by index; pairs with an empty side dropped."""
    train = load_prompts(ctx.cfg.optimize.prompts_file, "train")
    samples = ctx.persona.samples
    m = min(len(samples), len(train))
    base = generate(
        ctx.rt,
        [Request(p) for p in train[:m]],
        ctx.cfg.generation,
        cache=ctx.cache,
        seed=ctx.cfg.seed,
        desc="base answers",
    )
    tok = ctx.rt.tokenizer
    pos: list[Pair] = []
    neg: list[Pair] = []
    for j, sample in enumerate(samples):
        prompt = train[j % m]
        answer = base[j % m]
        sample_ids = tuple(tok(sample, add_special_tokens=False)["input_ids"])
        if not sample_ids or not answer.ids:
            continue  # an empty response has no response_avg
        text = chat_text(tok, Request(prompt))
        pos.append(Pair(prompt, "", sample, text, sample_ids))
        neg.append(Pair(prompt, "", answer.text, answer.prompt, tuple(answer.ids)))
    return pos, neg
