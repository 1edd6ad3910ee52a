"""The ``interference`` stage: is the trait basis linear and independent?

The grid, per basis (``interference.bases``: the trait directions as extracted, and their
orthogonalisation): each trait alone at every strength (alpha units: ``s * scale * u_i``), and
every pair of traits at ``+-pair_strength`` each (four sign combinations), on the first held-out
questions of every trait plus the first conversational held-out prompts. Every answer is scored on
all five traits by each available scorer, named in the output:

- ``classifier``: the offline pole classifiers (``trait_scorer.py``), 0-100, with held-out accuracy;
- ``projection``: the answer read back unsteered, its response-averaged activation at the read
  layer projected on each trait's unit vector (``evaluate.sweep.projections_many``), activation
  units;
- ``judge``: with ``judge.backend`` openai or local, the 0-100 LLM trait judge.

A cell's effect on trait j is the mean over prompts of (score of the steered answer - score of the
unsteered answer). From the effects (``analyse``): the leakage matrix (slope of trait j's effect per
unit strength of trait i over the single-trait cells and 0, divided by trait i's on-target slope;
diagonal 1), its off-diagonal against the cosine of the steered direction with trait j's vector,
linearity (R^2 of the on-target effect against strength, where it saturates, where the loop rate
or judged coherence drops) and additivity per pair (measured effect against the sum of the two
single effects: R^2 over the 4 sign combinations x all traits, and the interaction, the mean
excess of measured over summed on the two steered traits).

Generations, projections, classifier scores and verdicts are memoised per row, so a re-run only
computes what is missing. Outputs in ``<out_dir>/<model-slug>/``: interference.json,
interference.md, leakage.png, leakage_cosine.png, additivity.png.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persona_steering import __version__
from persona_steering.basis import TraitBasis, load_basis
from persona_steering.cache import Cache, atomic_write_json, atomic_write_text
from persona_steering.config import Config
from persona_steering.evaluate.core import json_safe
from persona_steering.evaluate.sweep import projections_many
from persona_steering.generation import Answer, Request, generate
from persona_steering.interference_report import render_interference, write_plots
from persona_steering.judges import Query, build_judge
from persona_steering.layers import normalize_layer
from persona_steering.runtime import Runtime, identify, load_runtime
from persona_steering.store import VectorFileError
from persona_steering.style import loops
from persona_steering.trait_scorer import DESCRIPTION, SCORER, fit_trait_scorer
from persona_steering.traits import Trait, load_prompts, load_traits

LLM_JUDGES = ("openai", "local")
Cell = tuple[float, ...]  # the weight of each trait, in alpha units


@dataclass
class InterferenceSetup:
    """The checked inputs of an interference run."""

    traits: list[Trait]
    prompts: list[str]
    singles: list[float]  # strengths of the single-trait cells
    cells: list[Cell]
    read_layer: int
    slug: str
    fingerprint: str
    folder: Path


def run_interference(
    cfg: Config, rt: Runtime | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Steer the grid in every configured basis, score every answer, analyse and write.

    Args:
        cfg: the configuration (``interference``, ``steering``, ``traits``, ``judge``).
        rt: an already loaded model (loaded from ``cfg.model`` when None).
        log: where progress lines go.

    Returns:
        The data written to ``interference.json``.
    """
    setup = prepare_interference(cfg)
    bases = {kind: _basis(cfg, setup, kind, cfg.steering.layer) for kind in cfg.interference.bases}
    rt = rt or load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
    if rt.fingerprint != setup.fingerprint:
        raise VectorFileError("the loaded model is not the one the trait vectors were extracted from")
    gen = replace(
        cfg.generation, max_new_tokens=cfg.interference.max_new_tokens or cfg.generation.max_new_tokens
    )
    with Cache(cfg.cache_dir) as cache:
        scorer = fit_trait_scorer(rt, cfg, setup.traits, cache)
        log(f"trait classifiers: held-out accuracy {_accuracies(scorer.report())}")
        log(f"{len(setup.cells)} cells x {len(setup.prompts)} prompts in each of {len(bases)} bases")
        base = generate(rt, [Request(p) for p in setup.prompts], gen, cache=cache, seed=cfg.seed)
        answers = {kind: _steered(rt, cfg, gen, setup, basis, cache) for kind, basis in bases.items()}
        everything = base + [a for per_basis in answers.values() for a in per_basis]
        scores = _score(rt, cfg, setup, cache, scorer, everything)
    n = len(base)
    base_loop = float(np.mean([loops(a.text) for a in base]))
    data: dict[str, Any] = {
        "model_id": rt.model_id,
        "fingerprint": setup.fingerprint,
        "traits": [t.name for t in setup.traits],
        "layer": next(iter(bases.values())).layer,
        "read_layer": setup.read_layer,
        "strengths": setup.singles,
        "pair_strength": cfg.interference.pair_strength,
        "strength_unit": "alpha: strength * the layer's mean residual norm * unit direction",
        "prompts": setup.prompts,
        "max_new_tokens": gen.max_new_tokens,
        "scorers": {name: s["description"] for name, s in scores.items()},
        "unsteered_loop_rate": base_loop,
        "classifier_report": scorer.report(),
        "bases": {},
        "config_digest": cfg.digest(
            "model", "generation", "steering", "judge", "interference", "traits", "seed"
        ),
        "version": __version__,
    }
    raw = _basis(cfg, setup, "traits", cfg.steering.layer).directions
    for i, (kind, basis) in enumerate(bases.items()):
        rows = slice(n + i * len(setup.cells) * n, n + (i + 1) * len(setup.cells) * n)
        cosines = (basis.directions @ raw.T).tolist()  # [steered axis i, trait j]
        data["bases"][kind] = _basis_summary(setup, scores, n, rows, cosines, answers[kind], base_loop)
    data = json_safe(data)
    _write(setup, data)
    log(
        f"wrote {setup.folder}/interference.json, interference.md, leakage.png, leakage_cosine.png, "
        "additivity.png"
    )
    return data


