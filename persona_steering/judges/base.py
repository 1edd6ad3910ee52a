"""The judge interface: queries, verdicts, versioned prompt templates, and memoised scoring."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

from persona_steering.cache import Cache, canonical_json, digest

Kind = Literal["persona_fit", "trait", "coherence"]

# Bump when any template below changes: it is part of every verdict's cache key.
TEMPLATE_VERSION = "2026-11-23.1"

# Score range of each kind of judgement.
SCALES: dict[str, tuple[int, int]] = {"persona_fit": (1, 5), "trait": (0, 100), "coherence": (0, 100)}

PERSONA_FIT_TEMPLATE = """You judge how well an assistant's answer matches a target persona.

Persona description:
{rubric}

The user said:
{question}

Answer A (reference, written without the persona):
{baseline}

Answer B (candidate):
{answer}

Compared with answer A, how much better does answer B sound like the persona above (its voice,
register, focus, warmth and emotional tone), while still being a sensible reply?
1 = much worse than A, 2 = somewhat worse, 3 = about the same, 4 = somewhat better, 5 = much better.
Reply with a single digit from 1 to 5 and nothing else."""

COHERENCE_TEMPLATE = """You judge the coherence of an answer, not its style or opinions.

Question:
{question}

Answer:
{answer}

Rate from 0 to 100 how coherent the answer is: 0 = gibberish, endless repetition or unrelated to
the question; 50 = understandable but rambling or partly broken; 100 = fluent, well-formed and on
topic. Reply with a single integer between 0 and 100 and nothing else."""


class JudgeError(RuntimeError):
    """A judge cannot work at all (no key, key rejected, quota spent, model missing).

    Raised instead of returning ``Verdict(None, ...)`` when every further call would fail the same
    way. The message says what to fix and never contains a secret.
    """


@dataclass(frozen=True)
class Query:
    """One thing to judge. Fields that a kind does not use stay empty.

    persona_fit: rubric = the persona's judge prompt, baseline = the unsteered answer,
    samples = the persona's own utterances (used by the embedding judge).
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


def render(query: Query) -> str:
    """The judge prompt text for a query, as an LLM judge sees it."""
    if query.kind == "persona_fit":
        return PERSONA_FIT_TEMPLATE.format(
            rubric=query.rubric, question=query.question, baseline=query.baseline, answer=query.answer
        )
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

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-safe description of what determines this judge's verdicts. Never a secret."""

    @abstractmethod
    def _judge(self, queries: list[Query]) -> list[Verdict]:
        """Score every query (uncached). A failed query gets ``Verdict(None, reason)``."""

    def judge(self, queries: list[Query], cache: Cache | None = None) -> list[Verdict]:
        """Verdicts for ``queries`` in order, reading and filling ``cache``; failures not stored.

        Identical queries (two candidates that wrote the same answer) are looked up and judged once.
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
            if hit is not None:
                out[i] = Verdict(score=hit["score"], detail=hit.get("detail", ""), meta={"cached": True})
            else:
                todo.append(i)
        if todo:
            fresh = self._judge([queries[i] for i in todo])
            for i, verdict in zip(todo, fresh, strict=True):
                out[i] = verdict
                if cache is not None and verdict.score is not None:
                    cache.set("verdict", keys[i], {"score": verdict.score, "detail": verdict.detail})
        return [out.get(first[c], Verdict(None, "missing")) for c in canon]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity()})"
