"""The offline judge's parts: learned style, relevance to the question, model fluency; and the joint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from persona_steering.cache import Cache
from persona_steering.judges import JudgeError
from persona_steering.judges.base import PARTS, Query, fit_verdict, joint_score
from persona_steering.judges.offline import (
    OfflineJudge,
    fit_style,
    is_fragment,
    mean_logprobs,
    shuffled,
)
from persona_steering.style import echoes, loops, repetition

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLES = tuple(
    f"i remember the rain on my walk home {w}, and my family was warm and happy."
    for w in ("today", "yesterday", "once", "tomorrow", "there", "here", "again", "so", "then")
)
CONTRAST = tuple(
    f"you should make a plan for the {w} and tell your friend about it."
    for w in ("weekend", "dinner", "trip", "work", "music", "book", "food", "weather", "day")
)
QUESTIONS = ("how was your day?", "what should i cook for dinner?", "do you like music?")


# --- the joint score -----------------------------------------------------------------------------


def test_joint_is_one_when_any_part_is_zero_and_five_when_all_are_one() -> None:
    for part in PARTS:
        assert joint_score({p: 0.0 if p == part else 1.0 for p in PARTS}) == 1.0
    assert joint_score(dict.fromkeys(PARTS, 1.0)) == 5.0


def test_joint_is_a_harmonic_mean_below_the_arithmetic_one() -> None:
    parts = {"style": 0.9, "relevance": 0.9, "fluency": 0.1}
    hm = 3 / (1 / 0.9 + 1 / 0.9 + 1 / 0.1)
    assert joint_score(parts) == pytest.approx(1 + 4 * hm)
    assert joint_score(parts) < 1 + 4 * (0.9 + 0.9 + 0.1) / 3
    # Symmetric in its parts.
    assert joint_score({"style": 0.1, "relevance": 0.9, "fluency": 0.9}) == pytest.approx(joint_score(parts))


def test_fit_verdict_clips_rounds_and_keeps_parts() -> None:
    v = fit_verdict({"style": 1.2, "relevance": 0.123456, "fluency": -1}, "why")
    assert v.meta["parts"] == {"style": 1.0, "relevance": 0.1235, "fluency": 0.0}
    assert v.score == 1.0 and v.detail.endswith("why")


# --- degenerate text detectors ----------------------------------------------------------------


def test_loops_and_repetition() -> None:
    loop = "I'm so glad you're here! " * 4
    assert loops(loop) and repetition(loop) > 0.6
    fluent = "It was a quiet day: I fixed the radio, read the paper and walked to the station."
    assert not loops(fluent) and repetition(fluent) == 0.0
    assert not loops("the the the")  # a 4-gram needs four words


def test_echo_means_the_question_repeated_with_less_than_a_sentence_added() -> None:
    q = "Shall we order takeout tonight?"
    assert echoes(q, q) and echoes(q, "shall we order takeout tonight")
    assert echoes("What should we name the new puppy?", 'The next step: "What should we name the new puppy?"')
    assert echoes("Remember the night we got lost driving home?", "The night we got lost driving home.")
    said_then_answered = "The first job I ever had... That's a story worth telling. It was back in 1985."
    assert not echoes("What was the first job you ever had?", said_then_answered)
    assert not echoes(q, "Shall we order takeout tonight? Yes, let's get the noodles from the corner place.")
    assert not echoes("Good afternoon. Is this seat taken?", "The seat is taken.")  # shared words, no run
    assert not echoes("Hello?", "Hello! How can I help you today?")  # a run under three words
    assert not echoes(q, "") and not echoes("", "Fine.")


def test_fragment_means_short_and_unfinished() -> None:
    assert is_fragment("Well now, the") and is_fragment("Oh, I")
    assert not is_fragment("Fine. I went home.")  # short but finished: the stoic voice
    assert not is_fragment("It was a long day and I walked home along the river before the")  # cut at length


def test_shuffle_is_deterministic_and_a_permutation() -> None:
    text = "the quick brown fox jumps over the lazy dog"
    assert shuffled(text) == shuffled(text) != text
    assert sorted(shuffled(text).split()) == sorted(text.split())


# --- the style classifier on planted features ---------------------------------------------------


def planted(n: int, sign: float, seed: int) -> torch.Tensor:
    """Features along a known direction (first coordinate) plus noise: [n, 20]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g, dtype=torch.float64)
    x[:, 0] += 3.0 * sign
    return x


def test_style_classifier_recovers_a_planted_voice() -> None:
    model = fit_style(planted(20, 1.0, 0), planted(40, -1.0, 1))
    assert model.report["auc"] > 0.95 and model.report["folds"] == 5
    new_pos, new_neg = planted(10, 1.0, 2), planted(10, -1.0, 3)
    pos, neg = model.style(new_pos), model.style(new_neg)
    # Style is the share of contrast texts out-scored: new persona texts beat nearly all of them,
    # new contrast-like texts sit in the middle of their own kind.
    assert min(pos) > 0.9 and 0.2 < sum(neg) / 10 < 0.8
    assert all(0.0 <= v <= 1.0 for v in pos + neg)


