"""Measurable style features of a speaker's text, and a prose profile written from them.

Pure functions on strings: no model, no I/O. Every feature is a rate a reader can recount by hand
(``FEATURE_DEFINITIONS``): formality from contractions and slang, self- and other-reference,
questions, exclamations, sentence length, a small-lexicon sentiment and past-tense narration. The
lexicons are deliberately small and English-only; the numbers are descriptive, not a classifier.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher
from typing import Any

WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
SENTENCE = re.compile(r"[^.!?]*[A-Za-z][^.!?]*[.!?]*")
CONTRACTION_ENDINGS = ("n't", "'re", "'m", "'ll", "'ve", "'d")
S_CONTRACTIONS = frozenset("it's that's what's there's here's he's she's who's where's how's let's".split())
"""'s after these is a contraction; after a name it is usually a possessive, so it is not counted."""
SLANG = frozenset(
    "gonna wanna gotta kinda sorta dunno lemme gimme yeah yep yup nope nah ok okay lol omg dude guys hey "
    "ya y'all ain't awesome cool stuff totally super btw tbh haha wow yay ugh meh".split()
)
SELF = frozenset("i me my mine myself i'm i've i'd i'll".split())
OTHER = frozenset("you your yours yourself yourselves you're you've you'd you'll ya y'all".split())
POSITIVE = frozenset(
    "good great love loved lovely wonderful happy glad nice best beautiful enjoy enjoyed fun amazing "
    "awesome fantastic warm kind thanks thank grateful excited proud sweet laugh smile hope perfect "
    "brilliant delighted cheerful pleasure".split()
)
NEGATIVE = frozenset(
    "bad sad hate hated angry awful terrible worst hard tired sorry afraid scared worried worry lonely "
    "miss missed pain hurt cry cried wrong sick difficult upset annoying boring fear unfortunately".split()
)
IRREGULAR_PAST = frozenset(
    "was were had did went came saw said told took made got gave knew thought felt found left kept held "
    "brought bought sat stood ran met heard wrote began became grew lost paid sent spent taught caught "
    "fell forgot drove rode ate drank slept sang swam won wore broke chose spoke woke".split()
)
NOT_PAST = frozenset("bed red shed wed sled hundred sacred naked wicked kindred beloved".split())
INFORMAL_SATURATION = 0.06
"""Contractions plus slang per word at which ``formality`` reaches 0: chatty speech has 3-6% contractions
alone, careful writing almost none."""
FEATURE_DEFINITIONS = {
    "contraction_rate": "contractions (n't 're 'm 'll 've 'd, and 's after a pronoun) per word",
    "slang_rate": "words from a small slang lexicon per word",
    "formality": f"1 - (contractions + slang per word) / {INFORMAL_SATURATION}, clipped to [0, 1]",
    "self_reference_rate": "I / me / my / mine / myself (and I'm, I've ...) per word",
    "other_reference_rate": "you / your / yours / yourself (and you're ...) per word",
    "question_rate": "share of sentences ending in '?'",
    "exclamation_rate": "share of sentences ending in '!'",
    "mean_sentence_length": "words per sentence",
    "sentiment": "(positive - negative lexicon words) / (positive + negative), in [-1, 1]; 0 without either",
    "emotion_word_rate": "positive plus negative lexicon words per word",
    "past_tense_rate": "past-tense verbs (irregular list, or -ed) per word; -ed adjectives count too",
    "past_narrative_rate": "share of sentences with a past-tense verb",
}


def words(text: str) -> list[str]:
    """Lower-cased words, contractions kept whole ("don't", "i'm"); curly apostrophes normalised."""
    return WORD.findall(text.lower().replace("\u2019", "'"))


def style_features(texts: list[str]) -> dict[str, Any]:
    """Measurable style features over a speaker's turns (see ``FEATURE_DEFINITIONS``), rounded."""
    ws = [w for t in texts for w in words(t)]
    sentences = [s.strip() for t in texts for s in SENTENCE.findall(t) if words(s)]
    n, ns = max(len(ws), 1), max(len(sentences), 1)
    ends = [re.search(r"[.!?]*$", s).group() for s in sentences]  # type: ignore[union-attr]
    contractions = sum(w.endswith(CONTRACTION_ENDINGS) or w in S_CONTRACTIONS for w in ws)
    slang = [w for w in ws if w in SLANG]
    pos, neg = sum(w in POSITIVE for w in ws), sum(w in NEGATIVE for w in ws)
    rates = {
        "contraction_rate": contractions / n,
        "slang_rate": len(slang) / n,
        "formality": 1 - min(1.0, (contractions + len(slang)) / n / INFORMAL_SATURATION),
        "self_reference_rate": sum(w in SELF for w in ws) / n,
        "other_reference_rate": sum(w in OTHER for w in ws) / n,
        "question_rate": sum("?" in e for e in ends) / ns,
        "exclamation_rate": sum("!" in e for e in ends) / ns,
        "mean_sentence_length": len(ws) / ns,
        "sentiment": (pos - neg) / (pos + neg) if pos + neg else 0.0,
        "emotion_word_rate": (pos + neg) / n,
        "past_tense_rate": sum(map(_is_past, ws)) / n,
        "past_narrative_rate": sum(any(map(_is_past, words(s))) for s in sentences) / ns,
    }
    common = sorted(set(slang), key=lambda w: (-slang.count(w), w))[:5]
    return {
        "utterances": len(texts),
        "words": len(ws),
        "sentences": len(sentences),
        **{k: round(v, 4) for k, v in rates.items()},
        "slang_used": common,
        "definitions": FEATURE_DEFINITIONS,
    }


