"""The persona's own direction: its samples minus the model's unsteered answers, at one layer.

Contrast pairs: sample ``j`` of the persona against the model's own greedy answer to training
prompt ``j mod m`` (m = min(#samples, #training prompts)). Both are read as the assistant's answer
to that same prompt, so the prompt cancels and the difference is about how the persona talks.
Only training prompts are used: held-out prompts stay unseen.

``evaluate`` steers along it alone (the meandiff and pca baselines); with
``steering.persona_axis`` ``optimize`` adds it as a sixth axis 'P' that CMA-ES weighs beside
R1-R5 (the mean difference, unit length, in the traits' units).
"""

from __future__ import annotations

from typing import Any

import torch

from persona_steering.cache import Cache, digest
from persona_steering.config import Config
from persona_steering.extraction import Pair, record_activations
from persona_steering.generation import Request, chat_text, generate
from persona_steering.runtime import Runtime
from persona_steering.traits import Persona, load_prompts
from persona_steering.vectors import mean_diff, pca_direction

CONTRAST_VERSION = 1
DIRECTIONS = {"mean_diff": mean_diff, "pca": pca_direction}


class NoContrastError(ValueError):
    """Every persona sample or unsteered answer tokenised to nothing."""


def persona_directions(
    rt: Runtime, cfg: Config, persona: Persona, cache: Cache | None, layer: int
) -> tuple[dict[str, torch.Tensor], int]:
    """({'mean_diff', 'pca'}: [hidden] directions at hidden_states row ``layer``, #pairs), cached."""
    pos, neg = contrast_rows(rt, cfg, persona, cache)
    if not pos:
        raise NoContrastError("no usable persona sample: every sample or base answer tokenised to nothing")
    key = {
        "v": CONTRAST_VERSION,
        "model": rt.fingerprint,
        "dtype": str(rt.model.dtype),
        "layer": layer,
        "rows": digest([[r.prompt_text, list(r.answer_ids)] for r in pos + neg]),
    }
    hidden = rt.hidden_size
    hit = None if cache is None else cache.get("persona_vector", key, lambda v: _directions_row(v, hidden))
    if hit is not None:
        return {name: torch.tensor(hit[name], dtype=torch.float32) for name in DIRECTIONS}, len(pos)
    acts, _ = record_activations(rt, pos + neg, cfg.generation.max_batch, desc="persona activations")
    layer_acts = acts["response_avg"][:, layer]  # [2n, hidden]
    n = len(pos)
    out = {name: fn(layer_acts[:n], layer_acts[n:]) for name, fn in DIRECTIONS.items()}
    if cache is not None:
        cache.set("persona_vector", key, {name: v.tolist() for name, v in out.items()})
    return out, n


def _directions_row(value: Any, hidden: int) -> bool:
    """A cached row of persona directions: a list of ``hidden`` numbers per method."""
    return isinstance(value, dict) and all(
        isinstance(value.get(name), list) and len(value[name]) == hidden for name in DIRECTIONS
    )


def contrast_rows(
    rt: Runtime, cfg: Config, persona: Persona, cache: Cache | None
) -> tuple[list[Pair], list[Pair]]:
    """(persona sample rows, base answer rows), paired by index; pairs with an empty side dropped."""
    train = load_prompts(cfg.optimize.prompts_file, "train")
    samples = persona.samples
    m = min(len(samples), len(train))
    base = generate(
        rt, [Request(p) for p in train[:m]], cfg.generation, cache=cache, seed=cfg.seed, desc="base answers"
    )
    tok = rt.tokenizer
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
