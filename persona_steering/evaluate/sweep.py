"""The ``sweep`` stage: one trait vector steered over a grid of layers x coefficients.

Cell (layer L, coef c) answers the trait's first eval questions with ``c * scale_L * u_L`` added
at L (u_L the unit trait vector, scale_L the layer's mean residual norm: c is in alpha units).
Each cell is scored for trait expression and coherence by the judge.

Judge-free proxy for trait expression (always computed; the only one with the embedding judge,
which cannot score traits): each answer is read back *unsteered* through the model, and its
response-averaged activation at a fixed read layer is projected onto the trait's unit vector
there. A cell's proxy is the mean over questions of that projection minus the unsteered answer's.
Positive means the text itself moved towards the trait's positive pole, in activation units.

Generations, verdicts and projections are memoised per row, so widening the grid only computes
the new cells. Outputs: ``<out_dir>/<model-slug>/<trait>/{sweep.json, trait.png, coherence.png}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persona_steering import __version__
from persona_steering.cache import Cache, atomic_write_json, digest
from persona_steering.config import Config, ConfigError
from persona_steering.evaluate.core import json_safe
from persona_steering.extraction import Pair, record_activations
from persona_steering.generation import Answer, Request, generate
from persona_steering.judges import Judge, Query, build_judge
from persona_steering.layers import normalize_layer
from persona_steering.rendering import fmt_number, markdown_table, plot_heatmaps
from persona_steering.runtime import Runtime, identify, load_runtime
from persona_steering.steering import SteeringSpec, vector_digest
from persona_steering.store import VectorFile, VectorFileError, load_vectors
from persona_steering.traits import Trait, load_traits
from persona_steering.vectors import unit

PROJECTION_VERSION = 1


@dataclass
class SweepSetup:
    """The checked inputs of a sweep."""

    trait: Trait
    vectors: VectorFile
    layers: list[int]  # hidden_states rows, deduplicated, in the given order
    coefs: list[float]
    read_layer: int
    questions: list[str]
    folder: Path


def run_sweep(cfg: Config, rt: Runtime | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Steer, judge and project every cell of the grid; write JSON and two heatmaps.

    Args:
        cfg: the configuration (``sweep.trait`` is required).
        rt: an already loaded model (loaded from ``cfg.model`` when None).
        log: where progress lines go.

    Returns:
        The data written to ``sweep.json``.
    """
    cfg.model.require_one_process("sweep")
    setup = prepare_sweep(cfg)
    rt = rt or load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
    if rt.fingerprint != setup.vectors.meta.get("fingerprint"):
        raise VectorFileError("the loaded model is not the one the trait vectors were extracted from")
    with Cache(cfg.cache_dir) as cache:
        judge = build_judge(cfg.judge, rt, cfg.cache_dir)
        base = generate(rt, [Request(q) for q in setup.questions], cfg.generation, cache=cache, seed=cfg.seed)
        cells = {layer: _steered(rt, cfg, setup, layer, cache) for layer in setup.layers}
        rows = list(zip(setup.questions, base, strict=True))
        for per_layer in cells.values():
            rows += [(q, a) for per_coef in per_layer for q, a in zip(setup.questions, per_coef, strict=True)]
        answers = [a for _, a in rows]
        direction = unit(
            setup.vectors.vector(cfg.steering.vector_method, cfg.steering.summary, setup.read_layer)
        )
        values = projections(rt, cache, answers, setup.read_layer, direction, cfg.generation.max_batch)
        proj = dict(zip(_keys(answers), values, strict=True))
        scores = _judge(judge, cache, setup.trait, rows)
    data = json_safe(_summary(cfg, rt, setup, judge, base, cells, proj, scores))
    _write(setup, data)
    log(f"wrote {setup.folder / 'sweep.json'}, trait.png, coherence.png")
    return data


def prepare_sweep(cfg: Config) -> SweepSetup:
    """Check the trait, its vector file and the grid before anything is loaded or written."""
    sw = cfg.sweep
    if not sw.trait:
        raise ConfigError("sweep.trait is required (--trait R2, or make sweep TRAIT=R2)")
    [trait] = load_traits(cfg.vectors.trait_dir, [sw.trait])
    ident = identify(cfg.model)
    path = Path(cfg.steering.trait_vector_dir) / ident.slug / f"{trait.name}.safetensors"
    vectors = load_vectors(path, fingerprint=ident.fingerprint)
    num_layers = int(vectors.meta["num_layers"])
    layers = list(dict.fromkeys(normalize_layer(layer, num_layers) for layer in sw.layers))
    read_layer = normalize_layer(
        sw.read_layer if sw.read_layer is not None else cfg.steering.layer, num_layers
    )
    questions = trait.eval_questions[: sw.num_questions]
    folder = Path(sw.out_dir) / ident.slug / trait.name
    return SweepSetup(trait, vectors, layers, list(sw.coefs), read_layer, questions, folder)