def prepare_interference(cfg: Config) -> InterferenceSetup:
    """Check traits, prompts and vector files before anything is loaded or written."""
    inter = cfg.interference
    traits = load_traits(cfg.vectors.trait_dir, cfg.traits)
    questions = [q for t in traits for q in t.eval_questions[: inter.num_questions]]
    heldout = (
        load_prompts(cfg.optimize.prompts_file, "heldout")[: inter.num_prompts] if inter.num_prompts else []
    )
    prompts = list(dict.fromkeys(questions + heldout))
    singles = sorted(set(inter.strengths) | {inter.pair_strength, -inter.pair_strength})
    ident = identify(cfg.model)
    folder = Path(inter.out_dir) / ident.slug
    probe = load_basis(
        cfg.steering.trait_vector_dir,
        ident.slug,
        cfg.traits,
        cfg.steering.layer,
        cfg.steering.vector_method,
        cfg.steering.summary,
        fingerprint=ident.fingerprint,
    )
    read = normalize_layer(
        inter.read_layer if inter.read_layer is not None else cfg.steering.layer, probe.num_layers
    )
    return InterferenceSetup(
        traits,
        prompts,
        singles,
        grid(len(traits), singles, inter.pair_strength),
        read,
        ident.slug,
        ident.fingerprint,
        folder,
    )


def grid(k: int, singles: list[float], pair_strength: float) -> list[Cell]:
    """Every trait alone at each strength, then every pair at +-pair_strength each."""
    cells: list[Cell] = []
    for i in range(k):
        cells += [tuple(s if t == i else 0.0 for t in range(k)) for s in singles]
    for i, j in itertools.combinations(range(k), 2):
        for si, sj in itertools.product((pair_strength, -pair_strength), repeat=2):
            cells.append(tuple(si if t == i else sj if t == j else 0.0 for t in range(k)))
    return cells


def _basis(cfg: Config, setup: InterferenceSetup, kind: str, layer: int) -> TraitBasis:
    s = cfg.steering
    return load_basis(
        s.trait_vector_dir,
        setup.slug,
        cfg.traits,
        layer,
        s.vector_method,
        s.summary,
        fingerprint=setup.fingerprint,
        kind=kind,
    )


def _steered(
    rt: Runtime, cfg: Config, gen: Any, setup: InterferenceSetup, basis: TraitBasis, cache: Cache
) -> list[Answer]:
    """Answers [cell][prompt], flattened, from one batched generate call per basis."""
    n = len(setup.prompts)
    weights = torch.tensor(setup.cells, dtype=torch.float32)  # [cells, k]
    requests = [Request(p) for _ in setup.cells for p in setup.prompts]
    return generate(
        rt,
        requests,
        gen,
        steering=basis.spec(weights, 1.0, cfg.steering.positions).repeat(n),  # [cells * prompts] rows
        cache=cache,
        seed=cfg.seed,
        desc=f"interference ({basis.kind})",
    )


