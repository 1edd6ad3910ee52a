"""Judging every method's held-out answers, and summarising per-prompt scores with statistics.

Metrics: ``persona_fit`` (1-5, each answer against the ``base`` answer to the same prompt, as the
optimiser judges), ``coherence`` (0-100) and ``trait:<T>`` (0-100, the trait's own eval prompt).
A metric a judge cannot score at all is *unsupported* and reported as n/a; a verdict that failed
is *missing* and counted. Neither is ever replaced by a number.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from persona_steering.cache import Cache
from persona_steering.config import EvaluateConfig
from persona_steering.evaluate.stats import bootstrap_interval, sign_flip_test, spearman
from persona_steering.judges import Judge, Query
from persona_steering.judges.base import Kind
from persona_steering.traits import Persona, Trait

FIT: Kind = "persona_fit"
COHERENCE: Kind = "coherence"
REFERENCES = ("base", "prompt")
"""Every method is tested, paired over prompts, against each of these that was evaluated."""


@dataclass
class JudgeScores:
    """One judge's per-prompt scores: values[method][metric][prompt] (None = no verdict)."""

    judge: str
    values: dict[str, dict[str, list[float | None]]]
    unsupported: list[str] = field(default_factory=list)


def metric_names(traits: list[Trait]) -> list[str]:
    """Metric keys in table order."""
    return [FIT, COHERENCE, *(f"trait:{t.name}" for t in traits)]


def score_answers(
    judge: Judge,
    cache: Cache,
    persona: Persona,
    traits: list[Trait],
    prompts: list[str],
    answers: dict[str, list[str]],
) -> JudgeScores:
    """Every metric for every method's answers, in one batched (and memoised) judge call.

    Args:
        judge: the judge.
        cache: verdict memo store.
        persona: whose fit is judged.
        traits: traits whose eval prompts score trait expression.
        prompts: the held-out prompts, in answer order.
        answers: method -> one answer per prompt; must hold 'base' (the persona-fit reference).
    """
    trait_list = traits if "trait" in judge.kinds else []
    queries: list[Query] = []
    slots: list[tuple[str, str, int]] = []  # (method, metric, prompt index) of each query
    base = answers["base"]
    for method, texts in answers.items():
        for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
            queries.append(
                Query(
                    FIT,
                    prompt,
                    text,
                    baseline=base[i],
                    rubric=persona.judge_prompt,
                    samples=tuple(persona.samples),
                )
            )
            slots.append((method, FIT, i))
            queries.append(Query(COHERENCE, prompt, text))
            slots.append((method, COHERENCE, i))
            for trait in trait_list:
                queries.append(Query("trait", prompt, text, rubric=trait.eval_prompt, trait=trait.name))
                slots.append((method, f"trait:{trait.name}", i))
    verdicts = judge.judge(queries, cache)
    metrics = metric_names(traits)
    values: dict[str, dict[str, list[float | None]]] = {
        m: {k: [None] * len(prompts) for k in metrics} for m in answers
    }
    for (method, metric, i), verdict in zip(slots, verdicts, strict=True):
        values[method][metric][i] = verdict.score
    skipped = [f"trait:{t.name}" for t in traits] if "trait" not in judge.kinds else []
    return JudgeScores(judge.backend, values, skipped)


def summarise(scores: JudgeScores, ev: EvaluateConfig, seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method and metric: mean, bootstrap interval, missing count and paired tests.

    Returns:
        {method: {metric: {mean, low, high, n, missing, supported, per_prompt, vs_base, vs_prompt}}}
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for method, metrics in scores.values.items():
        out[method] = {}
        for metric, vals in metrics.items():
            supported = metric not in scores.unsupported
            entry: dict[str, Any] = {"supported": supported, "per_prompt": vals}
            entry["missing"] = sum(v is None for v in vals) if supported else 0
            interval = bootstrap_interval(vals, ev.bootstrap, ev.confidence, seed) if supported else None
            entry.update(
                mean=interval.mean if interval else None,
                low=interval.low if interval else None,
                high=interval.high if interval else None,
                n=interval.n if interval else 0,
            )
            for ref in REFERENCES:
                test = None
                if supported and ref in scores.values and ref != method:
                    test = sign_flip_test(vals, scores.values[ref][metric], ev.permutations, seed)
                entry[f"vs_{ref}"] = (
                    None
                    if test is None
                    else {"diff": test.diff, "p": test.p, "n": test.n, "exact": test.exact}
                )
            out[method][metric] = entry
    return out


def agreement(all_scores: list[JudgeScores]) -> dict[str, dict[str, dict[str, Any]]]:
    """Spearman correlation of per-prompt persona fit between every pair of judges, per method.

    Returns:
        {"<judge a>~<judge b>": {method: {"rho": float | None, "n": pairs}}}
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for a, b in itertools.combinations(all_scores, 2):
        pair: dict[str, dict[str, Any]] = {}
        for method in a.values:
            rho, n = spearman(a.values[method][FIT], b.values[method][FIT])
            pair[method] = {"rho": rho, "n": n}
        out[f"{a.judge}~{b.judge}"] = pair
    return out
