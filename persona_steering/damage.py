"""The ``damage`` stage: how far can a layer be steered before the model breaks? A measured budget.

For each layer in ``damage.layers`` and each norm in ``damage.norms`` (alpha units: a fraction of
the layer's mean residual norm), the model is steered along every trait direction of the basis
(``steering.basis``), with both signs, and three damage measures are averaged over the directions:

- **KL**: the mean over positions of KL(unsteered || steered) of the next-token distribution on
  a fixed neutral text (``NEUTRAL_TEXT``, every position steered), in nats;
- **perplexity** of that same text under steering;
- **loop rate** of answers to the first held-out prompts (``style.loops``: some word 4-gram 3+ times).

The budget at a layer is the largest norm such that it and every smaller norm keep the mean KL
<= ``damage.max_kl`` and the loop rate <= the unsteered loop rate + ``damage.max_loop_increase``.
``optimize.max_norm`` takes it (with ``optimize.norm_penalty``). Forward passes and answers are
memoised. Outputs in ``<out_dir>/<model-slug>/``: damage.json, damage.md, damage.png.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persona_steering import __version__
from persona_steering.basis import TraitBasis, load_basis
from persona_steering.cache import Cache, atomic_write_json, atomic_write_text
from persona_steering.config import Config
from persona_steering.evaluate.core import json_safe
from persona_steering.generation import Request, generate
from persona_steering.layers import normalize_layer
from persona_steering.rendering import fmt_number, markdown_table, save_figure, subplots
from persona_steering.runtime import Runtime, identify, load_runtime
from persona_steering.steering import SteeringSpec, steer, vector_digest
from persona_steering.store import VectorFileError
from persona_steering.style import loops
from persona_steering.traits import load_prompts

DAMAGE_VERSION = 1
NEUTRAL_TEXT = (
    "The river begins in the hills north of the town and runs south for about forty kilometres before "
    "it reaches the sea. Along its course it passes farms, a small forest and two bridges. The water "
    "level is highest in early spring, when the snow melts, and lowest at the end of summer. Several "
    "kinds of fish live in the river, and birds nest in the reeds along its banks."
)
"""Plain descriptive prose with no persona, register or stance: the text whose next-token
distributions steering should leave alone."""


def run_damage(cfg: Config, rt: Runtime | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the damage curve at every layer and norm, derive the budget, write JSON, Markdown, PNG.

    Args:
        cfg: the configuration (``damage``, ``steering``, ``traits``, ``generation``).
        rt: an already loaded model (loaded from ``cfg.model`` when None).
        log: where progress lines go.

    Returns:
        The data written to ``damage.json``.
    """
    d, s = cfg.damage, cfg.steering
    ident = identify(cfg.model)
    probe = load_basis(s.trait_vector_dir, ident.slug, cfg.traits, s.layer, fingerprint=ident.fingerprint)
    layers = list(dict.fromkeys(normalize_layer(layer, probe.num_layers) for layer in d.layers))
    bases = {
        layer: load_basis(
            s.trait_vector_dir,
            ident.slug,
            cfg.traits,
            layer,
            s.vector_method,
            s.summary,
            fingerprint=ident.fingerprint,
            kind=s.basis,
        )
        for layer in layers
    }
    prompts = load_prompts(cfg.optimize.prompts_file, "heldout")[: d.num_prompts]
    norms = sorted(d.norms)
    rt = rt or load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
    if rt.fingerprint != ident.fingerprint:
        raise VectorFileError("the loaded model is not the one the trait vectors were extracted from")
    with Cache(cfg.cache_dir) as cache:
        base_answers = generate(rt, [Request(p) for p in prompts], cfg.generation, cache=cache, seed=cfg.seed)
        base_loop = float(np.mean([loops(a.text) for a in base_answers]))
        base_ppl = float(np.exp(-np.mean(_next_token_logprobs(rt, None, 0)[1])))
        curves = {}
        for layer, basis in bases.items():
            curves[layer] = [_point(rt, cfg, cache, basis, norm, prompts) for norm in norms]
            log(f"layer {layer}: " + ", ".join(f"{p['norm']:g}: KL {p['kl']:.3f}" for p in curves[layer]))
    limit = base_loop + d.max_loop_increase
    data = json_safe(
        {
            "model_id": rt.model_id,
            "fingerprint": rt.fingerprint,
            "basis": s.basis,
            "traits": list(cfg.traits),
            "norm_unit": "alpha: a fraction of the layer's mean residual norm",
            "directions": "every trait direction of the basis, both signs; measures are means over them",
            "neutral_text": NEUTRAL_TEXT,
            "prompts": prompts,
            "unsteered": {"loop_rate": base_loop, "perplexity": base_ppl},
            "budget": {
                "max_kl": d.max_kl,
                "max_loop_rate": limit,
                "rule": "largest norm with it and every smaller norm within both limits",
            },
            "layers": {
                str(layer): {"curve": c, "max_norm": max_norm(c, d.max_kl, limit)}
                for layer, c in curves.items()
            },
            "config_digest": cfg.digest("model", "generation", "steering", "damage", "traits", "seed"),
            "version": __version__,
        }
    )
    folder = Path(d.out_dir) / ident.slug
    atomic_write_json(folder / "damage.json", data)
    atomic_write_text(folder / "damage.md", render_damage(data))
    _plot(folder / "damage.png", data)
    log(f"wrote {folder}/damage.json, damage.md, damage.png")
    return data


def max_norm(curve: list[dict[str, Any]], max_kl: float, max_loop_rate: float) -> float | None:
    """The largest norm of ``curve`` (sorted by norm) with it and all smaller ones within budget."""
    best = None
    for point in curve:
        kl, loop = point["kl"], point["loop_rate"]
        if kl is None or kl > max_kl or loop > max_loop_rate:
            break
        best = point["norm"]
    return best


