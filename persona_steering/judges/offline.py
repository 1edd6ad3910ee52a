"""The default judge: persona fit in three parts, learned and measured offline, no LLM and no key.

- **style**: a logistic-regression classifier of the persona's voice, trained per persona on its
  samples against a contrast set (``Query.contrast``: the other personas' samples and the model's
  own unsteered answers), on features that carry voice and not only topic: MiniLM sentence
  embeddings plus the rates ``style.style_features`` measures (contractions, slang, I/you,
  questions, exclamations, sentence length, sentiment, past tense). k-fold cross-validation over
  the same data gives its held-out AUC (``style_report``) and out-of-fold decision values for the
  contrast texts; an answer's style is the share of those contrast texts it sounds more like the
  persona than (a smoothed CDF), so 0.5 means "as persona-like as a typical non-persona text"
  and 1 means "beyond every one of them".
- **relevance**: ``embedding.relevance``, against the question that was asked; 0 for an answer that
  only echoes its question (v6).
- **fluency**: from the policy model itself, unsteered. ``gain(x)`` is the mean token
  log-probability of x as the answer to the question minus that of x with its words shuffled:
  how much the model thinks x's word order is language. The reference is the lower of the
  unsteered answer's gain and the least gain among the persona's own samples. The samples are fluent
  text in a voice the model would not use itself, which the model finds less predictable than its
  own words, so the reference must not be the model's own answer alone; and they are fluent by
  definition, so the reference is one that every one of them meets (v4 took their median, which
  called half of the persona's own samples disfluent). ``min(1, gain(answer) / reference)`` is
  1 for text as well-formed as either and near 0 for word salad, whatever its vocabulary. Times
  ``1 - repetition`` over the whole answer, because a loop is very plausible to the model that
  wrote it. Two gates set fluency to 0, both by definition of a degenerate answer: it loops (the
  loop-rate criterion, ``style.loops``), or it is a fragment (under 8 words with no sentence end).

The joint score is ``base.joint_score`` (harmonic mean, 1-5). Everything is deterministic.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from persona_steering.cache import Cache, digest
from persona_steering.generation import Request, chat_text, no_logits, shared_prefix
from persona_steering.judges import OFFLINE_VERSION
from persona_steering.judges.base import Judge, JudgeError, Query, Verdict, fit_verdict, precision_key
from persona_steering.judges.embedding import MODEL_NAME, Embedder, coherence_verdict, relevance
from persona_steering.runtime import Runtime
from persona_steering.style import (
    FRAGMENT_WORDS,
    LOOP_N,
    LOOP_TIMES,
    loops,
    repetition,
    style_features,
    words,
)

MIN_SAMPLES = 8
"""Fewer persona samples (or contrast texts) than this leave too little to learn a voice from."""
LOGPROB_BATCH = 16
"""Rows per log-probability forward pass."""
HEAD_TOKENS = 512
"""Text tokens per vocabulary projection in ``mean_logprobs``: one matmul for a batch's texts, in
pieces that bound the [tokens, vocab] float32 logits (100 MB for SmolLM2's 49152 words)."""
LOGPROB_VERSION = 1
"""Part of every stored log-probability's key: bump it when ``mean_logprobs`` computes another value."""
FOLDS = 5
L2 = 1.0
"""Ridge penalty on standardised features, per example; strong, because features outnumber texts."""
STYLE_FEATURES = (
    "contraction_rate",
    "slang_rate",
    "formality",
    "self_reference_rate",
    "other_reference_rate",
    "question_rate",
    "exclamation_rate",
    "mean_sentence_length",
    "sentiment",
    "emotion_word_rate",
    "past_tense_rate",
    "past_narrative_rate",
)


class OfflineJudge(Judge):
    """Three-part persona fit: a learned style classifier, relevance, and the policy model's fluency."""

    backend = "offline"
    uses_policy_model = True  # fluency is the policy model's own log-probability
    kinds = frozenset({"persona_fit", "coherence"})

    def __init__(
        self, runtime: Runtime, embedder: Embedder | None = None, batch_size: int = LOGPROB_BATCH
    ) -> None:
        """Args:
        runtime: the unsteered policy model, which scores fluency (no hook is active while judging).
        embedder: a shared MiniLM (loaded when None).
        batch_size: rows per log-probability forward pass.
        """
        self.runtime = runtime
        self.embedder = embedder or Embedder()
        self.batch_size = batch_size
        self._styles: dict[str, StyleModel] = {}
        self._logprobs: dict[tuple[str, str], float] = {}
        self._store: Cache | None = None  # the cache of the judge() call in progress

    def identity(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "version": OFFLINE_VERSION,
            "embedder": MODEL_NAME,
            "fluency_model": self.runtime.fingerprint,
            "folds": FOLDS,
            "l2": L2,
            **precision_key(self.runtime),
        }

    def style_report(self, samples: tuple[str, ...], contrast: tuple[str, ...]) -> dict[str, Any]:
        """Cross-validated quality of the persona's style classifier: AUC, folds, counts."""
        return self._style(samples, contrast).report

    def judge(self, queries: list[Query], cache: Cache | None = None) -> list[Verdict]:
        """``Judge.judge``, keeping the policy model's log-probabilities in ``cache`` too (namespace
        'logprob'): the persona samples' are the same for every answer to a question, and a later
        process (``evaluate`` after ``optimize``) reads them instead of running the model again."""
        self._store = cache
        try:
            return super().judge(queries, cache)
        finally:
            self._store = None

    def _judge(self, queries: list[Query]) -> list[Verdict]:
        fit = [q for q in queries if q.kind == "persona_fit" and q.samples]
        self._fill_logprobs(fit)
        return [self._verdict(q) for q in queries]

    def _verdict(self, query: Query) -> Verdict:
        if query.kind == "coherence":
            return coherence_verdict(query.answer)
        if query.kind == "trait":
            return Verdict(None, "the offline judge cannot score traits; use judge.backend=openai or local")
        if not query.samples or not query.contrast:
            return Verdict(None, "the offline judge needs Query.samples and Query.contrast for persona_fit")
        if not query.answer.strip():
            return fit_verdict({"style": 0.0, "relevance": 0.0, "fluency": 0.0}, "empty answer")
        model = self._style(query.samples, query.contrast)
        style = model.style(self._features([query.answer]))[0]
        rel, why = relevance(self.embedder, query)
        fluency, flu_why = self._fluency(query)
        parts = {"style": style, "relevance": rel, "fluency": fluency}
        return fit_verdict(parts, f"{why}; {flu_why}", style_auc=model.report["auc"])

    # -- style -------------------------------------------------------------------------------

    def _style(self, samples: tuple[str, ...], contrast: tuple[str, ...]) -> StyleModel:
        key = digest([list(samples), list(contrast)])
        if key not in self._styles:
            self._styles[key] = fit_style(self._features(list(samples)), self._features(list(contrast)))
        return self._styles[key]

    def _features(self, texts: list[str]) -> torch.Tensor:
        return text_features(self.embedder, texts)

    # -- fluency -----------------------------------------------------------------------------

    def _fluency(self, query: Query) -> tuple[float, str]:
        gain_a = self._gain(query.question, query.answer)
        gain_b = self._gain(query.question, query.baseline or query.answer)
        gain_s = min(self._gain(query.question, s) for s in query.samples)  # the least fluent sample's
        ref = min(gain_b, gain_s)
        order = 1.0 if gain_a >= ref else max(gain_a, 0.0) / ref if ref > 0 else 0.0
        rep = repetition(query.answer)
        why = (
            f"word-order gain {gain_a:.2f} vs reference {ref:.2f} (baseline {gain_b:.2f}, least sample "
            f"{gain_s:.2f}) nats/token, repetition {rep:.2f}"
        )
        if loops(query.answer):
            return 0.0, f"loops (a word {LOOP_N}-gram {LOOP_TIMES}+ times); {why}"
        if is_fragment(query.answer):
            return 0.0, f"a fragment (under {FRAGMENT_WORDS} words, no sentence end); {why}"
        return order * (1.0 - rep), why

    def _gain(self, question: str, text: str) -> float:
        return self._logprobs[(question, text)] - self._logprobs[(question, shuffled(text))]

    def _fill_logprobs(self, queries: list[Query]) -> None:
        """Mean token log-probabilities of every answer, baseline and their shuffles: from memory, then
        the cache, the rest batched through the model and stored."""
        pairs = []
        for q in queries:
            for text in (q.answer, q.baseline or q.answer, *q.samples):
                pairs += [(q.question, text), (q.question, shuffled(text))]
        # By question, so a batch shares its prompt's prefix, then by length, so it pads little.
        todo = sorted({p for p in pairs if p not in self._logprobs}, key=lambda p: (p[0], len(p[1]), p[1]))
        store = self._store
        if store is not None:
            for pair in todo:
                hit = store.get("logprob", self._logprob_key(pair), valid=_is_number)
                if hit is not None:
                    self._logprobs[pair] = float(hit)
            todo = [p for p in todo if p not in self._logprobs]
        with tqdm(total=len(todo), desc="fluency log-probs", disable=len(todo) < 64, leave=False) as bar:
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                for pair, value in zip(chunk, mean_logprobs(self.runtime, chunk), strict=True):
                    self._logprobs[pair] = value
                    if store is not None and math.isfinite(value):  # an empty text's -inf is not JSON
                        store.set("logprob", self._logprob_key(pair), value)
                bar.update(len(chunk))

    def _logprob_key(self, pair: tuple[str, str]) -> dict[str, Any]:
        """Everything a stored log-probability depends on: the model, its precision, the text pair."""
        rt = self.runtime
        return {
            "model": rt.fingerprint,
            "precision": rt.precision,
            "version": LOGPROB_VERSION,
            "question": pair[0],
            "text": pair[1],
        }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_logprobs(rt: Runtime, pairs: list[tuple[str, str]], shared_prompt: bool = True) -> list[float]:
    """Mean log p(token) of each text as the unsteered model's answer to its question (chat template).

    One batch: the prompts left-padded and the texts right-padded after them. The prompts but their
    last token run once per distinct question (``generation.shared_prefix``); then every row runs its
    last prompt token and its text, whose columns predict the text's tokens. ``shared_prompt=False``
    runs every row whole instead (what ``make bench`` compares with). An empty text gets -inf.
    """
    tok = rt.tokenizer
    rows = []
    for question, text in pairs:
        prompt = tok(chat_text(tok, Request(question)), add_special_tokens=False)["input_ids"]
        answer = tok(text, add_special_tokens=False)["input_ids"]
        rows.append((prompt, answer))
    prefix = max(len(p) for p, _ in rows) - 1  # prompt columns before the last prompt token
    width = prefix + 1 + max(len(a) for _, a in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)  # [n, width]
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        start = prefix + 1 - len(p)  # left padding: every prompt ends at column ``prefix``
        ids[i, start : prefix + 1 + len(a)] = torch.tensor(p + a)
        mask[i, start : prefix + 1 + len(a)] = 1
    ids, mask = ids.to(rt.device), mask.to(rt.device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    first = prefix if shared_prompt else 0  # the first column the rows' own forward runs
    with torch.inference_mode(), rt.autocast():
        past = {}
        if first:
            past = shared_prefix(rt, ids[:, :first], mask[:, :first], position_ids[:, :first])
        out = rt.model(
            input_ids=ids[:, first:],
            attention_mask=mask,
            position_ids=position_ids[:, first:],
            output_hidden_states=True,
            **no_logits(rt.model),  # the head runs below, on the text's columns only
            **past,
        )
        # The final norm's output (transformers puts it last) from the last prompt token on: [n, *, hidden].
        # Column j of a row predicts its text token j; those columns of every row, row after row: [T, hidden]
        hidden = out.hidden_states[-1][:, prefix - first :]
        lengths = torch.tensor([len(a) for _, a in rows], device=hidden.device)
        keep = torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]  # [n, *]
        hidden = hidden[keep]
        targets = torch.tensor([t for _, a in rows for t in a], dtype=torch.long, device=hidden.device)
        pieces = [
            _token_logprobs(rt.model, hidden[s : s + HEAD_TOKENS], targets[s : s + HEAD_TOKENS])
            for s in range(0, len(targets), HEAD_TOKENS)
        ]
        token_logp = torch.cat(pieces).cpu() if pieces else torch.zeros(0)
    result, start = [], 0
    for _, a in rows:
        result.append(float(token_logp[start : start + len(a)].mean()) if a else -math.inf)
        start += len(a)
    return result


def _token_logprobs(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each row of ``hidden`` [T, hidden] under the model's head: [T], float32."""
    logits = _capped(model, model.get_output_embeddings()(hidden)).float()  # [T, vocab]
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(-1)


def _capped(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Logit soft-capping where the model applies it after its head (Gemma 2 style)."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


def is_fragment(text: str) -> bool:
    """Fewer than ``FRAGMENT_WORDS`` words and no sentence end (. ! ? or a closing quote after one)."""
    return len(words(text)) < FRAGMENT_WORDS and not text.rstrip().rstrip("\"')\u201d").endswith(
        (".", "!", "?")
    )


def shuffled(text: str) -> str:
    """The text's words in a random order fixed by the text itself (deterministic word salad)."""
    ws = text.split()
    random.Random(digest(text)).shuffle(ws)
    return " ".join(ws)


def text_features(embedder: Embedder, texts: list[str]) -> torch.Tensor:
    """[len(texts), 384 + 12] float64: MiniLM embedding and style rates of each text."""
    emb = embedder.embed(texts).double()
    rates = torch.tensor(
        [[float(style_features([t])[k]) for k in STYLE_FEATURES] for t in texts], dtype=torch.float64
    ).reshape(len(texts), len(STYLE_FEATURES))
    return torch.cat([emb, rates], 1)


@dataclass
class StyleModel:
    """A fitted persona-voice classifier and the out-of-fold scores that calibrate it."""

    mean: torch.Tensor  # [d] feature standardisation
    std: torch.Tensor  # [d]
    weight: torch.Tensor  # [d]
    bias: float
    negatives: torch.Tensor  # [n_neg] out-of-fold decision values of the contrast texts
    bandwidth: float
    report: dict[str, Any]

    def decision(self, features: torch.Tensor) -> torch.Tensor:
        """Logit of 'in the persona's voice' per row, [n]."""
        return ((features - self.mean) / self.std) @ self.weight + self.bias

    def style(self, features: torch.Tensor) -> list[float]:
        """Smoothed share of contrast texts each row out-scores, in [0, 1]."""
        z = self.decision(features)  # [n]
        cdf = torch.special.ndtr((z[:, None] - self.negatives[None, :]) / self.bandwidth)  # [n, n_neg]
        return [float(v) for v in cdf.mean(1)]


def fit_style(pos: torch.Tensor, neg: torch.Tensor, folds: int = FOLDS) -> StyleModel:
    """Fit the classifier on all texts; k-fold (stratified, fixed order) for AUC and calibration.

    Args:
        pos: features of the persona's samples, [n_pos, d].
        neg: features of the contrast texts, [n_neg, d].

    Raises:
        JudgeError: too few samples or contrast texts to learn from.
    """
    if len(pos) < MIN_SAMPLES or len(neg) < MIN_SAMPLES:
        raise JudgeError(
            f"the offline judge learns a persona's voice from at least {MIN_SAMPLES} samples and "
            f"{MIN_SAMPLES} contrast texts; got {len(pos)} samples and {len(neg)} contrast texts "
            "(add utterances to persona_samples.json)"
        )
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    fold = torch.cat([torch.arange(len(pos)) % folds, torch.arange(len(neg)) % folds])
    oof = torch.empty(len(x), dtype=torch.float64)
    for k in range(folds):
        train, test = fold != k, fold == k
        model = _logistic(x[train], y[train])
        oof[test] = _decide(model, x[test])
    auc = _auc(oof[: len(pos)], oof[len(pos) :])
    # Balanced held-out accuracy: each class's share of out-of-fold decisions on its side of 0.
    accuracy = 0.5 * float((oof[: len(pos)] > 0).double().mean() + (oof[len(pos) :] <= 0).double().mean())
    mean, std, weight, bias = _logistic(x, y)
    negatives = oof[len(pos) :]
    # Silverman's rule: a smooth CDF, so nearby answers get nearby scores (CMA-ES sees a slope).
    bandwidth = max(1.06 * float(negatives.std()) * len(negatives) ** -0.2, 1e-6)
    report = {
        "auc": round(auc, 4),
        "accuracy": round(accuracy, 4),
        "folds": folds,
        "samples": len(pos),
        "contrast": len(neg),
    }
    return StyleModel(mean, std, weight, bias, negatives, bandwidth, report)


def _logistic(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Class-balanced ridge logistic regression on standardised features (L-BFGS, float64)."""
    mean = x.mean(0)
    std = x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w_pos = 0.5 / y.mean()
    w_neg = 0.5 / (1 - y.mean())
    sample_w = torch.where(y > 0, w_pos, w_neg)
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = z @ weight + bias
        loss = (
            sample_w * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        ).mean()
        loss = loss + L2 * (weight**2).sum() / len(y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return mean, std, weight.detach(), float(bias.detach())


def _decide(model: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float], x: torch.Tensor) -> torch.Tensor:
    mean, std, weight, bias = model
    return ((x - mean) / std) @ weight + bias


def _auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a positive out-scores a negative), ties counted half (Mann-Whitney)."""
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