def test_style_classifier_without_signal_has_chance_auc() -> None:
    model = fit_style(planted(30, 0.0, 4), planted(30, 0.0, 5))
    assert 0.2 < model.report["auc"] < 0.8


def test_too_few_samples_is_a_clear_error() -> None:
    with pytest.raises(JudgeError, match="at least 8 samples"):
        fit_style(planted(5, 1.0, 0), planted(40, -1.0, 1))


# --- fluency from the model: parity with a one-row reference --------------------------------------


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_mean_logprobs_match_one_row_at_a_time(tiny_rt, shared_prompt: bool) -> None:
    from persona_steering.generation import Request, chat_text

    # Questions of different lengths (left padding), one asked three times (its prompt runs once and
    # is shared), texts of different lengths (right padding) and an empty one.
    pairs = [
        ("how was your day?", "i went home ."),
        ("do you like music and long walks by the sea on a sunday?", "yes , i love music and books ."),
        ("how was your day?", "it rained , so i read a book by the window all afternoon ."),
        ("how was your day?", "fine"),
        ("do you like music?", ""),
    ]
    batched = mean_logprobs(tiny_rt, pairs, shared_prompt)
    assert batched[-1] == -math.inf
    tok = tiny_rt.tokenizer
    for (question, text), value in zip(pairs[:-1], batched, strict=False):
        prompt = tok(chat_text(tok, Request(question)), add_special_tokens=False)["input_ids"]
        answer = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = tiny_rt.model(torch.tensor([prompt + answer])).logits[0]
        logp = logits.log_softmax(-1)
        ref = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(answer)) / len(answer)
        assert value == pytest.approx(ref, abs=1e-4)


def test_mean_logprobs_run_the_head_on_text_tokens_only_in_pieces(tiny_rt, monkeypatch) -> None:
    from persona_steering.judges import offline

    pairs = [
        ("how was your day?", "i went home ."),
        ("do you like music and long walks?", "yes , i love music and books and long walks ."),
        ("how was your day?", "it rained , so i read a book by the window all afternoon ."),
        ("do you like music?", ""),
    ]
    whole = mean_logprobs(tiny_rt, pairs)
    head = tiny_rt.model.get_output_embeddings()
    rows: list[int] = []
    hook = head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[:-1].numel()))
    try:
        monkeypatch.setattr(offline, "HEAD_TOKENS", 5)
        pieces = mean_logprobs(tiny_rt, pairs)
    finally:
        hook.remove()
    tokens = sum(len(tiny_rt.tokenizer(t, add_special_tokens=False)["input_ids"]) for _, t in pairs)
    # Every text token is projected once, five at a time; no prompt column and no padding is (the
    # forwards themselves call the head on no position).
    pieces_rows = [n for n in rows if n]
    assert sum(rows) == tokens and max(rows) == 5 and len(pieces_rows) == math.ceil(tokens / 5)
    assert pieces[-1] == -math.inf
    assert pieces[:-1] == pytest.approx(whole[:-1], abs=1e-6)


def test_no_logits_skips_the_head_and_keeps_the_cache(tiny_rt) -> None:
    from persona_steering.generation import kv_cache, no_logits

    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out = tiny_rt.model(input_ids=ids, use_cache=True, **no_logits(tiny_rt.model))
        full = tiny_rt.model(input_ids=ids, use_cache=True)
    assert out.logits.shape[:2] == (1, 0)
    [cache] = kv_cache(tiny_rt.model, out).values()
    [ref] = kv_cache(tiny_rt.model, full).values()
    assert cache.get_seq_length() == ref.get_seq_length() == 4


# --- the whole judge on the tiny model and the real MiniLM ----------------------------------------


@pytest.fixture()
def judge(tiny_rt) -> OfflineJudge:
    return OfflineJudge(tiny_rt)


def query(answer: str, baseline: str, question: str = QUESTIONS[0]) -> Query:
    return Query(
        "persona_fit",
        question,
        answer,
        baseline=baseline,
        samples=SAMPLES,
        contrast=CONTRAST,
        questions=QUESTIONS,
    )


def test_the_baseline_against_itself_is_fully_relevant_and_fluent(judge: OfflineJudge) -> None:
    base = "i had a good day at work and went home ."
    [v] = judge.judge([query(base, base)])
    assert v.meta["parts"]["relevance"] == 1.0 and v.meta["parts"]["fluency"] == 1.0


def test_every_persona_sample_is_fully_fluent_however_the_model_ranks_them(judge: OfflineJudge) -> None:
    # The samples are fluent by definition: the reference is the least fluent one, so none of them
    # falls below it (v4's median reference called half of them disfluent). The baseline is the
    # sample the model finds most fluent, so it does not lower the reference for them.
    judge.judge([query(s, SAMPLES[0]) for s in SAMPLES])  # fills the log-probabilities
    gains = {s: judge._gain(QUESTIONS[0], s) for s in SAMPLES}
    assert len(set(gains.values())) == len(SAMPLES)  # the model does rank them
    best = max(SAMPLES, key=gains.__getitem__)
    verdicts = judge.judge([query(s, best) for s in SAMPLES])
    assert [v.meta["parts"]["fluency"] for v in verdicts] == [round(1.0 - repetition(s), 4) for s in SAMPLES]