def _steered(rt: Runtime, cfg: Config, setup: SweepSetup, layer: int, cache: Cache) -> list[list[Answer]]:
    """Answers [coef][question] at one layer, from one batched generate call."""
    s = cfg.steering
    u = unit(setup.vectors.vector(s.vector_method, s.summary, layer))  # [hidden]
    scale = setup.vectors.norm(s.summary, layer)
    n = len(setup.questions)
    coefs = torch.tensor(setup.coefs, dtype=torch.float32)
    deltas = (coefs[:, None] * scale * u[None, :]).repeat_interleave(n, dim=0)  # [coefs * questions, hidden]
    requests = [Request(q) for _ in setup.coefs for q in setup.questions]
    out = generate(
        rt,
        requests,
        cfg.generation,
        steering=SteeringSpec(layer, deltas, s.positions),
        cache=cache,
        seed=cfg.seed,
        desc=f"sweep layer {layer}",
    )
    return [out[i * n : (i + 1) * n] for i in range(len(setup.coefs))]


def projections(
    rt: Runtime,
    cache: Cache,
    answers: list[Answer],
    layer: int,
    direction: torch.Tensor,
    max_batch: int | None = None,
) -> list[float | None]:
    """Each answer's response-averaged activation at ``layer`` (read unsteered) projected on ``direction``.

    Args:
        rt: the model.
        cache: memo store (namespace 'projection').
        answers: generated answers (their prompt text and token ids are re-read).
        layer: hidden_states row to read.
        direction: [hidden] unit vector.
        max_batch: rows per forward pass (None: from memory, ``generation.batch_rows``).

    Returns:
        One projection per answer; None for an empty answer (it has no response tokens).
    """
    return projections_many(rt, cache, answers, layer, direction.reshape(1, -1), max_batch)[0]


def projections_many(
    rt: Runtime,
    cache: Cache,
    answers: list[Answer],
    layer: int,
    directions: torch.Tensor,
    max_batch: int | None = None,
) -> list[list[float | None]]:
    """``projections`` on several directions [k, hidden] at once: [k][answers], one forward per answer."""
    keys = [[_projection_key(rt, a, layer, d) for a in answers] for d in directions]
    values: dict[str, float] = {}
    todo: dict[str, Answer] = {}  # answers missing at least one direction, by their first key
    for i, answer in enumerate(answers):
        if not answer.ids or digest(keys[0][i]) in todo:
            continue
        for per_direction in keys:
            kd = digest(per_direction[i])
            hit = values.get(kd, cache.get("projection", per_direction[i], _number))
            if hit is None:
                todo[digest(keys[0][i])] = answer
                break
            values[kd] = float(hit)
    if todo:
        rows = [Pair("", "", a.text, a.prompt, tuple(a.ids)) for a in todo.values()]
        acts, _ = record_activations(rt, rows, max_batch, desc="projections")
        proj = acts["response_avg"][:, layer] @ directions.float().T  # [rows, k]
        for answer, row in zip(todo.values(), proj.tolist(), strict=True):
            for d, value in zip(directions, row, strict=True):
                key = _projection_key(rt, answer, layer, d)
                values[digest(key)] = value
                cache.set("projection", key, value)
    return [[values.get(digest(k)) for k in per_direction] for per_direction in keys]


def _projection_key(rt: Runtime, answer: Answer, layer: int, direction: torch.Tensor) -> dict[str, Any]:
    """Everything a projection depends on: model, dtype, the exact tokens, layer and direction."""
    return {
        "v": PROJECTION_VERSION,
        "model": rt.fingerprint,
        "dtype": str(rt.model.dtype),
        "prompt": answer.prompt,
        "ids": digest(answer.ids),
        "layer": layer,
        "direction": vector_digest(direction),
    }


def _keys(answers: list[Answer]) -> list[str]:
    return [digest([a.prompt, a.ids]) for a in answers]


def _judge(
    judge: Judge, cache: Cache, trait: Trait, rows: list[tuple[str, Answer]]
) -> dict[str, dict[str, float | None]]:
    """{answer key: {'trait': score, 'coherence': score}} for (question, answer) rows, one judge call."""
    can_trait = "trait" in judge.kinds
    unique = dict(zip(_keys([a for _, a in rows]), rows, strict=True))
    queries: list[Query] = []
    for question, answer in unique.values():
        if can_trait:
            queries.append(Query("trait", question, answer.text, rubric=trait.eval_prompt, trait=trait.name))
        queries.append(Query("coherence", question, answer.text))
    verdicts = iter(judge.judge(queries, cache))
    out = {}
    for key in unique:
        trait_score = next(verdicts).score if can_trait else None
        out[key] = {"trait": trait_score, "coherence": next(verdicts).score}
    return out


