"""Offline trait scores: per trait, a classifier of its two poles, trained on the answers ``vectors`` made.

For each trait the pos and neg answers that ``vectors`` generated under the trait's contrastive
system prompts (cached: re-reading them does no model work) are the two classes. Features are the
offline judge's: MiniLM sentence embeddings plus the ``style.py`` rates; the model is the offline
judge's class-balanced ridge logistic regression (``judges.offline.fit_style``), whose k-fold
out-of-fold decisions give the held-out accuracy and AUC reported with every score.

An answer's score on a trait is ``100 * P(positive pole)``, 0-100 like the LLM trait judge. No LLM.
Fitted classifiers and per-answer scores are cached (keys: the training texts, the answer text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from persona_steering.cache import Cache, digest
from persona_steering.config import Config
from persona_steering.extraction import trait_answers
from persona_steering.judges.embedding import MODEL_NAME, Embedder
from persona_steering.judges.offline import FOLDS, L2, fit_style, text_features
from persona_steering.runtime import Runtime
from persona_steering.traits import Trait

SCORER_VERSION = 1
SCORER = "classifier"
DESCRIPTION = (
    "offline pole classifier: 100 * P(positive pole), logistic regression on MiniLM embeddings and "
    "style features, trained on the pos/neg answers of `vectors`"
)


@dataclass
class PoleClassifier:
    """One trait's fitted classifier: standardisation, weights, and its held-out quality."""

    trait: str
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]
    weight: torch.Tensor  # [d]
    bias: float
    report: dict[str, Any]  # accuracy, auc (out-of-fold), folds, counts
    key: str  # digest of what it was trained on

    def scores(self, features: torch.Tensor) -> list[float]:
        """100 * P(positive pole) per row of ``features`` [n, d]."""
        z = ((features - self.mean) / self.std) @ self.weight + self.bias  # [n]
        return [100.0 * float(v) for v in torch.sigmoid(z)]

    def to_json(self) -> dict[str, Any]:
        return {
            "trait": self.trait,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "weight": self.weight.tolist(),
            "bias": self.bias,
            "report": self.report,
            "key": self.key,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PoleClassifier:
        t = {k: torch.tensor(data[k], dtype=torch.float64) for k in ("mean", "std", "weight")}
        return cls(
            data["trait"], t["mean"], t["std"], t["weight"], float(data["bias"]), data["report"], data["key"]
        )


class TraitScorer:
    """Scores answers on every trait with the pole classifiers; MiniLM loads only on a cache miss."""

    def __init__(self, classifiers: list[PoleClassifier], embedder: Embedder | None = None) -> None:
        self.classifiers = classifiers
        self._embedder = embedder

    @property
    def traits(self) -> list[str]:
        return [c.trait for c in self.classifiers]

    def report(self) -> dict[str, dict[str, Any]]:
        """{trait: held-out accuracy, AUC, counts} of each classifier."""
        return {c.trait: c.report for c in self.classifiers}

    def score(self, texts: list[str], cache: Cache | None = None) -> list[list[float]]:
        """[len(texts)][traits] scores, 0-100."""
        ident = [c.key for c in self.classifiers]
        out: dict[str, list[float]] = {}
        todo: list[str] = []
        for text in dict.fromkeys(texts):
            hit = cache.get("trait_score", _score_key(ident, text)) if cache is not None else None
            if isinstance(hit, list) and len(hit) == len(ident):
                out[text] = [float(v) for v in hit]
            else:
                todo.append(text)
        if todo:
            features = text_features(self.embedder, todo)
            per_trait = [c.scores(features) for c in self.classifiers]
            for n, text in enumerate(todo):
                out[text] = [col[n] for col in per_trait]
                if cache is not None:
                    cache.set("trait_score", _score_key(ident, text), out[text])
        return [out[t] for t in texts]

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder()
        return self._embedder


def fit_trait_scorer(rt: Runtime, cfg: Config, traits: list[Trait], cache: Cache | None) -> TraitScorer:
    """A pole classifier per trait, from the pos/neg answers ``vectors`` generated (cached).

    Args:
        rt: the model (only its cached answers are read when ``vectors`` ran with ``cfg``).
        cfg: ``generation``, ``vectors`` and ``seed`` as ``vectors`` ran with them.
        traits: the traits to score.
        cache: memo store for answers, fitted classifiers and scores.
    """
    answers = trait_answers(rt, cfg, traits, cache)
    scorer = TraitScorer([])
    for trait in traits:
        pos, neg = ([p.answer for p in side if p.answer.strip()] for side in answers[trait.name])
        key = {"v": SCORER_VERSION, "embedder": MODEL_NAME, "folds": FOLDS, "l2": L2, "pos": pos, "neg": neg}
        hit = cache.get("pole_classifier", key) if cache is not None else None
        if isinstance(hit, dict):
            scorer.classifiers.append(PoleClassifier.from_json(hit))
            continue
        model = fit_style(text_features(scorer.embedder, pos), text_features(scorer.embedder, neg))
        report = {k: v for k, v in model.report.items() if k not in ("samples", "contrast")}
        report |= {"pos": len(pos), "neg": len(neg)}
        clf = PoleClassifier(
            trait.name, model.mean, model.std, model.weight, model.bias, report, digest(key, 16)
        )
        if cache is not None and all(math.isfinite(v) for v in clf.weight.tolist()):
            cache.set("pole_classifier", key, clf.to_json())
        scorer.classifiers.append(clf)
    return scorer


def _score_key(classifiers: list[str], text: str) -> dict[str, Any]:
    return {"v": SCORER_VERSION, "classifiers": classifiers, "text": text}
