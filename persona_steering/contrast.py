"""What a persona's voice is judged against: the persona-fit context every fit query carries.

The offline judge learns a persona's voice from its samples *against* a contrast set, and scores
relevance among a pool of questions; LLM judges read the rubric. ``fit_context`` gathers all of it
once per persona, so ``optimize``, ``evaluate`` and ``judge-check`` judge the same way.

- contrast: every other persona's samples in ``optimize.persona_dir``, plus the model's own
  unsteered (greedy, cached) answers to all training prompts. Never a held-out prompt's answer.
- questions: the training and held-out prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from persona_steering.cache import Cache
from persona_steering.config import Config
from persona_steering.generation import Request, generate
from persona_steering.judges.base import Query
from persona_steering.runtime import Runtime
from persona_steering.traits import DefinitionError, Persona, load_persona, load_prompts


@dataclass(frozen=True)
class FitContext:
    """Everything a persona-fit query needs besides the question, the answer and its baseline."""

    rubric: str
    samples: tuple[str, ...]
    contrast: tuple[str, ...]
    questions: tuple[str, ...]

    def query(self, question: str, answer: str, baseline: str, replicate: int = 0) -> Query:
        """The persona-fit query of ``answer`` to ``question``, against the unsteered ``baseline``."""
        return Query(
            "persona_fit",
            question,
            answer,
            baseline=baseline,
            rubric=self.rubric,
            samples=self.samples,
            contrast=self.contrast,
            questions=self.questions,
            replicate=replicate,
        )


def fit_context(rt: Runtime | None, cfg: Config, persona: Persona, cache: Cache | None) -> FitContext:
    """The fit context of ``persona`` (generates, or reads from the cache, the unsteered answers).

    Args:
        rt: the loaded policy model; None on ranks that never judge (contrast is then left empty).
        cfg: the configuration (persona_dir, prompts_file, generation, seed).
        persona: whose voice is judged.
        cache: generation memo store.
    """
    train = load_prompts(cfg.optimize.prompts_file, "train")
    heldout = load_prompts(cfg.optimize.prompts_file, "heldout")
    contrast = [s for other in other_personas(cfg.optimize.persona_dir, persona.id) for s in other.samples]
    if rt is not None:
        answers = generate(
            rt,
            [Request(p) for p in train],
            cfg.generation,
            cache=cache,
            seed=cfg.seed,
            desc="contrast answers",
        )
        contrast += [a.text for a in answers if a.text.strip()]
    return FitContext(
        persona.judge_prompt,
        tuple(persona.samples),
        tuple(contrast),
        tuple(dict.fromkeys([*train, *heldout])),
    )


def other_personas(persona_dir: str | Path, persona_id: str) -> list[Persona]:
    """Every readable persona in ``persona_dir`` except ``persona_id``, in name order."""
    out = []
    for folder in sorted(Path(persona_dir).iterdir()) if Path(persona_dir).is_dir() else []:
        if folder.name == persona_id or not (folder / "persona_samples.json").is_file():
            continue
        try:
            out.append(load_persona(persona_dir, folder.name))
        except DefinitionError:
            continue  # a broken neighbour must not stop this persona's run; its own run reports it
    return out