def _score(
    rt: Runtime, cfg: Config, setup: InterferenceSetup, cache: Cache, scorer: Any, answers: list[Answer]
) -> dict[str, dict[str, Any]]:
    """{scorer: {'description', 'values': [answers, traits] array (nan = no score)}} and 'quality'."""
    out: dict[str, dict[str, Any]] = {}
    out[SCORER] = {
        "description": DESCRIPTION,
        "values": np.array(scorer.score([a.text for a in answers], cache), dtype=float),
    }
    directions = _basis(cfg, setup, "traits", setup.read_layer).directions
    cols = projections_many(rt, cache, answers, setup.read_layer, directions, cfg.generation.max_batch)
    out["projection"] = {
        "description": f"activation projection: the answer read back unsteered, response-averaged at layer "
        f"{setup.read_layer}, projected on each trait's unit vector (activation units)",
        "values": np.array([[np.nan if v is None else v for v in col] for col in cols], dtype=float).T,
    }
    if cfg.judge.backend in LLM_JUDGES:
        judge = build_judge(cfg.judge, rt, cfg.cache_dir)
        asked = [setup.prompts[r % len(setup.prompts)] for r in range(len(answers))]  # rows cycle prompts
        queries = [
            Query("trait", q, a.text, rubric=t.eval_prompt, trait=t.name)
            for q, a in zip(asked, answers, strict=True)
            for t in setup.traits
        ]
        verdicts = judge.judge(queries, cache)
        values = np.array([np.nan if v.score is None else v.score for v in verdicts], dtype=float)
        out["judge"] = {
            "description": f"{cfg.judge.backend} LLM trait judge ({cfg.judge.model}), 0-100",
            "values": values.reshape(len(answers), len(setup.traits)),
        }
    return out


def _basis_summary(
    setup: InterferenceSetup,
    scores: dict[str, dict[str, Any]],
    n: int,
    rows: slice,
    cosines: list[list[float]],
    answers: list[Answer],
    base_loop: float,
) -> dict[str, Any]:
    """Effects per cell and scorer, and their analysis, for one basis."""
    loop = np.array([float(loops(a.text)) for a in answers]).reshape(len(setup.cells), n)  # [cells, prompts]
    summary: dict[str, Any] = {
        "cosines": cosines,
        "loop_rate": {str(list(c)): float(r) for c, r in zip(setup.cells, loop.mean(1), strict=True)},
        "scorers": {},
    }
    for name, s in scores.items():
        values = s["values"]
        base, steered = values[:n], values[rows].reshape(len(setup.cells), n, -1)  # [cells, prompts, k]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a cell none of whose answers has a score
            effects = {c: np.nanmean(steered[i] - base, axis=0) for i, c in enumerate(setup.cells)}
        summary["scorers"][name] = analyse(
            effects, setup.singles, loop.mean(1).tolist(), setup.cells, base_loop
        )
    summary["answers"] = {
        str(list(c)): [a.text for a in answers[i * n : (i + 1) * n]] for i, c in enumerate(setup.cells)
    }
    return summary


def analyse(
    effects: dict[Cell, np.ndarray],
    singles: list[float],
    loop_rates: list[float],
    cells: list[Cell],
    base_loop: float,
    max_loop_increase: float = 0.05,
) -> dict[str, Any]:
    """Leakage, linearity and additivity from the effects [k] of every cell (pure).

    Args:
        effects: {cell (weight per trait): mean score change of each trait [k]}.
        singles: the strengths of the single-trait cells.
        loop_rates: each cell's loop rate, in the order of ``cells``.
        cells: every cell of the grid.
        base_loop: the unsteered answers' loop rate.
        max_loop_increase: the loop rate above base at which the text counts as broken.
    """
    k = len(cells[0])
    xs = np.array([0.0, *singles])
    slopes = np.full((k, k), np.nan)
    linearity = []
    loop_of = dict(zip(cells, loop_rates, strict=True))
    for i in range(k):
        ys = np.array([np.zeros(k), *[effects[_one(k, i, s)] for s in singles]])  # [1 + strengths, k]
        for j in range(k):
            slopes[i, j] = _slope(xs, ys[:, j])
        linearity.append(
            {
                "r2": _r2_line(xs, ys[:, i]),
                "on_target": dict(zip([f"{x:g}" for x in xs], ys[:, i].tolist(), strict=True)),
                "saturates_at": _saturation(singles, {s: float(effects[_one(k, i, s)][i]) for s in singles}),
                "loop_rate": {f"{s:g}": loop_of[_one(k, i, s)] for s in singles},
                "breaks_at": _breaks(
                    singles, {s: loop_of[_one(k, i, s)] for s in singles}, base_loop + max_loop_increase
                ),
            }
        )
    diag = np.diag(slopes)
    with np.errstate(invalid="ignore", divide="ignore"):
        leakage = slopes / diag[:, None]
    leakage[~np.isfinite(leakage)] = np.nan
    pairs = additivity(effects, cells)
    return {
        "slopes": slopes.tolist(),
        "leakage": leakage.tolist(),
        "linearity": linearity,
        "additivity": pairs,
        "additivity_overall": _pooled(pairs),
    }


