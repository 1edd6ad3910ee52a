"""The ``build-persona`` stage: a persona folder from one speaker's lines in recorded conversations.

Input format (``raw_conversations.json``): a JSON list of conversations, each a list of turns
``{"speaker": str, "text": str}`` in order, for example::

    [
      [{"speaker": "Walter", "text": "Well now, I remember the winter of sixty-two."},
       {"speaker": "Amy", "text": "Tell me about it!"}],
      [{"speaker": "Amy", "text": "How was your day?"},
       {"speaker": "Walter", "text": "Quiet. I fixed the porch step."}]
    ]

Everything is computed offline and deterministically from the chosen speaker's turns:

- ``persona_samples.json``: up to ``num_samples`` representative utterances, diverse in length (one
  from each length stratum) and content (within a stratum, the one whose words overlap least with
  those already chosen), in their original order.
- ``persona_features.json``: measurable style features over *all* the speaker's turns
  (``style.style_features``, where each is defined).
- ``persona_profile.txt``: a prose profile written from those features; ``final_judge_prompt.txt``:
  ``traits.build_judge_prompt(profile, samples)``; and a copy of the conversations file.

The folder is assembled beside the target and renamed into place, so a failure leaves no half
persona; an existing persona is replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_steering.cache import atomic_write_bytes, atomic_write_json, atomic_write_text
from persona_steering.config import Config, ConfigError, check_persona_id
from persona_steering.style import describe_style, style_features, words
from persona_steering.traits import DefinitionError, Persona, build_judge_prompt, load_persona

MIN_SAMPLE_WORDS = 4
"""Shorter turns ("Yes.", "Oh really?") say little about a voice; used only when nothing longer exists."""
STOPWORDS = frozenset(
    "a an the and or but so to of in on at for with is are was were be been it this that i you me my "
    "your we our he she they them his her their do did does have has had not no yes just very".split()
)


@dataclass(frozen=True)
class PersonaRequest:
    """Which speaker of which conversations file becomes which persona, and where."""

    conversations: str
    speaker: str
    persona_id: str
    persona_dir: str
    num_samples: int = 15
    overwrite: bool = False


def run_build_persona(request: PersonaRequest, log: Callable[[str], None] = print) -> Persona:
    """Build ``<persona_dir>/<persona_id>/`` from one speaker's turns.

    Args:
        request: the conversations file, speaker, persona id and folder, sample count, overwrite.
        log: where progress lines go.

    Returns:
        The persona as ``traits.load_persona`` reads it back.
    """
    target = _check(request)
    source = Path(request.conversations)
    raw = source.read_bytes()
    conversations = parse_conversations(source, raw)
    utterances = speaker_utterances(conversations, request.speaker, source)
    samples = select_samples(utterances, request.num_samples)
    features = style_features(utterances)
    profile = describe_style(request.speaker, features)
    features = {"speaker": request.speaker, "source": source.name, **features}
    files = {
        "persona_profile.txt": profile + "\n",
        "persona_samples.json": samples,
        "persona_features.json": features,
        "final_judge_prompt.txt": build_judge_prompt(profile, samples) + "\n",
        "raw_conversations.json": raw,
    }
    _write_folder(target, files, request.overwrite)
    log(f"wrote {target}/ ({len(samples)} samples from {len(utterances)} turns of {request.speaker})")
    return load_persona(request.persona_dir, request.persona_id)


def parse_conversations(path: Path, raw: bytes) -> list[list[dict[str, str]]]:
    """The conversations in the documented format; DefinitionError naming the first bad entry."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DefinitionError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list) or not data:
        raise DefinitionError(f"{path}: must be a non-empty JSON list of conversations")
    for c, conversation in enumerate(data):
        if not isinstance(conversation, list):
            raise DefinitionError(f"{path}: conversation [{c}] must be a list of turns")
        for t, turn in enumerate(conversation):
            if (
                not isinstance(turn, dict)
                or not isinstance(turn.get("speaker"), str)
                or not isinstance(turn.get("text"), str)
            ):
                raise DefinitionError(
                    f"{path}: turn [{c}][{t}] must be an object with string 'speaker' and 'text'"
                )
    return data


