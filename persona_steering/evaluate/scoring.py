"""Judging every method's held-out answers, and summarising per-prompt scores with statistics.

Each method answers every held-out prompt several times: once with the generation settings
(greedy) and ``evaluate.samples`` times sampled. Every answer is scored; the unit of the statistics
is the prompt, whose value is the mean over its answers, so tests against a reference stay paired
over prompts.

Metrics: ``persona_fit`` (1-5, the judge's joint score; each answer against the greedy ``base``
answer to the same prompt, as the optimiser judges), its parts ``style``, ``relevance`` and
``fluency`` (0-1, from the verdict's ``meta["parts"]``), ``loop_rate`` (share of answers in which a
word 4-gram occurs 3 or more times, ``style.loops``; from the text, no judge), ``echo_rate`` (share
of answers that repeat the question instead of answering it, ``style.echoes``; no judge), ``coherence``
(0-100) and ``trait:<T>`` (0-100, the trait's own eval prompt). A metric a judge cannot score at
all is *unsupported* and reported as n/a; a verdict that failed is *missing* and counted. Neither
is ever replaced by a number.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from persona_steering.cache import Cache
from persona_steering.config import EvaluateConfig
from persona_steering.contrast import FitContext
from persona_steering.evaluate.stats import bootstrap_interval, holm, sign_flip_test, spearman
from persona_steering.judges import Judge, Query, Verdict
from persona_steering.judges.base import Kind
from persona_steering.style import echoes, loops
from persona_steering.traits import Persona, Trait

FIT: Kind = "persona_fit"
COHERENCE: Kind = "coherence"
PARTS = ("style", "relevance", "fluency")
"""The parts of a persona-fit verdict, each in [0, 1], read from ``Verdict.meta["parts"]``."""
LOOP = "loop_rate"
ECHO = "echo_rate"
DERIVED = (*PARTS, LOOP, ECHO)
"""Metrics without verdicts of their own: a missing part is already counted as a missing persona fit."""
REFERENCES = ("base", "prompt")
"""Every method is tested, paired over prompts, against each of these that was evaluated."""

Table = dict[str, dict[str, list[float | None]]]  # [method][metric][prompt]
AnswerTable = dict[str, dict[str, list[list[float | None]]]]  # [method][metric][answer][prompt]


@dataclass
class JudgeScores:
    """One judge's scores: values[method][metric][prompt], the mean over that prompt's answers
    (None = no verdict for any of them), and per_answer[method][metric][answer][prompt]."""

    judge: str
    values: Table
    per_answer: AnswerTable = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)


def metric_names(traits: list[Trait]) -> list[str]:
    """Metric keys in table order."""
    return [FIT, *PARTS, LOOP, ECHO, COHERENCE, *(f"trait:{t.name}" for t in traits)]


def answer_queries(
    judge: Judge, traits: list[Trait], fit: FitContext, prompt: str, text: str, base: str
) -> list[tuple[str, Query]]:
    """(metric, query) for every verdict one answer to ``prompt`` gets from ``judge``: its persona fit
    against the greedy ``base`` answer to the same prompt, its coherence, and each trait it can score."""
    out: list[tuple[str, Query]] = [
        (FIT, fit.query(prompt, text, base)),
        (COHERENCE, Query(COHERENCE, prompt, text)),
    ]
    if "trait" in judge.kinds:
        out += [
            (f"trait:{t.name}", Query("trait", prompt, text, rubric=t.eval_prompt, trait=t.name))
            for t in traits
        ]
    return out


def score_answers(
    judge: Judge,
    cache: Cache,
    persona: Persona,
    traits: list[Trait],
    prompts: list[str],
    answers: dict[str, list[list[str]]],
    fit: FitContext,
) -> JudgeScores:
    """Every metric for every answer of every method, in one batched (and memoised) judge call.

    Args:
        judge: the judge.
        cache: verdict memo store.
        persona: whose fit is judged.
        traits: traits whose eval prompts score trait expression.
        prompts: the held-out prompts, in answer order.
        answers: method -> answer sets [answer][prompt], set 0 greedy; must hold 'base', whose greedy
            answers are the persona-fit reference of every answer.
        fit: what the persona's voice is judged against (``contrast.fit_context``).
    """
    queries: list[Query] = []
    slots: list[tuple[str, str, int, int]] = []  # (method, metric, answer, prompt index) of each query
    base = answers["base"][0]
    for method, j, texts in ((m, j, t) for m, sets in answers.items() for j, t in enumerate(sets)):
        for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
            for metric, query in answer_queries(judge, traits, fit, prompt, text, base[i]):
                queries.append(query)
                slots.append((method, metric, j, i))
    verdicts = judge.judge(queries, cache)
    metrics = metric_names(traits)
    per_answer: AnswerTable = {
        m: {k: [[None] * len(prompts) for _ in sets] for k in metrics} for m, sets in answers.items()
    }
    scored = with_parts = 0
    for (method, metric, j, i), verdict in zip(slots, verdicts, strict=True):
        per_answer[method][metric][j][i] = verdict.score
        if metric == FIT:
            parts = fit_parts(verdict)
            scored += verdict.score is not None
            with_parts += parts is not None
            for name in PARTS:
                per_answer[method][name][j][i] = None if parts is None else parts[name]
    for method, sets in answers.items():
        per_answer[method][LOOP] = [[float(loops(t)) for t in texts] for texts in sets]
        per_answer[method][ECHO] = [
            [float(echoes(p, t)) for p, t in zip(prompts, texts, strict=True)] for texts in sets
        ]
    unsupported = [f"trait:{t.name}" for t in traits] if "trait" not in judge.kinds else []
    if scored and not with_parts:  # a judge (or cache) that does not split its verdicts: n/a, not zero
        unsupported = [*PARTS, *unsupported]
    values = {m: {k: prompt_means(v) for k, v in per.items()} for m, per in per_answer.items()}
    return JudgeScores(judge.backend, values, per_answer, unsupported)


def fit_parts(verdict: Verdict) -> dict[str, float] | None:
    """A persona-fit verdict's parts {style, relevance, fluency}; None without a score or all parts."""
    parts = verdict.meta.get("parts")
    if verdict.score is None or not isinstance(parts, dict):
        return None
    out = {}
    for name in PARTS:
        value = parts.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        out[name] = float(value)
    return out


