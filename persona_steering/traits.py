"""Trait, persona and prompt-set definitions: load, validate, digest.

A trait file (``configs/traits/<name>.yaml``) holds ``name``, ``title``, ``description``,
``pos_label``, ``neg_label``, ``instruction`` (a list of {pos, neg} system prompts),
``questions`` ({extract: [...], eval: [...]}) and ``eval_prompt`` (a 0-100 judge prompt with
``{question}`` and ``{answer}`` fields). A persona folder (``personas/<id>/``) holds
``persona_profile.txt`` and ``persona_samples.json`` (a JSON list of strings), optionally
``final_judge_prompt.txt``, ``persona_short_prompt.txt`` (a one-line style instruction, the
``prompt-short`` baseline's system prompt), ``persona_features.json`` and ``raw_conversations.json``.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from persona_steering.cache import digest


class DefinitionError(ValueError):
    """A trait, persona or prompt file is missing or malformed; the message names file and field."""


@dataclass(frozen=True)
class Trait:
    name: str
    title: str
    description: str
    pos_label: str
    neg_label: str
    instructions: list[tuple[str, str]]  # (pos, neg) system prompts
    extract_questions: list[str]
    eval_questions: list[str]
    eval_prompt: str
    path: str = ""

    def digest(self) -> str:
        """Digest of everything that shapes this trait's vectors and judgements."""
        return digest(
            [self.name, self.instructions, self.extract_questions, self.eval_questions, self.eval_prompt], 16
        )


@dataclass(frozen=True)
class Persona:
    id: str
    profile: str
    samples: list[str]
    judge_prompt: str
    features: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    short_prompt: str | None = None  # persona_short_prompt.txt: one line, None when absent

    def digest(self) -> str:
        # short_prompt is left out: only the prompt-short baseline reads it, and its generations are
        # keyed by the prompt text itself; including it would orphan every existing optimisation run.
        return digest([self.id, self.profile, self.samples, self.judge_prompt], 16)


def load_trait(path: str | Path) -> Trait:
    """Read and validate one trait file."""
    path = Path(path)
    data = _read_yaml(path)
    where = str(path)

    def need(key: str, kind: type) -> Any:
        if key not in data:
            raise DefinitionError(f"{where}: missing field '{key}'")
        if not isinstance(data[key], kind):
            raise DefinitionError(f"{where}: field '{key}' must be a {kind.__name__}")
        return data[key]

    name = str(need("name", str))
    if name != path.stem:
        raise DefinitionError(f"{where}: field 'name' is {name!r} but the file is named {path.stem!r}")
    pairs = need("instruction", list)
    instructions = []
    for i, pair in enumerate(pairs):
        if (
            not isinstance(pair, dict)
            or not isinstance(pair.get("pos"), str)
            or not isinstance(pair.get("neg"), str)
        ):
            raise DefinitionError(f"{where}: field 'instruction[{i}]' must have string 'pos' and 'neg'")
        instructions.append((pair["pos"].strip(), pair["neg"].strip()))
    if not instructions:
        raise DefinitionError(f"{where}: field 'instruction' needs at least one pos/neg pair")
    questions = need("questions", dict)
    sets = {}
    for part in ("extract", "eval"):
        items = questions.get(part)
        if (
            not isinstance(items, list)
            or not items
            or not all(isinstance(q, str) and q.strip() for q in items)
        ):
            raise DefinitionError(f"{where}: field 'questions.{part}' must be a non-empty list of strings")
        sets[part] = [q.strip() for q in items]
    eval_prompt = str(need("eval_prompt", str))
    fields = {f for _, f, _, _ in string.Formatter().parse(eval_prompt) if f is not None}
    if fields != {"question", "answer"}:
        raise DefinitionError(
            f"{where}: field 'eval_prompt' must use exactly the fields {{question}} and {{answer}}, "
            f"found {sorted(fields)}"
        )
    return Trait(
        name=name,
        title=str(data.get("title", name)),
        description=str(data.get("description", "")),
        pos_label=str(data.get("pos_label", "positive")),
        neg_label=str(data.get("neg_label", "negative")),
        instructions=instructions,
        extract_questions=sets["extract"],
        eval_questions=sets["eval"],
        eval_prompt=eval_prompt,
        path=where,
    )