PROFILE_SENTENCES = {
    "formal": "{s} speaks formally: contractions are rare ({contraction_rate} of words), slang hardly used.",
    "conversational": "{s} speaks in an everyday register: some contractions ({contraction_rate} of words), "
    "little slang{slang}.",
    "casual": "{s} speaks casually: many contractions ({contraction_rate} of words), "
    "slang{slang} ({slang_rate}).",
    "self-focused": "{s} talks mostly about themself: I, me and my are {self_reference_rate} of their words, "
    "you and your {other_reference_rate}.",
    "other-focused": "{s} keeps the focus on the listener: you and your are {other_reference_rate} of their "
    "words, I, me and my {self_reference_rate}.",
    "balanced": "{s} talks about themself ({self_reference_rate} I/me/my) about as much as about "
    "the listener ({other_reference_rate} you/your).",
    "storytelling": "{s} often tells stories about the past: {past_narrative_rate} of sentences carry a "
    "past-tense verb.",
    "mixed in time": "{s} mixes past and present: {past_narrative_rate} of sentences carry a "
    "past-tense verb.",
    "present-focused": "{s} stays in the present: only {past_narrative_rate} of sentences carry a "
    "past-tense verb.",
}


def describe_style(speaker: str, f: dict[str, Any]) -> str:
    """A prose profile from the features: one sentence per dimension, then a one-line summary."""
    fields = {k: f"{100 * v:.0f}%" for k, v in f.items() if k.endswith("_rate")}
    fields["s"] = speaker
    fields["slang"] = f" such as {', '.join(repr(w) for w in f['slang_used'])}" if f["slang_used"] else ""
    register = _band(f["formality"], 0.4, 0.75, "casual", "conversational", "formal")
    me, you = f["self_reference_rate"], f["other_reference_rate"]
    focus = "self-focused" if me > 1.5 * you else "other-focused" if you > 1.5 * me else "balanced"
    asks = _band(
        f["question_rate"],
        0.08,
        0.3,
        "rarely asks questions",
        "sometimes asks questions",
        "asks many questions",
    )
    exclaims = _band(
        f["exclamation_rate"], 0.05, 0.25, "almost never exclaims", "exclaims now and then", "exclaims a lot"
    )
    length = _band(f["mean_sentence_length"], 8, 16, "short, clipped", "medium-length", "long, winding")
    tone = _band(f["sentiment"], -0.3, 0.3, "negative", "mixed", "positive")
    feeling = _band(f["emotion_word_rate"], 0.01, 0.04, "reserved", "moderately expressive", "expressive")
    narrative = _band(f["past_narrative_rate"], 0.15, 0.4, "present-focused", "mixed in time", "storytelling")
    lines = [
        f"{speaker}, as measured from {f['utterances']} turns ({f['words']} words) of conversation.",
        PROFILE_SENTENCES[register].format(**fields),
        PROFILE_SENTENCES[focus].format(**fields),
        f"{speaker} {asks} ({fields['question_rate']} of sentences) and {exclaims} "
        f"({fields['exclamation_rate']} of sentences end in '!').",
        f"{speaker} uses {length} sentences of {f['mean_sentence_length']:.1f} words on average.",
        f"The tone is {tone} (sentiment {f['sentiment']:+.2f}) and {feeling} in naming feelings.",
        PROFILE_SENTENCES[narrative].format(**fields),
        f"In short: {register}, {focus}, {narrative}, {tone} in tone, {length} sentences.",
    ]
    return "\n".join(lines)


def _band(value: float, low: float, high: float, below: str, between: str, above: str) -> str:
    """One of three labels: below ``low``, up to ``high``, above it."""
    return below if value < low else between if value <= high else above


def _is_past(word: str) -> bool:
    if word in IRREGULAR_PAST or word in ("agreed", "freed"):
        return True
    return len(word) > 3 and word.endswith("ed") and not word.endswith("eed") and word not in NOT_PAST


LOOP_N = 4
LOOP_TIMES = 3
"""An answer loops when some word ``LOOP_N``-gram occurs ``LOOP_TIMES`` or more times in it."""


def loops(text: str, n: int = LOOP_N, times: int = LOOP_TIMES) -> bool:
    """True when some word n-gram occurs at least ``times`` times: the loop-rate criterion."""
    ws = words(text)
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    counts: dict[tuple[str, ...], int] = {}
    for g in grams:
        counts[g] = counts.get(g, 0) + 1
    return any(c >= times for c in counts.values())


FRAGMENT_WORDS = 8
"""Fewer words than this add less than a sentence: an answer that short which stops without ending a
sentence was cut off (the offline judge's fragment gate), and an echo adds fewer than this."""
ECHO_MIN_WORDS = 3
ECHO_SHARE = 0.5


def echoes(question: str, answer: str) -> bool:
    """True when the answer repeats its question instead of answering it: the echo-rate criterion.

    It repeats, in order, a run of the question's words at least ``ECHO_MIN_WORDS`` long and covering
    at least ``ECHO_SHARE`` of the question, and adds fewer than ``FRAGMENT_WORDS`` words of its own.
    "Shall we order takeout tonight?" -> "Shall we order takeout tonight?" echoes, and so does "The
    next step: 'What should we name the new puppy?'". "The first job I ever had... That's a story
    worth telling. ..." repeats the question and goes on, so it does not.
    """
    q, a = words(question), words(answer)
    run = SequenceMatcher(None, q, a, autojunk=False).find_longest_match(0, len(q), 0, len(a)).size
    return run >= max(ECHO_MIN_WORDS, ECHO_SHARE * len(q)) and len(a) - run < FRAGMENT_WORDS


def repetition(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one, in [0, 1]: 0 for no repeats, near 1 for a loop.

    Over the whole answer, so a phrase looping anywhere counts; texts shorter than n words give 0.
    """
    ws = words(text)
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
