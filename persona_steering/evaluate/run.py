"""The ``evaluate`` stage: every method on the held-out prompts, one generate call, judged, tested.

Order of work, so that bad input fails before anything is loaded or written: read and check the
persona, prompts, methods, optimisation result and vectors (``prepare``); then load the model,
plan every method (random search and grid run their own searches here), generate all held-out
rows in one batched and memoised call per answer setting (greedy, then one per sample seed),
judge them with every configured judge, and write ``<save_dir>/<persona>_evaluation.{json,md,png}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from persona_steering import __version__
from persona_steering.basis import TraitBasis, load_basis
from persona_steering.cache import Cache, atomic_write_json, atomic_write_text
from persona_steering.config import PERSONA_AXIS, Config, ConfigError, GenerationConfig
from persona_steering.contrast import FitContext, fit_context
from persona_steering.evaluate.core import Context, Method, MethodSkipped, Plan, json_safe, registry
from persona_steering.evaluate.render import plot_evaluation, render_markdown
from persona_steering.evaluate.scoring import (
    JudgeScores,
    agreement,
    answer_queries,
    missing_verdicts,
    score_answers,
    summarise,
)
from persona_steering.generation import Answer, generate
from persona_steering.judges import Judge, build_judge
from persona_steering.judges.ahead import JudgeAhead, may_judge_ahead
from persona_steering.optimize import _initial_weights
from persona_steering.record import PersonaFiles, PersonaRecord
from persona_steering.runtime import Runtime, identify, load_runtime
from persona_steering.steering import SteeringSpec
from persona_steering.store import VectorFileError
from persona_steering.traits import Persona, Trait, load_persona, load_prompts, load_traits

SEARCHES = ("random_search", "grid")
"""Methods that search with the first judge, starting where CMA-ES started."""


@dataclass
class Setup:
    """Everything checked before the model loads."""

    cfg: Config  # effective: steering and search settings from the optimisation result
    persona: Persona
    prompts: list[str]  # held-out
    train_prompts: list[str]
    methods: list[Method]
    traits: list[Trait]
    basis: TraitBasis
    judges: list[str]
    result: PersonaRecord | None
    files: PersonaFiles
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def run_evaluate(
    cfg: Config, rt: Runtime | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Compare every selected method on the held-out prompts and write the evaluation files.

    Args:
        cfg: the configuration (``optimize.persona_id`` is required).
        rt: an already loaded model (loaded from ``cfg.model`` when None).
        log: where progress lines go.

    Returns:
        The evaluation summary as written to ``<persona>_evaluation.json``, plus ``files``.
    """
    cfg.model.require_one_process("evaluate")
    setup = prepare(cfg)
    for note in setup.notes:
        log(f"note: {note}")
    rt = rt or load_runtime(setup.cfg.model, setup.cfg.cache_dir, setup.cfg.seed)
    if rt.fingerprint != setup.basis.fingerprint:
        raise VectorFileError("the loaded model is not the one the trait vectors were extracted from")
    with Cache(setup.cfg.cache_dir) as cache:
        judges = [
            build_judge(replace(setup.cfg.judge, backend=name), rt, setup.cfg.cache_dir)
            for name in setup.judges
        ]
        ctx = Context(
            setup.cfg,
            rt,
            cache,
            setup.basis,
            setup.persona,
            judges[0],
            setup.train_prompts,
            setup.result,
            log,
        )
        plans = _plans(ctx, setup)
        fit = fit_context(rt, setup.cfg, setup.persona, cache)  # unsteered: before, never inside, generate
        ahead = HeldOutAhead(ctx, judges, setup.traits, fit, setup.prompts)
        answers = _answer(ctx, plans, setup.prompts, ahead)
        scores = [
            score_answers(j, cache, setup.persona, setup.traits, setup.prompts, answers, fit) for j in judges
        ]
    summary = json_safe(_summary(setup, rt, plans, answers, scores))
    return _write(setup, summary, log)


def default_judges(optimised: str) -> list[str]:
    """The optimiser's judge first, then an independent offline one: never only the judge CMA-ES climbed."""
    return [optimised, "embedding" if optimised != "embedding" else "offline"]