def test_loops_fragments_echoes_and_empty_answers_score_the_minimum_part(judge: OfflineJudge) -> None:
    base = "i had a good day at work and went home ."
    loop, frag, empty, echo = judge.judge(
        [
            query("i remember the rain . " * 5, base),
            query("i remember the", base),
            query("  ", base),
            query("How was your day?", base),  # the question, asked back
        ]
    )
    assert loop.meta["parts"]["fluency"] == 0.0 and loop.score == 1.0 and "loops" in loop.detail
    assert frag.meta["parts"]["fluency"] == 0.0 and "fragment" in frag.detail
    assert empty.score == 1.0
    assert echo.meta["parts"]["relevance"] == 0.0 and echo.score == 1.0 and "echoes" in echo.detail


def test_persona_voice_scores_more_style_than_the_contrast_voice(judge: OfflineJudge) -> None:
    base = "you should make a plan for the day ."
    voice, plain = judge.judge(
        [query("i remember my walk home in the rain , and my family was happy .", base), query(base, base)]
    )
    assert voice.meta["parts"]["style"] > plain.meta["parts"]["style"]
    assert judge.style_report(SAMPLES, CONTRAST)["samples"] == len(SAMPLES)


def test_verdicts_and_their_parts_come_back_from_the_cache(judge: OfflineJudge, tmp_path: Path) -> None:
    q = query("i remember the rain on my walk home .", "i had a good day .")
    with Cache(tmp_path / "cache") as cache:
        [fresh] = judge.judge([q], cache)
        [cached] = judge.judge([q], cache)
    assert cached.meta["cached"] and cached.meta["parts"] == fresh.meta["parts"]
    assert cached.score == fresh.score


def test_a_new_judge_runs_the_model_only_on_texts_the_cache_has_not_seen(
    judge: OfflineJudge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later process (a new judge on the same cache) reads the persona samples' and the baseline's
    log-probabilities instead of computing them again, and reaches the verdict an uncached judge does."""
    import persona_steering.judges.offline as offline

    computed: list[tuple[str, str]] = []
    real = offline.mean_logprobs

    def counting(rt, pairs):
        computed.extend(pairs)
        return real(rt, pairs)

    monkeypatch.setattr(offline, "mean_logprobs", counting)
    base = "i had a good day ."
    first = query("i remember the rain on my walk home .", base)
    second = query("my family was warm and happy today .", base)
    with Cache(tmp_path / "cache") as cache:
        OfflineJudge(tiny_rt := judge.runtime, judge.embedder).judge([first], cache)
        assert len(computed) == 2 * (2 + len(SAMPLES))  # answer, baseline, samples; each shuffled too
        computed.clear()
        [stored] = OfflineJudge(tiny_rt, judge.embedder).judge([second], cache)
        assert cache.count("logprob") == 2 * (3 + len(SAMPLES))
    assert sorted(computed) == sorted(
        [(second.question, second.answer), (second.question, shuffled(second.answer))]
    )
    [fresh] = OfflineJudge(tiny_rt, judge.embedder).judge([second])
    assert stored.meta["parts"] == pytest.approx(fresh.meta["parts"], abs=1e-3)
    assert stored.score == pytest.approx(fresh.score, abs=1e-2)


def test_missing_contrast_is_no_verdict(judge: OfflineJudge) -> None:
    q = Query("persona_fit", QUESTIONS[0], "hi", baseline="hello", samples=SAMPLES)
    assert judge.judge([q])[0].score is None


def test_a_verdict_of_the_model_at_another_precision_is_not_reused(
    judge: OfflineJudge, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """bf16 gives other log-probabilities, so another fluency and verdict: its own cache entries."""
    from persona_steering.config import ModelConfig
    from persona_steering.runtime import load_runtime

    bf16 = load_runtime(
        ModelConfig(name=str(tiny_model_dir), accelerator="cpu", precision="bf16-true"),
        cache_dir=tiny_model_dir / "cache",
    )
    assert bf16.fingerprint == judge.runtime.fingerprint  # the same weights file
    q = query("i remember the rain on my walk home .", "i had a good day .")
    with Cache(tmp_path / "cache") as cache:
        [fp32] = judge.judge([q], cache)
        [again] = OfflineJudge(bf16, judge.embedder).judge([q], cache)
        assert cache.count("verdict") == 2 and not again.meta.get("cached")
        [hit] = OfflineJudge(bf16, judge.embedder).judge([q], cache)
    assert hit.meta.get("cached") and hit.score == again.score
    assert "precision" not in judge.identity()  # float32 keys as before the field existed
    assert fp32.score is not None and again.score is not None