def load_traits(trait_dir: str | Path, names: list[str]) -> list[Trait]:
    """The named traits from ``trait_dir``, in order; an unknown name lists the known ones."""
    folder = Path(trait_dir)
    known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    out = []
    for name in names:
        path = folder / f"{name}.yaml"
        if not path.is_file():
            raise DefinitionError(f"unknown trait {name!r}: no {path} (known: {', '.join(known) or 'none'})")
        out.append(load_trait(path))
    return out


def load_persona(persona_dir: str | Path, persona_id: str) -> Persona:
    """Read and validate ``<persona_dir>/<persona_id>/``; build the judge prompt when absent."""
    folder = Path(persona_dir) / persona_id
    if not folder.is_dir():
        root = Path(persona_dir)
        known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise DefinitionError(
            f"unknown persona {persona_id!r}: no folder {folder} (known: {', '.join(known) or 'none'})"
        )
    profile_path = folder / "persona_profile.txt"
    if not profile_path.is_file() or not profile_path.read_text().strip():
        raise DefinitionError(f"{profile_path}: missing or empty (a persona needs a free-text profile)")
    profile = profile_path.read_text().strip()
    samples_path = folder / "persona_samples.json"
    if not samples_path.is_file():
        raise DefinitionError(f"{samples_path}: missing (a persona needs a JSON list of its own utterances)")
    try:
        samples = json.loads(samples_path.read_text())
    except json.JSONDecodeError as exc:
        raise DefinitionError(f"{samples_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if (
        not isinstance(samples, list)
        or not samples
        or not all(isinstance(s, str) and s.strip() for s in samples)
    ):
        raise DefinitionError(f"{samples_path}: must be a non-empty JSON list of strings")
    features: dict[str, Any] = {}
    features_path = folder / "persona_features.json"
    if features_path.is_file():
        try:
            features = json.loads(features_path.read_text())
        except json.JSONDecodeError as exc:
            raise DefinitionError(f"{features_path}: not valid JSON ({exc.msg})") from None
    judge_path = folder / "final_judge_prompt.txt"
    if judge_path.is_file() and judge_path.read_text().strip():
        judge_prompt = judge_path.read_text().strip()
    else:
        judge_prompt = build_judge_prompt(profile, samples)
    return Persona(
        id=persona_id,
        profile=profile,
        samples=[s.strip() for s in samples],
        judge_prompt=judge_prompt,
        features=features,
        path=str(folder),
        short_prompt=_short_prompt(folder / "persona_short_prompt.txt"),
    )


def _short_prompt(path: Path) -> str | None:
    """The one-line style instruction in ``path``; None when the file is absent or empty."""
    if not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(lines) > 1:
        raise DefinitionError(f"{path}: must hold one line (a short style instruction), found {len(lines)}")
    return lines[0] if lines else None


def build_judge_prompt(profile: str, samples: list[str], max_samples: int = 8) -> str:
    """The persona description a judge reads: the profile and a few of the persona's own lines."""
    lines = "\n".join(f"- {s}" for s in samples[:max_samples])
    return f"{profile}\n\nThings this persona has said:\n{lines}"


def load_prompts(path: str | Path, split: str = "train") -> list[str]:
    """Conversational prompts of one split ('train' for optimisation, 'heldout' for evaluation)."""
    path = Path(path)
    data = _read_yaml(path)
    items = data.get(split)
    if not isinstance(items, list) or not items or not all(isinstance(p, str) and p.strip() for p in items):
        raise DefinitionError(f"{path}: field '{split}' must be a non-empty list of strings")
    return [p.strip() for p in items]


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DefinitionError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DefinitionError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DefinitionError(f"{path}: must hold a mapping of fields")
    return data
