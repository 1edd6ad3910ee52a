"""The judge interface: queries, verdicts, versioned prompt templates, and memoised scoring."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from persona_steering.cache import Cache, canonical_json, digest

Kind = Literal["persona_fit", "trait", "coherence"]

# Bump when any template below changes: it is part of every verdict's cache key.
TEMPLATE_VERSION = "2026-12-07.1"

# Score range of each kind of judgement.
SCALES: dict[str, tuple[int, int]] = {"persona_fit": (1, 5), "trait": (0, 100), "coherence": (0, 100)}

PERSONA_FIT_TEMPLATE = """You judge one part of how well a candidate answer fits a target persona.

Persona description:
{rubric}

The user said:
{question}

Answer {first_label}:
{first}

Answer {second_label}:
{second}

Answer {candidate_label} is the candidate; the other answer is a reference written without the
persona, shown for comparison only. {part_question}
Reply with a single digit from 1 to 5 and nothing else."""

FIT_PART_QUESTIONS = {
    "style": "STYLE: how much does the candidate sound like the persona above (its voice, register, "
    "focus, warmth, emotional tone)? Judge the voice only, not correctness. "
    "1 = nothing like the persona, 3 = somewhat, 5 = unmistakably the persona.",
    "relevance": "RELEVANCE: does the candidate answer or respond to what the user said? Judge "
    "relevance only, not the voice. 1 = ignores it, only repeats it back, or talks about something "
    "else, 3 = partly, 5 = directly responds to it.",
    "fluency": "FLUENCY: is the candidate well-formed language? Judge fluency only. 1 = word salad, "
    "endless repetition or a broken fragment, 3 = understandable but awkward or repetitive, "
    "5 = fluent and natural (a reply cut off at the end by a length limit is fine).",
}

COHERENCE_TEMPLATE = """You judge the coherence of an answer, not its style or opinions.

Question:
{question}

Answer:
{answer}

Rate from 0 to 100 how coherent the answer is: 0 = gibberish, endless repetition or unrelated to
the question; 50 = understandable but rambling or partly broken; 100 = fluent, well-formed and on
topic. Reply with a single integer between 0 and 100 and nothing else."""


PARTS = ("style", "relevance", "fluency")
"""The three parts of every persona-fit verdict, each in [0, 1]."""


def joint_score(parts: dict[str, float]) -> float:
    """The 1-5 persona-fit score of three parts in [0, 1]: ``1 + 4 * harmonic mean``.

    A harmonic mean (as AxBench combines concept, instruction and fluency) is low when any part
    is low: a fluent answer in the persona's voice that ignores the question scores low, and so
    does an on-topic loop. Any part at 0 gives 1.
    """
    values = [min(1.0, max(0.0, float(parts[k]))) for k in PARTS]
    if min(values) <= 0.0:
        return 1.0
    return 1.0 + 4.0 * len(values) / sum(1.0 / v for v in values)


def fit_verdict(parts: dict[str, float], detail: str = "", **meta: Any) -> Verdict:
    """A persona-fit verdict from its three parts (rounded, so cached and fresh scores agree)."""
    clean = {k: round(min(1.0, max(0.0, float(parts[k]))), DECIMALS) for k in PARTS}
    score = round(joint_score(clean), DECIMALS)
    text = " ".join(f"{k} {v:.2f}" for k, v in clean.items())
    return Verdict(score, f"{text}{'; ' + detail if detail else ''}", {"parts": clean, **meta})


DECIMALS = 4
"""Scores are rounded: batch composition moves embeddings and logits by ~1e-7, which must not decide
a cached score; 1e-4 is far below any difference that matters."""


def precision_key(runtime: Any) -> dict[str, str]:
    """The judging model's precision for a verdict's cache key: other numerics, other log-probabilities.
    Float32 is left out, so that verdicts stored before the key had it still count."""
    precision = str(runtime.precision)
    return {} if precision == "32-true" else {"precision": precision}


class JudgeError(RuntimeError):
    """A judge cannot work at all (no key, key rejected, quota spent, model missing).

    Raised instead of returning ``Verdict(None, ...)`` when every further call would fail the same
    way. The message says what to fix and never contains a secret.
    """


@dataclass(frozen=True)
class Query:
    """One thing to judge. Fields that a kind does not use stay empty.

    persona_fit: rubric = the persona's judge prompt, baseline = the unsteered answer,
    samples = the persona's own utterances, contrast = texts not in the persona's voice (other
    personas' samples, the model's unsteered answers), questions = the pool of prompts among which
    an answer must identify its own question (the offline judges use these three).
    trait: rubric = the trait's eval prompt with {question} and {answer} fields, trait = its name.
    coherence: only question and answer.
    """

    kind: Kind
    question: str
    answer: str
    baseline: str = ""
    rubric: str = ""
    trait: str = ""
    samples: tuple[str, ...] = ()
    contrast: tuple[str, ...] = ()
    questions: tuple[str, ...] = ()
    replicate: int = 0

    def key(self) -> dict[str, Any]:
        """Everything about the query that determines a verdict (samples by digest)."""
        return {
            "kind": self.kind,
            "question": self.question,
            "answer": self.answer,
            "baseline": self.baseline,
            "rubric": self.rubric,
            "trait": self.trait,
            "samples": digest(list(self.samples)) if self.samples else "",
            "contrast": digest(list(self.contrast)) if self.contrast else "",
            "questions": digest(list(self.questions)) if self.questions else "",
            "replicate": self.replicate,
        }


@dataclass(frozen=True)
class Verdict:
    """A judge's answer. ``score`` is None when the judge gave no usable verdict."""

    score: float | None
    detail: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.score is not None