def _summary(
    cfg: Config,
    rt: Runtime,
    setup: SweepSetup,
    judge: Judge,
    base: list[Answer],
    cells: dict[int, list[list[Answer]]],
    proj: dict[str, float | None],
    scores: dict[str, dict[str, float | None]],
) -> dict[str, Any]:
    base_keys = _keys(base)
    grid = []
    for layer, per_coef in cells.items():
        for coef, answers in zip(setup.coefs, per_coef, strict=True):
            keys = _keys(answers)
            deltas = [_diff(proj[k], proj[b]) for k, b in zip(keys, base_keys, strict=True)]
            grid.append(
                {
                    "layer": layer,
                    "coef": coef,
                    "trait_score": _mean([scores[k]["trait"] for k in keys]),
                    "coherence": _mean([scores[k]["coherence"] for k in keys]),
                    "projection_delta": _mean(deltas),
                    "answers": [a.text for a in answers],
                }
            )
    can_trait = "trait" in judge.kinds
    return {
        "trait": setup.trait.name,
        "model_id": rt.model_id,
        "fingerprint": setup.vectors.meta.get("fingerprint"),
        "vector_method": cfg.steering.vector_method,
        "summary": cfg.steering.summary,
        "positions": cfg.steering.positions,
        "layers": setup.layers,
        "coefs": setup.coefs,
        "coef_unit": "alpha: coef * the layer's mean residual norm * unit trait vector",
        "read_layer": setup.read_layer,
        "questions": setup.questions,
        "judge": judge.backend,
        "trait_score_supported": can_trait,
        "unsteered": {
            "trait_score": _mean([scores[k]["trait"] for k in base_keys]),
            "coherence": _mean([scores[k]["coherence"] for k in base_keys]),
            "projection": _mean([proj[k] for k in base_keys]),
            "answers": [a.text for a in base],
        },
        "cells": grid,
        "config_digest": cfg.digest("model", "generation", "steering", "judge", "sweep", "seed"),
        "version": __version__,
    }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _mean(values: list[float | None]) -> dict[str, Any]:
    """Mean over present values, with how many were present and missing (never imputed)."""
    present = [v for v in values if v is not None]
    return {
        "mean": float(np.mean(present)) if present else None,
        "n": len(present),
        "missing": len(values) - len(present),
    }


def _write(setup: SweepSetup, data: dict[str, Any]) -> None:
    atomic_write_json(setup.folder / "sweep.json", data)
    rows = [str(layer) for layer in data["layers"]]
    cols = [f"{c:g}" for c in data["coefs"]]
    cell = {(c["layer"], c["coef"]): c for c in data["cells"]}

    def matrix(metric: str) -> list[list[float | None]]:
        return [[cell[(layer, coef)][metric]["mean"] for coef in data["coefs"]] for layer in data["layers"]]

    name = data["trait"]
    if data["trait_score_supported"]:
        panel = (f"{name} trait score (0-100, {data['judge']} judge)", matrix("trait_score"), rows, cols)
    else:
        panel = (
            f"{name} projection delta at layer {data['read_layer']} (no judge)",
            matrix("projection_delta"),
            rows,
            cols,
        )
    title = f"{name}: trait expression over layers x coefficients"
    plot_heatmaps(
        setup.folder / "trait.png",
        [panel],
        title,
        "coef (alpha units)",
        "layer",
        symmetric=not data["trait_score_supported"],
    )
    coherence = (f"coherence (0-100, {data['judge']} judge)", matrix("coherence"), rows, cols)
    plot_heatmaps(
        setup.folder / "coherence.png", [coherence], f"{name}: coherence", "coef (alpha units)", "layer"
    )


def render_sweep(data: dict[str, Any]) -> str:
    """Markdown: one row per layer, each cell 'trait expression / coherence' at each coefficient."""
    expression = "trait_score" if data["trait_score_supported"] else "projection_delta"
    cell = {(c["layer"], c["coef"]): c for c in data["cells"]}
    rows = []
    for layer in data["layers"]:
        row: list[Any] = [layer]
        for coef in data["coefs"]:
            c = cell[(layer, coef)]
            row.append(f"{fmt_number(c[expression]['mean'])} / {fmt_number(c['coherence']['mean'], 0)}")
        rows.append(row)
    base = data["unsteered"]
    what = (
        "trait score (0-100)"
        if data["trait_score_supported"]
        else f"projection delta at layer {data['read_layer']}"
    )
    head = (
        f"# Sweep of {data['trait']} ({data['judge']} judge, {len(data['questions'])} questions)\n\n"
        f"Cells: {what} / coherence (0-100). Unsteered: trait score "
        f"{fmt_number(base['trait_score']['mean'])}, "
        f"coherence {fmt_number(base['coherence']['mean'], 0)}.\n\n"
    )
    return head + markdown_table(["layer \\ coef", *(f"{c:g}" for c in data["coefs"])], rows)


def _number(value: Any) -> bool:
    """A cached projection: a plain number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
