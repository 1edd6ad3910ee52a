"""The ``new-trait`` stage: an LLM drafts a trait definition, which is validated and written as YAML.

The configured judge endpoint (``judge.backend=openai``: any OpenAI-compatible server) is asked for
one JSON object: 5 pos/neg instruction pairs, 40 questions and an eval prompt. The reply is checked
with the trait schema itself (``traits.load_trait`` on a temporary file) plus the counts; an invalid
reply is sent back with the reason, up to ``MAX_DRAFTS`` drafts in all. Questions are split 20/20
into ``extract`` and ``eval`` alternately, so that any drift in the LLM's ordering (easy ones first,
one theme after another) lands in both halves. The file goes to ``<trait_dir>/<NAME>.yaml`` and an
existing one is kept unless ``overwrite``.

Calls go through ``api.ChatClient``, as the judge's do: transient HTTP failures are retried within
``judge.max_attempts`` and ``judge.max_retry_seconds``; failures that every call would repeat stop at
once with a JudgeError.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from persona_steering.api import FAILURES, ChatClient, describe
from persona_steering.cache import atomic_write_text
from persona_steering.config import Config, ConfigError, JudgeConfig
from persona_steering.judges import JudgeError
from persona_steering.traits import DefinitionError, Trait, load_trait

NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,39}")
NUM_PAIRS = 5
NUM_QUESTIONS = 40
MAX_DRAFTS = 3
"""Drafts asked for in all: the first and up to two corrections."""
MAX_TOKENS = 4000
"""Room for 40 questions, 10 instructions and a judge prompt with margin."""
TEMPERATURE = 0.7
"""Some variety, so that a corrected draft is not the same mistake again."""
HOW_TO_CONFIGURE = (
    "--judge openai --judge-model gpt-4o-mini (and --base-url URL for another OpenAI-compatible "
    "server), with the API key in OPENAI_API_KEY (environment or .env)"
)

INSTRUCTIONS = """You write a definition of a personality or style trait for activation-steering research.

Trait name: {name}
Trait description: {description}

Reply with one JSON object and nothing else, with these keys:
- "title": a short title for the trait.
- "pos_label" and "neg_label": two or three words naming the positive and the negative pole.
- "instruction": a list of exactly {pairs} objects {{"pos": ..., "neg": ...}}. "pos" is a system
  prompt that makes an assistant express the positive pole strongly, "neg" one that makes it express
  the negative pole; each pair differs only in the pole, and the pairs are worded differently.
- "questions": a list of exactly {questions} distinct, everyday conversational questions a user might
  ask, which an assistant could answer in either pole's style. They must not mention the trait.