def kl_divergence(base_logp: torch.Tensor, steered_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(base || steered), [batch], from log-probabilities [batch, seq, vocab]."""
    p = base_logp.exp()
    return (p * (base_logp - steered_logp)).sum(-1).mean(-1)


def _point(
    rt: Runtime, cfg: Config, cache: Cache, basis: TraitBasis, norm: float, prompts: list[str]
) -> dict[str, Any]:
    """KL, perplexity and loop rate at one layer and norm, averaged over +-every basis direction."""
    dirs = torch.cat([basis.directions, -basis.directions])  # [2k, hidden]
    deltas = norm * basis.scale * dirs  # [2k, hidden]
    key = {
        "v": DAMAGE_VERSION,
        "model": rt.fingerprint,
        "dtype": str(rt.model.dtype),
        "text": NEUTRAL_TEXT,
        "layer": basis.layer,
        "deltas": [vector_digest(v) for v in deltas],
    }
    hit = cache.get("damage", key)
    if not isinstance(hit, dict):
        kls, logps = _next_token_logprobs(rt, deltas, basis.layer)
        hit = {"kl": kls, "ppl": [float(np.exp(-np.mean(row))) for row in logps]}
        cache.set("damage", key, hit)
    n = len(prompts)
    requests = [Request(p) for _ in range(len(dirs)) for p in prompts]
    answers = generate(
        rt,
        requests,
        cfg.generation,
        steering=SteeringSpec(basis.layer, deltas, cfg.steering.positions).repeat(n),
        cache=cache,
        seed=cfg.seed,
        desc=f"damage layer {basis.layer}",
    )
    return {
        "norm": norm,
        "kl": float(np.mean(hit["kl"])),
        "kl_max": float(np.max(hit["kl"])),
        "perplexity": float(np.mean(hit["ppl"])),
        "loop_rate": float(np.mean([loops(a.text) for a in answers])),
        "example": answers[0].text,
    }


def _next_token_logprobs(
    rt: Runtime, deltas: torch.Tensor | None, layer: int
) -> tuple[list[float], list[list[float]]]:
    """(KL(unsteered || steered) per delta row, the text's next-token log-probabilities per row).

    With ``deltas`` None: ([], [the unsteered log-probabilities]).
    """
    ids = torch.tensor(rt.tokenizer(NEUTRAL_TEXT)["input_ids"], device=rt.device)[None]  # [1, seq]
    with torch.inference_mode(), rt.autocast():
        base = rt.model(input_ids=ids).logits.float().log_softmax(-1)  # [1, seq, vocab]
        if deltas is None:
            return [], [base[0, :-1].gather(-1, ids[0, 1:, None])[:, 0].tolist()]
        rows = ids.expand(len(deltas), -1)
        with steer(rt.model, layer, deltas.to(rt.device), positions="all"):
            logp = rt.model(input_ids=rows).logits.float().log_softmax(-1)  # [rows, seq, vocab]
    kl = kl_divergence(base.expand_as(logp), logp)
    nll = logp[:, :-1].gather(-1, rows[:, 1:, None])[..., 0]  # [rows, seq-1]
    return kl.cpu().tolist(), nll.cpu().tolist()


def render_damage(data: dict[str, Any]) -> str:
    """Markdown: one row per layer and norm, and the budget per layer."""
    rows = []
    for layer, entry in data["layers"].items():
        for p in entry["curve"]:
            rows.append(
                [
                    layer,
                    f"{p['norm']:g}",
                    fmt_number(p["kl"], 3),
                    fmt_number(p["perplexity"], 1),
                    fmt_number(p["loop_rate"]),
                ]
            )
    budget = data["budget"]
    maxima = ", ".join(f"layer {layer}: {entry['max_norm']}" for layer, entry in data["layers"].items())
    return (
        f"# Damage curve: {data['model_id']} ({data['basis']} basis)\n\n"
        f"Norms in {data['norm_unit']}; {data['directions']}. Unsteered: perplexity "
        f"{fmt_number(data['unsteered']['perplexity'], 1)}, "
        f"loop rate {fmt_number(data['unsteered']['loop_rate'])}.\n\n"
        + markdown_table(["layer", "norm", "KL (nats)", "perplexity", "loop rate"], rows)
        + f"\n\nBudget: KL <= {budget['max_kl']:g} and loop rate <= {fmt_number(budget['max_loop_rate'])} "
        f"({budget['rule']}). Largest norm within it: {maxima}.\n"
    )


def _plot(path: Path, data: dict[str, Any]) -> None:
    fig, axes = subplots(1, 3, figsize=(13, 4))
    for layer, entry in data["layers"].items():
        xs = [p["norm"] for p in entry["curve"]]
        for ax, key in zip(axes, ("kl", "perplexity", "loop_rate"), strict=True):
            ax.plot(
                xs,
                [np.nan if p[key] is None else p[key] for p in entry["curve"]],
                marker=".",
                label=f"layer {layer}",
            )
    axes[0].axhline(data["budget"]["max_kl"], color="grey", ls="--", lw=0.8)
    axes[2].axhline(data["budget"]["max_loop_rate"], color="grey", ls="--", lw=0.8)
    for ax, label in zip(
        axes, ("KL(unsteered || steered), nats", "perplexity of the neutral text", "loop rate"), strict=True
    ):
        ax.set(xscale="log", xlabel="steering norm (alpha units)", ylabel=label)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    fig.suptitle("Damage curve: steering norm against next-token KL, perplexity and loops")
    save_figure(fig, path)