def prepare(cfg: Config) -> Setup:
    """Read and check every input; raises a user error (ConfigError, DefinitionError, ...) on bad input."""
    persona_id = cfg.optimize.persona_id
    if not persona_id:
        raise ConfigError("optimize.persona_id is required (--persona-id ID, or make evaluate PERSONA=ID)")
    persona = load_persona(cfg.optimize.persona_dir, persona_id)
    prompts = load_prompts(cfg.optimize.prompts_file, "heldout")[: cfg.evaluate.num_prompts or None]
    files = PersonaFiles(Path(cfg.optimize.save_dir), persona_id)
    result = PersonaRecord.load(files)
    notes: list[str] = []
    eff = effective_config(cfg, result, notes)
    methods, skipped = select_methods(cfg.evaluate.methods, result is not None, files.result)
    traits = load_traits(eff.vectors.trait_dir, eff.traits)
    ident = identify(eff.model)
    s = eff.steering
    basis = load_basis(
        s.trait_vector_dir,
        ident.slug,
        eff.basis_traits,
        s.layer,
        s.vector_method,
        s.summary,
        fingerprint=ident.fingerprint,
        axis_file=files.axis,
        kind=s.basis,
    )
    if result is not None:
        result.check_basis(basis)
    judges = list(dict.fromkeys(cfg.evaluate.judges or default_judges(cfg.judge.backend)))
    searches = [m.name for m in methods if m.name in SEARCHES]
    if searches:
        _initial_weights(eff)  # a start that does not fit the traits fails here, before the model loads
    if result is not None and searches and result.judge not in (None, judges[0]):
        notes.append(
            f"{' and '.join(searches)} optimise with the {judges[0]} judge; the optimiser used {result.judge}"
        )
    train = load_prompts(eff.optimize.prompts_file, "train")[: eff.optimize.num_prompts]
    for name, reason in skipped.items():
        notes.append(f"{name} skipped: {reason}")
    return Setup(eff, persona, prompts, train, methods, traits, basis, judges, result, files, skipped, notes)


def effective_config(cfg: Config, result: PersonaRecord | None, notes: list[str]) -> Config:
    """``cfg`` with steering, traits and search settings taken from the optimisation result.

    The proposed weights only mean something at the layer, strength, positions and vectors they
    were found with, so every method is evaluated there; a differing config value is noted. The
    search baselines start where CMA-ES started (``initial_weights``, ``sigma0``) within its bound.
    """
    if result is None:
        return cfg
    saved = result.data.get("config") or {}
    opt_saved = saved.get("optimize", {})
    steering = replace(
        cfg.steering,
        layer=result.layer,
        alpha=result.alpha,
        vector_method=result.vector_method or cfg.steering.vector_method,
        positions=result.positions or cfg.steering.positions,
        summary=result.summary or cfg.steering.summary,
        persona_axis=PERSONA_AXIS in result.traits,
        basis=result.basis or "traits",
    )
    for name in ("layer", "alpha", "vector_method", "positions", "summary", "persona_axis", "basis"):
        if getattr(steering, name) != getattr(cfg.steering, name):
            notes.append(
                f"steering.{name} = {getattr(steering, name)} from the optimisation result "
                f"(config says {getattr(cfg.steering, name)})"
            )
    traits = [t for t in result.traits if t != PERSONA_AXIS]
    if traits != list(cfg.traits):
        notes.append(
            f"traits {', '.join(traits)} from the optimisation result (config says {', '.join(cfg.traits)})"
        )
    optimize = replace(
        cfg.optimize,
        num_prompts=int(opt_saved.get("num_prompts", cfg.optimize.num_prompts)),
        bound=float(opt_saved.get("bound", cfg.optimize.bound)),
        sigma0=float(opt_saved.get("sigma0", cfg.optimize.sigma0)),
        initial_weights=opt_saved.get("initial_weights", cfg.optimize.initial_weights),
        start=str(opt_saved.get("start", "zeros")),  # runs from before optimize.start began at zeros
        coherence_penalty=float(opt_saved.get("coherence_penalty", cfg.optimize.coherence_penalty)),
        max_norm=opt_saved.get("max_norm", cfg.optimize.max_norm),
        norm_penalty=float(opt_saved.get("norm_penalty", cfg.optimize.norm_penalty)),
    )
    judge = replace(cfg.judge, coherence=bool(saved.get("judge", {}).get("coherence", cfg.judge.coherence)))
    return replace(cfg, steering=steering, optimize=optimize, judge=judge, traits=traits)