def render_fit(query: Query) -> dict[tuple[str, int], str]:
    """The six prompts an LLM judge scores for one persona-fit verdict, by (part, order).

    Each part is asked once with the candidate shown first and once with it shown second, so a
    judge's preference for the first (or second) answer cancels in the mean.
    """
    out = {}
    for part, question in FIT_PART_QUESTIONS.items():
        for order in (0, 1):
            first, second = (query.answer, query.baseline) if order == 0 else (query.baseline, query.answer)
            out[(part, order)] = PERSONA_FIT_TEMPLATE.format(
                rubric=query.rubric,
                question=query.question,
                first_label="1",
                first=first,
                second_label="2",
                second=second,
                candidate_label="1" if order == 0 else "2",
                part_question=question,
            )
    return out


def combine_fit(scores: dict[tuple[str, int], float | None]) -> Verdict:
    """One persona-fit verdict from the 1-5 scores of ``render_fit``'s prompts; None if any is missing."""
    missing = [f"{p}/{o}" for (p, o), v in scores.items() if v is None]
    if missing:
        return Verdict(None, f"no verdict for {', '.join(missing)}")
    parts = {
        part: sum((scores[(part, o)] or 1.0) - 1.0 for o in (0, 1)) / 8.0 for part in PARTS
    }  # mean of the two orders, 1-5 mapped onto 0-1
    orders = {f"{p}/{o}": scores[(p, o)] for p, o in scores}
    return fit_verdict(parts, "mean over both answer orders", orders=orders)


def render(query: Query) -> str:
    """The judge prompt text for a trait or coherence query (persona fit: ``render_fit``)."""
    if query.kind == "persona_fit":
        raise ValueError("persona_fit is judged in parts: use render_fit")
    if query.kind == "trait":
        return query.rubric.format(question=query.question, answer=query.answer)
    if query.kind == "coherence":
        return COHERENCE_TEMPLATE.format(question=query.question, answer=query.answer)
    raise ValueError(f"unknown judgement kind {query.kind!r}")


def parse_score(text: str, kind: Kind) -> float | None:
    """The first number in ``text`` if it lies in the kind's scale, else None."""
    low, high = SCALES[kind]
    match = re.search(r"-?\d+(?:\.\d+)?", text or "")
    if match is None:
        return None
    value = float(match.group())
    return value if low <= value <= high else None