- "eval_prompt": a judge prompt that asks to rate from 0 to 100 how strongly an answer expresses
  the positive pole (0 = strongly the negative pole, 50 = neutral, 100 = strongly positive), and to
  reply with the number only. It must contain the placeholders {{question}} and {{answer}} exactly
  once each and no other curly braces."""


@dataclass(frozen=True)
class TraitRequest:
    """What to author: the file name (and trait name), what the trait is, and where it goes."""

    name: str
    description: str
    trait_dir: str
    overwrite: bool = False


def run_new_trait(cfg: Config, request: TraitRequest, log: Callable[[str], None] = print) -> Trait:
    """Ask the configured LLM for a trait definition, validate it, write ``<trait_dir>/<name>.yaml``.

    Args:
        cfg: the judge section names the endpoint, model, key variable and retry budget.
        request: name, description, folder, overwrite.
        log: where progress lines go.

    Returns:
        The written trait, as ``traits.load_trait`` reads it back.
    """
    path = check_request(request)
    client = _client(cfg.judge)
    messages = [
        {
            "role": "user",
            "content": INSTRUCTIONS.format(
                name=request.name,
                description=request.description.strip(),
                pairs=NUM_PAIRS,
                questions=NUM_QUESTIONS,
            ),
        }
    ]
    reason = ""
    for draft in range(1, MAX_DRAFTS + 1):
        reply = _chat(client, messages)
        try:
            text = trait_yaml(request, parse_draft(reply))
            validate_yaml(request.name, text)
        except DefinitionError as exc:
            reason = str(exc)
            log(f"draft {draft} of {MAX_DRAFTS} is invalid: {reason}")
            messages += [
                {"role": "assistant", "content": reply},
                {
                    "role": "user",
                    "content": f"That is not valid: {reason}. Reply with the corrected JSON object only.",
                },
            ]
            continue
        atomic_write_text(path, text)
        log(f"wrote {path} (draft {draft}, model {cfg.judge.model})")
        return load_trait(path)
    raise JudgeError(
        f"{cfg.judge.model} gave no valid trait definition in {MAX_DRAFTS} drafts; last problem: {reason}"
    )


def check_request(request: TraitRequest) -> Path:
    """The target path, after checking the name, the description and an existing file."""
    if not request.name or not request.description.strip():
        raise ConfigError('new-trait needs --trait NAME and --description "what the trait is"')
    if not NAME_PATTERN.fullmatch(request.name):
        raise ConfigError(
            f"--trait {request.name!r} is not a usable trait name: start with a letter, then letters, "
            "digits, '_' or '-', at most 40 characters"
        )
    path = Path(request.trait_dir) / f"{request.name}.yaml"
    if path.exists() and not request.overwrite:
        raise ConfigError(f"{path} exists; pass --overwrite to replace it")
    return path


def parse_draft(reply: str) -> dict[str, Any]:
    """The JSON object in a reply (a Markdown code fence around it is tolerated), counts checked."""
    text = reply.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DefinitionError(f"the reply is not a JSON object ({exc.msg} at character {exc.pos})") from None
    if not isinstance(data, dict):
        raise DefinitionError("the reply must be one JSON object")
    pairs = data.get("instruction")
    if not isinstance(pairs, list) or len(pairs) < NUM_PAIRS:
        raise DefinitionError(f"'instruction' must be a list of {NUM_PAIRS} pos/neg objects")
    questions = data.get("questions")
    if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
        raise DefinitionError("'questions' must be a list of strings")
    distinct: dict[str, str] = {}
    for q in questions:
        distinct.setdefault(" ".join(q.lower().split()), q.strip())  # the same question twice counts once
    distinct.pop("", None)
    if len(distinct) < NUM_QUESTIONS:
        raise DefinitionError(
            f"'questions' must hold {NUM_QUESTIONS} distinct questions, got {len(distinct)}"
        )
    # A few extra pairs or questions are dropped rather than sent back: the rest may be fine.
    pairs = [{k: p[k] for k in ("pos", "neg") if k in p} if isinstance(p, dict) else p for p in pairs]
    return {**data, "instruction": pairs[:NUM_PAIRS], "questions": list(distinct.values())[:NUM_QUESTIONS]}


def trait_yaml(request: TraitRequest, draft: dict[str, Any]) -> str:
    """The trait file's text: the draft's fields, the questions split alternately into extract/eval."""
    questions = draft["questions"]
    data = {
        "name": request.name,
        "title": str(draft.get("title") or request.name),
        "description": request.description.strip(),
        "pos_label": str(draft.get("pos_label") or "positive"),
        "neg_label": str(draft.get("neg_label") or "negative"),
        "instruction": draft["instruction"],
        "questions": {"extract": questions[0::2], "eval": questions[1::2]},
        "eval_prompt": draft.get("eval_prompt"),
    }
    header = "# Drafted by `persona-steering new-trait`; read it before extracting vectors.\n"
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def validate_yaml(name: str, text: str) -> Trait:
    """Check the text with the trait schema itself, through a temporary ``<name>.yaml``."""
    with tempfile.TemporaryDirectory(prefix="new-trait-") as folder:
        path = Path(folder) / f"{name}.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            trait = load_trait(path)
        except DefinitionError as exc:
            # The temporary path means nothing to the LLM or the user: keep the field and the reason.
            raise DefinitionError(str(exc).replace(f"{path}: ", "")) from None
    if len(trait.extract_questions) != NUM_QUESTIONS // 2 or len(trait.eval_questions) != NUM_QUESTIONS // 2:
        raise DefinitionError(f"the questions must split {NUM_QUESTIONS // 2}/{NUM_QUESTIONS // 2}")
    return trait


def _client(cfg: JudgeConfig) -> ChatClient:
    """The judge endpoint's client; ConfigError or JudgeError naming the fix when there is none."""
    if cfg.backend != "openai":
        raise ConfigError(
            f"new-trait needs an LLM that can write, but judge.backend is {cfg.backend!r}: "
            f"use {HOW_TO_CONFIGURE}"
        )
    try:
        return ChatClient(cfg, "new-trait")
    except JudgeError as exc:
        raise JudgeError(f"{exc}; use {HOW_TO_CONFIGURE}") from None


def _chat(client: ChatClient, messages: list[dict[str, str]]) -> str:
    """One chat completion's text, retried on transient failures; JudgeError when it cannot work."""
    try:
        response = client.chat(messages, temperature=TEMPERATURE, max_tokens=MAX_TOKENS)
    except FAILURES as exc:
        raise JudgeError(
            f"the LLM at {client.endpoint} (model {client.model!r}) failed: {describe(exc)}; "
            "check judge.model, judge.base_url and the key"
        ) from None
    if not response.choices or not response.choices[0].message.content:
        return ""
    return str(response.choices[0].message.content)


def new_trait(cfg: Config, log: Callable[[str], None] = print) -> Trait:
    """The ``new-trait`` command: ``run_new_trait`` for ``cfg.new_trait`` into ``vectors.trait_dir``."""
    t = cfg.new_trait
    request = TraitRequest(t.trait or "", t.description or "", cfg.vectors.trait_dir, t.overwrite)
    trait = run_new_trait(cfg, request, log)
    log(
        f"{trait.name}: {len(trait.instructions)} instruction pairs, {len(trait.extract_questions)} "
        f"extract and {len(trait.eval_questions)} eval questions; read {trait.path} before `make vectors`"
    )
    return trait