def select_methods(
    requested: list[str] | None, have_result: bool, result_path: Path
) -> tuple[list[Method], dict[str, str]]:
    """The methods to run (always with ``base``, the persona-fit reference) and those skipped."""
    known = registry()
    for name in requested or []:
        if name not in known:
            raise ConfigError(f"unknown evaluation method {name!r} (known: {', '.join(known)})")
    skipped: dict[str, str] = {}
    chosen = []
    for name, method in known.items():
        if requested is not None and name not in requested and name != "base":
            continue
        if method.needs_optimization and not have_result:
            if requested is not None:
                raise ConfigError(
                    f"method {name} needs an optimisation result, but {result_path} does not exist: "
                    "run make optimize first"
                )
            skipped[name] = f"no optimisation result at {result_path} (run make optimize first)"
            continue
        chosen.append(method)
    return chosen, skipped


def _plans(ctx: Context, setup: Setup) -> dict[str, Plan]:
    plans: dict[str, Plan] = {}
    for method in setup.methods:
        try:
            plans[method.name] = method.plan(ctx, setup.prompts)
        except MethodSkipped as exc:
            setup.skipped[method.name] = str(exc)
            setup.notes.append(f"{method.name} skipped: {exc}")
            ctx.log(f"note: {method.name} skipped: {exc}")
    return plans


def _answer(
    ctx: Context, plans: dict[str, Plan], prompts: list[str], ahead: HeldOutAhead | None = None
) -> dict[str, list[list[str]]]:
    """Every method's held-out answer sets [answer][prompt]: one batched generate call per setting,
    each block of answers judged by ``ahead`` (when it may) while the next one generates.

    Set 0 uses the generation settings (greedy by default) and seed; set s (1..samples) samples at
    ``evaluate.sample_temperature`` with seed ``seed + s``. Both are in every row's cache key.
    """
    requests = [r for p in plans.values() for r in p.requests]
    deltas = torch.cat([p.deltas for p in plans.values()])  # [methods * prompts, hidden]
    n = len(prompts)
    out: dict[str, list[list[str]]] = {name: [] for name in plans}
    with JudgeAhead(ctx.cache, ahead is not None and ahead.enabled and "base" in plans) as background:
        for k, (gen, seed, desc) in enumerate(answer_settings(ctx.cfg)):
            hook = None
            if background.enabled and ahead is not None:
                hook = ahead.hook(background, list(plans).index("base") * n if k == 0 else None)
            answers = generate(
                ctx.rt,
                requests,
                gen,
                steering=SteeringSpec(ctx.basis.layer, deltas, ctx.cfg.steering.positions),
                cache=ctx.cache,
                seed=seed,
                desc=desc,
                on_answers=hook,
            )
            for i, name in enumerate(plans):
                out[name].append([a.text for a in answers[i * n : (i + 1) * n]])
    return out


class HeldOutAhead:
    """Judges held-out answers while the next block generates (``judge.while_generating``).

    Every answer is judged against the greedy ``base`` answer to its prompt, so a block is sent once
    the base answers of the greedy set are known; answers known before that are sent with them. What
    is not judged ahead is judged by ``score_answers`` afterwards; the verdicts are the same.
    """

    def __init__(
        self, ctx: Context, judges: list[Judge], traits: list[Trait], fit: FitContext, prompts: list[str]
    ) -> None:
        mode = ctx.cfg.judge.while_generating
        self.judges = [j for j in judges if may_judge_ahead(mode, j, ctx.rt.device.type)]
        self.enabled = bool(self.judges)
        self.traits, self.fit, self.prompts = traits, fit, prompts
        self.reference: list[str] | None = None  # the greedy base answers, once known

    def hook(self, background: JudgeAhead, base_start: int | None) -> Callable[[dict[int, Answer]], None]:
        """``generate``'s ``on_answers`` for one answer set; ``base_start``: the first request index
        of the base answers when this is the greedy set."""
        n, waiting = len(self.prompts), {}

        def on_answers(known: dict[int, Answer]) -> None:
            waiting.update(known)
            if self.reference is None:
                if base_start is None or any(base_start + i not in waiting for i in range(n)):
                    return
                self.reference = [waiting[base_start + i].text for i in range(n)]
            rows = sorted(waiting.items())
            waiting.clear()
            for judge in self.judges:
                queries = [
                    q
                    for r, answer in rows
                    for _, q in answer_queries(
                        judge, self.traits, self.fit, self.prompts[r % n], answer.text, self.reference[r % n]
                    )
                ]
                background.submit(judge, queries)

        return on_answers