def _pooled(pairs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Every pair's points together: R^2 of measured against summed, and the least-squares slope
    (1 = additive; below 1 = the pair does less than the sum of its parts)."""
    measured = np.array([v for a in pairs for row in a["measured"] for v in row], dtype=float)
    summed = np.array([v for a in pairs for row in a["summed"] for v in row], dtype=float)
    ok = np.isfinite(measured) & np.isfinite(summed)
    if ok.sum() < 3:
        return {"r2": None, "slope": None}
    return {"r2": _r2(measured[ok], summed[ok]), "slope": _slope(summed[ok], measured[ok])}


def additivity(effects: dict[Cell, np.ndarray], cells: list[Cell]) -> list[dict[str, Any]]:
    """Per pair: measured effects against the sum of the single effects over 4 sign combos x k traits."""
    k = len(cells[0])
    out = []
    pairs = [c for c in cells if sum(w != 0 for w in c) == 2]
    for i, j in itertools.combinations(range(k), 2):
        mine = [c for c in pairs if c[i] != 0 and c[j] != 0]
        if not mine:
            continue
        measured = np.array([effects[c] for c in mine])  # [combos, k]
        summed = np.array([effects[_one(k, i, c[i])] + effects[_one(k, j, c[j])] for c in mine])
        excess = measured - summed
        out.append(
            {
                "pair": [i, j],
                "r2": _r2(measured.ravel(), summed.ravel()),
                "interaction": float(np.nanmean(excess[:, [i, j]])),
                "residual_rms": float(np.sqrt(np.nanmean(excess**2))),
                "measured": measured.tolist(),
                "summed": summed.tolist(),
                "signs": [[c[i], c[j]] for c in mine],
            }
        )
    return out


def _one(k: int, i: int, s: float) -> Cell:
    return tuple(s if t == i else 0.0 for t in range(k))


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(x[ok], y[ok], 1)[0])


def _r2_line(x: np.ndarray, y: np.ndarray) -> float | None:
    ok = np.isfinite(y)
    if ok.sum() < 3:
        return None
    fit = np.polyval(np.polyfit(x[ok], y[ok], 1), x[ok])
    return _r2(y[ok], fit)


def _r2(y: np.ndarray, fit: np.ndarray) -> float | None:
    """1 - SS(y - fit) / SS(y - mean y); None without spread."""
    ok = np.isfinite(y) & np.isfinite(fit)
    y, fit = y[ok], fit[ok]
    total = float(((y - y.mean()) ** 2).sum()) if len(y) else 0.0
    if total <= 1e-12:
        return None
    return 1.0 - float(((y - fit) ** 2).sum()) / total


def _saturation(singles: list[float], on_target: dict[float, float]) -> dict[str, float | None]:
    """Per sign, the first strength whose marginal gain falls below half the first step's slope."""
    out: dict[str, float | None] = {}
    for sign, name in ((1.0, "positive"), (-1.0, "negative")):
        xs = sorted((s for s in singles if s * sign > 0), key=abs)
        out[name] = None
        if not xs:
            continue
        first = on_target[xs[0]] / xs[0]
        prev_x, prev_y = xs[0], on_target[xs[0]]
        for x in xs[1:]:
            step = (on_target[x] - prev_y) / (x - prev_x)
            if not np.isfinite(step) or not np.isfinite(first) or step * np.sign(first) < 0.5 * abs(first):
                out[name] = x
                break
            prev_x, prev_y = x, on_target[x]
    return out


def _breaks(singles: list[float], loop_rate: dict[float, float], limit: float) -> dict[str, float | None]:
    """Per sign, the weakest strength whose loop rate exceeds ``limit`` (None: none does)."""
    out: dict[str, float | None] = {}
    for sign, name in ((1.0, "positive"), (-1.0, "negative")):
        over = [s for s in sorted(singles, key=abs) if s * sign > 0 and loop_rate[s] > limit]
        out[name] = over[0] if over else None
    return out


def _accuracies(report: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{t} {r['accuracy']:.2f}" for t, r in report.items())


def _write(setup: InterferenceSetup, data: dict[str, Any]) -> None:
    atomic_write_json(setup.folder / "interference.json", data)
    atomic_write_text(setup.folder / "interference.md", render_interference(data))
    write_plots(setup.folder, data)