def speaker_utterances(conversations: list[list[dict[str, str]]], speaker: str, path: Path) -> list[str]:
    """The speaker's non-empty turns in order; an unknown speaker lists the known ones with counts."""
    counts: dict[str, int] = {}
    for conversation in conversations:
        for turn in conversation:
            counts[turn["speaker"]] = counts.get(turn["speaker"], 0) + 1
    if speaker not in counts:
        known = ", ".join(f"{name!r} ({n} turns)" for name, n in sorted(counts.items()))
        raise DefinitionError(f"{path}: no speaker {speaker!r}; speakers: {known}")
    texts = [" ".join(t["text"].split()) for c in conversations for t in c if t["speaker"] == speaker]
    texts = [t for t in texts if words(t)]
    if not texts:
        raise DefinitionError(f"{path}: speaker {speaker!r} never says a word")
    return texts


def select_samples(texts: list[str], n: int) -> list[str]:
    """Up to ``n`` distinct utterances, diverse in length and content, deterministically, in original order.

    The candidates (turns of at least ``MIN_SAMPLE_WORDS`` words, if there are enough of them) are
    ranked by length and cut into ``n`` strata of near-equal size; from each stratum, shortest
    first, the utterance is taken whose content words have the largest smallest Jaccard distance
    to those already taken (the one nearest the stratum's median length breaks a tie).
    """
    unique = list(dict.fromkeys(texts))
    long_enough = [t for t in unique if len(words(t)) >= MIN_SAMPLE_WORDS]
    pool = long_enough if len(long_enough) >= min(n, len(unique)) else unique
    if len(pool) <= n:
        return pool
    order = sorted(range(len(pool)), key=lambda i: (len(words(pool[i])), i))
    content = [_content_words(t) for t in pool]
    chosen: list[int] = []
    for k in range(n):
        stratum = order[k * len(pool) // n : (k + 1) * len(pool) // n]
        middle = (len(stratum) - 1) / 2

        def rank(j: int, stratum: list[int] = stratum, middle: float = middle) -> tuple[float, float, int]:
            i = stratum[j]
            spread = min((_jaccard_distance(content[i], content[c]) for c in chosen), default=1.0)
            return round(spread, 9), -abs(j - middle), -i

        chosen.append(stratum[max(range(len(stratum)), key=rank)])
    return [pool[i] for i in sorted(chosen)]


def _content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in words(text) if w not in STOPWORDS)


def _jaccard_distance(a: frozenset[str], b: frozenset[str]) -> float:
    union = a | b
    return 1.0 - len(a & b) / len(union) if union else 0.0


def _check(request: PersonaRequest) -> Path:
    """The target folder, after checking the id, the sample count and an existing persona."""
    if not request.conversations or not request.speaker or not request.persona_id:
        raise ConfigError("build-persona needs --conversations FILE, --speaker NAME and --persona-id ID")
    check_persona_id(request.persona_id, "--persona-id")
    if request.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {request.num_samples}")
    if not Path(request.conversations).is_file():
        raise DefinitionError(f"{request.conversations}: file not found")
    target = Path(request.persona_dir) / request.persona_id
    if target.exists() and not request.overwrite:
        raise ConfigError(f"persona {target} exists; pass --overwrite to replace it")
    return target


def _write_folder(target: Path, files: dict[str, Any], overwrite: bool) -> None:
    """Write every file into a temporary folder beside ``target``, then swap it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, content in files.items():
            if isinstance(content, bytes):
                atomic_write_bytes(tmp / name, content)
            elif isinstance(content, str):
                atomic_write_text(tmp / name, content)
            else:
                atomic_write_json(tmp / name, content)
        old = None
        if target.exists() and overwrite:
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_persona(cfg: Config, log: Callable[[str], None] = print) -> Persona:
    """The ``build-persona`` command: ``cfg.build_persona`` into ``optimize.persona_dir/persona_id``."""
    b = cfg.build_persona
    request = PersonaRequest(
        b.conversations or "",
        b.speaker or "",
        cfg.optimize.persona_id or "",
        cfg.optimize.persona_dir,
        num_samples=b.num_samples,
        overwrite=b.overwrite,
    )
    persona = run_build_persona(request, log)
    log(f"{persona.id}: {len(persona.samples)} samples\n\n{persona.profile}")
    return persona