def answer_settings(cfg: Config) -> list[tuple[GenerationConfig, int, str]]:
    """(generation settings, seed, progress label) of each answer set, the greedy one first."""
    ev = cfg.evaluate
    sampled = replace(cfg.generation, temperature=ev.sample_temperature)
    return [(cfg.generation, cfg.seed, "held-out answers")] + [
        (sampled, cfg.seed + s, f"held-out samples {s}/{ev.samples}") for s in range(1, ev.samples + 1)
    ]


def _summary(
    setup: Setup,
    rt: Runtime,
    plans: dict[str, Plan],
    answers: dict[str, list[list[str]]],
    scores: list[JudgeScores],
) -> dict[str, Any]:
    cfg = setup.cfg
    ev = cfg.evaluate
    stats = {s.judge: summarise(s, ev, cfg.seed) for s in scores}
    return {
        "persona_id": setup.persona.id,
        "model_id": rt.model_id,
        "fingerprint": rt.fingerprint,
        "layer": setup.basis.layer,
        "alpha": cfg.steering.alpha,
        "positions": cfg.steering.positions,
        "vector_method": cfg.steering.vector_method,
        "traits": setup.basis.traits,
        "num_prompts": len(setup.prompts),
        "prompts": setup.prompts,
        "judges": setup.judges,
        "optimised_judge": setup.judges[0],
        "optimizer_judge": setup.result.judge if setup.result is not None else None,
        "answers_per_prompt": 1 + ev.samples,
        "sampling": {
            "samples": ev.samples,
            "temperature": ev.sample_temperature,
            "top_p": cfg.generation.top_p,
            "seeds": [cfg.seed + s for s in range(1, ev.samples + 1)],
        },
        "methods": {
            m.name: {
                "description": m.description,
                "info": plans[m.name].info,
                "answers": answers[m.name][0],
                "sampled_answers": answers[m.name][1:],
            }
            for m in setup.methods
            if m.name in plans
        },
        "skipped": setup.skipped,
        "scores": stats,
        "unsupported": {s.judge: s.unsupported for s in scores},
        "missing_verdicts": {j: sum(missing_verdicts(per) for per in st.values()) for j, st in stats.items()},
        "agreement": agreement(scores),
        "statistics": {
            "unit": f"the prompt: the mean over its {1 + ev.samples} answers (greedy"
            + (f", {ev.samples} sampled at temperature {ev.sample_temperature:g})" if ev.samples else ")"),
            "interval": f"percentile bootstrap ({ev.bootstrap} resamples, {ev.confidence:.0%})",
            "test": "two-sided paired sign-flip permutation test over prompts (exact for n <= 30)",
            "correction": "Holm over the methods tested on each metric against each reference (p_holm)",
            "agreement": "Spearman rank correlation of per-prompt persona fit",
        },
        "optimization_file": str(setup.files.result) if setup.result is not None else None,
        "notes": setup.notes,
        "config": cfg.to_dict(),
        "config_digest": cfg.digest(),
        "version": __version__,
    }


def _write(setup: Setup, summary: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    files = {ext: setup.files.evaluation(ext) for ext in ("json", "md", "png")}
    atomic_write_json(files["json"], summary)
    atomic_write_text(files["md"], render_markdown(summary))
    plot_evaluation(summary, files["png"])
    log(f"wrote {files['json']}, {files['md'].name}, {files['png'].name}")
    return {**summary, "files": {k: str(v) for k, v in files.items()}}