def weighted_score(probs: dict[str, float], kind: Kind, min_mass: float = 0.25) -> float | None:
    """Probability-weighted mean over tokens that are valid scores; None if their mass is small."""
    low, high = SCALES[kind]
    total = 0.0
    acc = 0.0
    for token, p in probs.items():
        tok = token.strip()
        if not tok.isdigit():
            continue
        value = int(tok)
        if low <= value <= high:
            total += p
            acc += p * value
    if total < min_mass:
        return None
    return acc / total


class Judge(ABC):
    """Base class: subclasses score a batch of queries; this class memoises the verdicts."""

    backend: str = "base"
    kinds: frozenset[str] = frozenset(SCALES)
    """Judgement kinds this backend can score; others always come back as no verdict."""
    uses_policy_model: bool = False
    """Whether verdicts run the policy model (then never while it generates steered: ``JudgeAhead``)."""
    computes_on_cpu: bool = False
    """Whether verdicts are computed on this machine's CPU (then judging ahead competes with a policy
    model on the CPU: ``judge.while_generating: auto`` leaves it off there)."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-safe description of what determines this judge's verdicts. Never a secret."""

    def scored_by(self, verdict: Verdict) -> dict[str, Any]:
        """The identity ``verdict`` is stored under: how it was actually scored (``identity()``
        unless a backend can score one query in more than one way)."""
        return self.identity()

    @abstractmethod
    def _judge(self, queries: list[Query]) -> list[Verdict]:
        """Score every query (uncached). A failed query gets ``Verdict(None, reason)``."""

    def _judge_each(self, queries: list[Query], done: Callable[[int, Verdict], None]) -> None:
        """Score every query, calling ``done(index, verdict)`` as each completes (in the calling
        thread). Backends with slow, independent calls override this so that a crash costs only
        the verdicts in flight."""
        for i, verdict in enumerate(self._judge(queries)):
            done(i, verdict)

    def judge(self, queries: list[Query], cache: Cache | None = None) -> list[Verdict]:
        """Verdicts for ``queries`` in order, reading and filling ``cache``; failures not stored.

        Each verdict is stored as it completes, not per batch. Identical queries (two candidates
        that wrote the same answer) are looked up and judged once.
        """
        ident = {**self.identity(), "template_version": TEMPLATE_VERSION}
        keys = [{"judge": ident, "query": q.key()} for q in queries]
        canon = [canonical_json(key) for key in keys]
        first: dict[str, int] = {}  # canonical key -> index of its first query
        for i, c in enumerate(canon):
            first.setdefault(c, i)
        out: dict[int, Verdict] = {}
        todo: list[int] = []
        for i in first.values():
            hit = cache.get("verdict", keys[i]) if cache else None
            if _usable(hit):
                assert hit is not None
                meta = {"cached": True, **({"parts": hit["parts"]} if "parts" in hit else {})}
                out[i] = Verdict(score=hit["score"], detail=hit.get("detail", ""), meta=meta)
            else:
                todo.append(i)

        def done(j: int, verdict: Verdict) -> None:
            i = todo[j]
            out[i] = verdict
            if cache is not None and verdict.score is not None:
                value = {"score": verdict.score, "detail": verdict.detail}
                if "parts" in verdict.meta:
                    value["parts"] = verdict.meta["parts"]
                scored_by = {**self.scored_by(verdict), "template_version": TEMPLATE_VERSION}
                cache.set("verdict", {"judge": scored_by, "query": queries[i].key()}, value)

        if todo:
            self._judge_each([queries[i] for i in todo], done)
        return [out.get(first[c], Verdict(None, "missing")) for c in canon]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity()})"


def _usable(hit: Any) -> bool:
    """A cached verdict of the shape ``judge`` writes; anything else (an edited row) is a miss."""
    return (
        isinstance(hit, dict)
        and isinstance(hit.get("score"), (int, float))
        and not isinstance(hit["score"], bool)
        and isinstance(hit.get("parts", {}), dict)
    )