def prompt_means(per_answer: list[list[float | None]]) -> list[float | None]:
    """Per prompt, the mean over its answers that have a value; None where none has."""
    out: list[float | None] = []
    for column in zip(*per_answer, strict=True):
        present = [v for v in column if v is not None]
        out.append(float(np.mean(present)) if present else None)
    return out


def missing_verdicts(entries: dict[str, dict[str, Any]]) -> int:
    """Failed verdicts behind one method's summary entries (derived metrics not counted twice)."""
    return sum(e["missing"] for metric, e in entries.items() if metric not in DERIVED)


def summarise(scores: JudgeScores, ev: EvaluateConfig, seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method and metric: mean, bootstrap interval, missing count and paired tests, whose
    p-values are also Holm-corrected across the methods of each (metric, reference) family.

    Returns:
        {method: {metric: {mean, low, high, n, missing, supported, per_prompt, per_answer,
        vs_base, vs_prompt}}}; ``missing`` counts answers without a value.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for method, metrics in scores.values.items():
        out[method] = {}
        for metric, vals in metrics.items():
            supported = metric not in scores.unsupported
            answers = scores.per_answer.get(method, {}).get(metric, [vals])
            entry: dict[str, Any] = {"supported": supported, "per_prompt": vals, "per_answer": answers}
            entry["missing"] = sum(v is None for row in answers for v in row) if supported else 0
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
    _correct(out)
    return out


def _correct(out: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Add ``p_holm`` to every test: Holm over the methods tested on one metric against one reference."""
    metrics = {metric for per in out.values() for metric in per}
    for metric, ref in itertools.product(metrics, REFERENCES):
        tests = [e[f"vs_{ref}"] for per in out.values() if (e := per.get(metric)) and e[f"vs_{ref}"]]
        for test, adjusted in zip(tests, holm([t["p"] for t in tests]), strict=True):
            test["p_holm"] = adjusted


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
