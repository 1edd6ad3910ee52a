"""CMA-ES over trait weights: one batched generation and judging per population, checkpoint after
every iteration, resume with nothing recomputed.

Objective (minimised): minus the mean persona-fit verdict (1-5) of a candidate's steered answers
against the unsteered ones, optionally minus a coherence penalty. Candidates are compared on the
same prompts only: a missing verdict is re-asked, and if it is still missing the run stops before
telling CMA-ES (the checkpoint stays as it was, and a re-run resumes).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persona_steering import __version__
from persona_steering.basis import TraitBasis, configured_basis, save_axis
from persona_steering.cache import Cache, atomic_write_json, digest, exclusive_lock, remove_stale_temps
from persona_steering.checkpoint import (
    ResumeError,
    Start,
    ask,
    load_checkpoint,
    new_state,
    save_checkpoint,
    state_digest,
    tell,
)
from persona_steering.config import PERSONA_AXIS, Config, ConfigError
from persona_steering.contrast import FitContext, fit_context, other_personas
from persona_steering.convergence import plot_convergence, plot_layers
from persona_steering.distributed import (
    check_same,
    is_main,
    is_main_process,
    launched_as_main,
    main_cache,
    on_main,
    quiet_unless_main,
    rank_log,
)
from persona_steering.generation import Answer, Request, generate, generate_population
from persona_steering.judges import Judge, JudgeError, Query, Verdict, build_judge, judge_versions
from persona_steering.judges.ahead import JudgeAhead, may_judge_ahead
from persona_steering.persona_axis import NoContrastError, persona_directions
from persona_steering.record import PersonaFiles, PersonaRecord
from persona_steering.runtime import Runtime, identify, load_runtime
from persona_steering.steering import SteeringSpec
from persona_steering.traits import Persona, load_persona, load_prompts
from persona_steering.vectors import unit

REASK_ROUNDS = 2
"""Times the missing verdicts of a population are asked again before the run stops."""
RUN_VERSION = 1
"""Part of every run digest: bump it when the same configuration would follow another trajectory."""

__all__ = ["ResumeError", "run_layers", "run_optimize", "run_personas", "state_digest"]


@dataclass
class Scored:
    """A candidate's fitness and what it rests on."""

    fit: float  # mean persona fit over available verdicts (nan if none)
    coherence: float | None
    verdicts: int
    expected: int
    objective: float  # what CMA-ES minimises
    parts: dict[str, float] = field(default_factory=dict)  # mean style, relevance, fluency (0-1)


@dataclass
class Objective:
    """Evaluates populations of weight vectors: steer, generate in one batch, judge, cache."""

    rt: Runtime
    cfg: Config
    basis: TraitBasis
    persona: Persona
    prompts: list[str]
    judge: Judge
    cache: Cache | None  # None on ranks other than 0, which never read or write it

    @cached_property
    def baselines(self) -> list[str]:
        """Unsteered answers to the prompts (generated once, memoised)."""
        answers = generate(
            self.rt,
            [Request(p) for p in self.prompts],
            self.cfg.generation,
            cache=self.cache,
            seed=self.cfg.seed,
            desc="baseline answers",
        )
        return [a.text for a in answers]

    @cached_property
    def fit(self) -> FitContext:
        """What the persona's voice is judged against (contrast answers generated once, memoised)."""
        return fit_context(self.rt, self.cfg, self.persona, self.cache)

    def deltas(self, weights: np.ndarray) -> torch.Tensor:
        """Steering vectors [candidates, hidden] of weights [candidates, k]."""
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=torch.float32)
        return self.basis.deltas(w, self.cfg.steering.alpha)

    def steered(
        self, deltas: torch.Tensor, on_answers: Callable[[dict[tuple[int, int], Answer]], None] | None = None
    ) -> list[list[str]]:
        """Answers [candidate][prompt] steered by ``deltas`` [candidates, hidden] at the basis layer;
        ``on_answers`` sees each block as it is generated (``generate_population``)."""
        out = generate_population(
            self.rt,
            self.prompts,
            self.cfg.generation,
            SteeringSpec(self.basis.layer, deltas, self.cfg.steering.positions),
            cache=self.cache,
            seed=self.cfg.seed,
            desc="steered answers",
            on_answers=on_answers,
        )
        return [[a.text for a in cand] for cand in out]

    def score(self, weights: np.ndarray) -> tuple[list[Scored], list[list[str]]]:
        """Steer, generate and judge a population of weight vectors [candidates, k]."""
        with JudgeAhead(self.cache, prepare_ahead([self])) as ahead:
            on_answers = _judging_ahead(ahead, [(self, range(len(weights)))])
            texts = self.steered(self.deltas(weights), on_answers)
        return self.within_budget(self.judge_texts(texts), weights), texts

    def may_judge_ahead(self) -> bool:
        """``judges.ahead.may_judge_ahead`` for this objective's judge: the same answer on every rank."""
        return may_judge_ahead(self.cfg.judge.while_generating, self.judge, self.rt.device.type)

    def row_queries(self, p: int, answer: str) -> list[Query]:
        """The judge queries of one steered answer to prompt ``p``: its fit, and coherence if asked."""
        queries = [self.fit.query(self.prompts[p], answer, self.baselines[p])]
        if self.cfg.judge.coherence:
            queries.append(Query("coherence", self.prompts[p], answer))
        return queries

    def within_budget(self, scored: list[Scored], weights: np.ndarray) -> list[Scored]:
        """``scored`` with optimize.norm_penalty per alpha unit of steering norm beyond optimize.max_norm."""
        limit = self.cfg.optimize.max_norm
        if limit is None:
            return scored
        norms = (self.deltas(weights).norm(dim=-1) / self.basis.scale).tolist()  # alpha units, [candidates]
        penalty = self.cfg.optimize.norm_penalty
        return [
            replace(s, objective=s.objective + penalty * max(0.0, n - limit))
            for s, n in zip(scored, norms, strict=True)
        ]

    def judge_texts(self, texts: list[list[str]]) -> list[Scored]:
        """Persona fit (and coherence) of steered answers [candidate][prompt]."""
        queries = [q for cand in texts for p, ans in enumerate(cand) for q in self.row_queries(p, ans)]
        # Judged once, on rank 0; every rank gets the verdicts and so tells CMA-ES the same scores.
        verdicts = on_main(self.rt.fabric, lambda: self._every_verdict(queries))
        per = 2 if self.cfg.judge.coherence else 1
        n = len(self.prompts)
        scored = []
        for c in range(len(texts)):
            chunk = verdicts[c * n * per : (c + 1) * n * per]
            fits = [v.score for v in chunk[0::per] if v.score is not None]
            parts = _mean_parts([v for v in chunk[0::per] if v.score is not None])
            cohs = [v.score for v in chunk[1::per] if v.score is not None] if per == 2 else []
            fit = float(np.mean(fits)) if fits else math.nan
            coh = float(np.mean(cohs)) if cohs else None
            objective = -fit
            if coh is not None and self.cfg.optimize.coherence_penalty:
                objective += self.cfg.optimize.coherence_penalty * (1 - coh / 100)
            scored.append(Scored(fit, coh, len(fits), n, objective, parts))
        return scored

    def _every_verdict(self, queries: list[Query]) -> list[Verdict]:
        """A verdict for every query, missing ones re-asked; JudgeError if some are still missing."""
        verdicts = self.judge.judge(queries, self.cache)
        for _ in range(REASK_ROUNDS):
            missing = [i for i, v in enumerate(verdicts) if v.score is None]
            if not missing:
                return verdicts
            again = self.judge.judge([queries[i] for i in missing], self.cache)
            for i, verdict in zip(missing, again, strict=True):
                verdicts[i] = verdict
        missing = [i for i, v in enumerate(verdicts) if v.score is None]
        if missing:
            raise JudgeError(
                f"{len(missing)} of {len(queries)} verdicts still missing after asking "
                f"{REASK_ROUNDS + 1} times (first: {verdicts[missing[0]].detail})"
            )
        return verdicts


def _mean_parts(verdicts: list[Any]) -> dict[str, float]:
    """Mean of each verdict part over verdicts that report parts ({} when none does)."""
    with_parts = [v.meta["parts"] for v in verdicts if "parts" in v.meta]
    if not with_parts:
        return {}
    return {k: float(np.mean([p[k] for p in with_parts])) for k in with_parts[0]}


def run_optimize(
    cfg: Config, rt: Runtime | Callable[[], Runtime] | None = None, log: Any = print
) -> dict[str, Any]:
    """The ``optimize`` stage for ``cfg.optimize.persona_id``: resume or start, iterate, checkpoint,
    write results.

    Args:
        cfg: the whole configuration; ``cfg.optimize`` and ``cfg.steering`` matter most.
        rt: the loaded model, or a function returning it (called only if there is work to do).
        log: where progress lines go.
    """
    if not cfg.optimize.persona_id:
        raise ConfigError("optimize.persona_id is required (--persona-id ID, or make optimize PERSONA=ID)")
    return run_personas(cfg, [cfg.optimize.persona_id], rt, log)[cfg.optimize.persona_id]


@dataclass
class _Run:
    """One persona's optimisation: what determines it, where it is saved, and its live state."""

    cfg: Config
    persona: Persona
    prompts: list[str]
    x0: np.ndarray
    basis: TraitBasis
    digest: str
    paths: dict[str, Path]
    state: dict[str, Any] | None = None
    objective: Objective | None = None

    @property
    def id(self) -> str:
        return self.persona.id


def run_personas(
    cfg: Config,
    persona_ids: list[str],
    rt: Runtime | Callable[[], Runtime] | None = None,
    log: Any = print,
) -> dict[str, dict[str, Any]]:
    """Optimise several personas in lockstep: one CMA-ES each (own seed stream, own checkpoint, same
    result as alone), but one batched ``generate`` per iteration carrying every persona's rows."""
    if len(set(persona_ids)) != len(persona_ids):
        raise ConfigError(f"persona ids repeat: {', '.join(persona_ids)}")
    with ExitStack() as locks:
        return _run_personas(cfg, persona_ids, rt, log, locks)


def _run_personas(
    cfg: Config,
    persona_ids: list[str],
    rt: Runtime | Callable[[], Runtime] | None,
    log: Any,
    locks: ExitStack,
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    runs: list[_Run] = []
    plans = [_plan(replace(cfg, optimize=replace(cfg.optimize, persona_id=p))) for p in persona_ids]
    for pid, run in zip(persona_ids, plans, strict=True):  # all checked before anything is written
        if launched_as_main():  # one run per persona and save dir: two would both pay the judge
            what = f"an optimize of persona {pid} in {run.paths['lock'].parent}"
            locks.enter_context(exclusive_lock(run.paths["lock"], what))
            for path in run.paths.values():  # ours now: temps a killed run left cannot be a live writer's
                remove_stale_temps(path)
        finished = _finished_result(run.paths["result"], run.digest)
        if finished is not None and not cfg.optimize.restart:
            if finished.get("selected", "best") == run.cfg.optimize.select:
                where = f"{run.paths['result']} (config {run.digest})"
                log(f"{pid}: finished run found in {where}; nothing to do")
                results[pid] = finished
                continue
            log(f"{pid}: finished run found; reporting the {run.cfg.optimize.select} weights instead")
        run.state = _load_checkpoint(run, log)
        runs.append(run)
    if not runs:
        return results
    rt = rt() if callable(rt) else rt or load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
    if rt.fingerprint != runs[0].basis.fingerprint:
        raise ConfigError("the loaded model does not match the vectors' model fingerprint")
    # Every rank holds the same CMA-ES state (same seed, same verdicts), deals each population's
    # rows across ranks in generate(), and leaves the cache, checkpoints and outputs to rank 0.
    log = quiet_unless_main(rt.fabric, log)
    rank_log(rt.fabric, f"optimising {', '.join(r.id for r in runs)} on a round-robin share of the rows")
    with main_cache(rt.fabric, cfg.cache_dir) as cache:
        judge = build_judge(cfg.judge, rt, cfg.cache_dir)
        for run in runs:
            if run.cfg.steering.persona_axis:
                _add_persona_axis(run, rt, cache, log)
            run.objective = Objective(rt, run.cfg, run.basis, run.persona, run.prompts, judge, cache)
            _start(run, log)
        try:
            _iterate(runs, cfg.optimize.max_iterations, log)
            for run in runs:
                results[run.id] = _finish(run, log)
        except JudgeError as exc:
            raise JudgeError(f"{exc}; {_resume_note(runs)}") from None
        if cache is not None:
            log("cache: " + json.dumps({"hits": cache.hits, "misses": cache.misses}, sort_keys=True))
    return {pid: results[pid] for pid in persona_ids}


def _add_persona_axis(run: _Run, rt: Runtime, cache: Cache | None, log: Any) -> None:
    """Extend the run's basis by the persona's own direction 'P' and write it beside the result."""
    try:
        directions, pairs = persona_directions(rt, run.cfg, run.persona, cache, run.basis.layer)
    except NoContrastError as exc:
        raise ConfigError(f"{run.id}: steering.persona_axis: {exc}") from None
    direction = directions["mean_diff"]
    axis = unit(direction)
    traits = zip(run.basis.traits, run.basis.directions, strict=True)
    cosines = {t: round(float(u @ axis), 3) for t, u in traits}
    run.basis = run.basis.with_axis(direction)
    if is_main(rt.fabric):
        save_axis(run.paths["axis"], axis, run.basis, persona_id=run.id, pairs=pairs)
    log(f"{run.id}: persona axis P from {pairs} sample/answer pairs; cosine with the traits {cosines}")


def _iterate(runs: list[_Run], max_iterations: int, log: Any) -> None:
    """Ask, generate every run's rows together, judge, tell; until every run is done."""
    while active := [r for r in runs if r.state and r.state["iteration"] < max_iterations]:
        started = time.perf_counter()
        candidates = [_ask(r) for r in active]  # [popsize, k] each
        objectives = [r.objective for r in active if r.objective is not None]
        # One background judge for every run: the runs share one judge (and one endpoint's limits).
        with JudgeAhead(objectives[0].cache, prepare_ahead(objectives)) as ahead:
            texts = _answers_together(active, candidates, ahead)
        for run, cands, answers in zip(active, candidates, texts, strict=True):
            assert run.objective is not None
            scored = run.objective.within_budget(run.objective.judge_texts(answers), cands)
            _tell(run, cands, scored, time.perf_counter() - started, log, prefix=len(runs) > 1)


def _resume_note(runs: list[_Run]) -> str:
    """What a stopped run left behind: nothing half-told, and how to continue."""
    done = ", ".join(f"{r.id} after iteration {r.state['iteration']}" for r in runs if r.state)
    return (
        f"stopped before telling CMA-ES; the checkpoints ({done}) and every verdict received are "
        "kept: re-run the same command to resume"
    )


def _plan(cfg: Config) -> _Run:
    opt = cfg.optimize
    persona = load_persona(opt.persona_dir, str(opt.persona_id))
    prompts = load_prompts(opt.prompts_file, "train")[: opt.num_prompts]
    x0 = _initial_weights(cfg)
    ident = identify(cfg.model)
    basis = configured_basis(cfg.steering, cfg.traits, ident.slug, ident.fingerprint)
    run_digest = _run_digest(cfg, persona, prompts, basis, ident.fingerprint)
    return _Run(cfg, persona, prompts, x0, basis, run_digest, _paths(Path(opt.save_dir), persona.id))


def _start(run: _Run, log: Any) -> None:
    """A fresh CMA-ES (seeded) unless a checkpoint was loaded."""
    if run.state is not None:
        log(f"{run.id}: resuming after iteration {run.state['iteration']} from {run.paths['checkpoint']}")
        return
    run.state = new_state(_strategy_start(run), run.digest)
    log(
        f"{run.id}: starting CMA-ES over {', '.join(run.basis.traits)} at layer {run.basis.layer}, "
        f"alpha {run.cfg.steering.alpha}, population {run.state['es'].popsize}"
    )


def _strategy_start(run: _Run) -> Start:
    opt = run.cfg.optimize
    return Start(
        x0=run.x0.tolist(),
        sigma0=opt.sigma0,
        popsize=opt.population_size or (4 + int(3 * math.log(len(run.x0)))),
        seed=run.cfg.seed,
        bound=opt.bound,
        max_iterations=opt.max_iterations,
    )


def _ask(run: _Run) -> np.ndarray:
    """The next population, drawn from this run's own numpy RNG stream (so lockstep equals alone)."""
    assert run.state is not None
    return ask(run.state)


def _answers_together(
    runs: list[_Run], candidates: list[np.ndarray], ahead: JudgeAhead
) -> list[list[list[str]]]:
    """Every run's steered answers from one generate call (runs share model, prompts and layer),
    each block judged by ``ahead`` while the next one generates."""
    objectives = [r.objective for r in runs if r.objective is not None]
    deltas = [o.deltas(c) for o, c in zip(objectives, candidates, strict=True)]
    owners, start = [], 0
    for objective, cands in zip(objectives, candidates, strict=True):
        owners.append((objective, range(start, start + len(cands))))
        start += len(cands)
    texts = objectives[0].steered(torch.cat(deltas), _judging_ahead(ahead, owners))
    out, start = [], 0
    for cands in candidates:
        out.append(texts[start : start + len(cands)])
        start += len(cands)
    return out


def prepare_ahead(objectives: list[Objective]) -> bool:
    """Whether the answers for ``objectives`` are judged while the next block generates on this rank.

    If the configuration allows it (``Objective.may_judge_ahead``), every rank first generates each
    objective's ``fit`` and ``baselines``: unsteered, never inside the steered generation, and on every
    rank, cache or not, because generating runs collectives that all ranks must join. Only a rank with a
    cache to leave the verdicts in then judges ahead.
    """
    if not all(o.may_judge_ahead() for o in objectives):
        return False
    for o in objectives:
        _ = o.fit, o.baselines
    return all(o.cache is not None for o in objectives)


def _judging_ahead(
    ahead: JudgeAhead, owners: list[tuple[Objective, range]]
) -> Callable[[dict[tuple[int, int], Answer]], None] | None:
    """``on_answers`` handing each block's answers to ``ahead`` with the queries of the objective
    whose candidates (rows ``range`` of the population) they answer; None when it is off."""
    if not ahead.enabled:
        return None

    def on_answers(known: dict[tuple[int, int], Answer]) -> None:
        for objective, rows in owners:
            mine = sorted((cp, a.text) for cp, a in known.items() if cp[0] in rows)
            queries = [q for (_, p), text in mine for q in objective.row_queries(p, text)]
            ahead.submit(objective.judge, queries)

    return on_answers


def _tell(
    run: _Run, candidates: np.ndarray, scored: list[Scored], seconds: float, log: Any, prefix: bool
) -> None:
    """Update CMA-ES, the history and the checkpoint; print the iteration's line."""
    state = run.state
    assert state is not None
    tell(state, candidates, [s.objective for s in scored])
    _record(state, candidates, scored, run.basis.traits)
    held = state_digest(state)
    state["history"]["state_digest"].append(held)
    fabric = run.objective.rt.fabric if run.objective is not None else None
    # Every rank told CMA-ES the same scores, so every rank must now hold the same state; a rank that
    # drifted (other numerics, other library versions) would ask for other candidates next time.
    check_same(fabric, held, f"{run.id}'s CMA-ES state after iteration {state['iteration']}")
    rank_log(fabric, f"{run.id} iteration {state['iteration']} CMA-ES state {held}")
    if is_main(fabric):
        save_checkpoint(run.paths["checkpoint"], state)
    h = state["history"]
    log(
        f"{run.id + ': ' if prefix else ''}"
        f"iter {state['iteration']:>3}/{run.cfg.optimize.max_iterations}  best {state['best']['score']:.3f}  "
        f"gen best {h['generation_best'][-1]:.3f}  gen mean {h['generation_mean'][-1]:.3f}  "
        f"sigma {state['es'].sigma:.3f}  "
        f"verdicts {sum(s.verdicts for s in scored)}/{sum(s.expected for s in scored)}  {seconds:.1f}s"
    )


def _finish(run: _Run, log: Any) -> dict[str, Any]:
    """Score the distribution mean and the unsteered baseline, pick the weights ``optimize.select``
    names, and write the outputs."""
    state, objective = run.state, run.objective
    assert state is not None and objective is not None
    mean_w = np.asarray(state["es"].mean, dtype=np.float64)
    (mean_s, zero_s), mean_texts = objective.score(np.stack([mean_w, np.zeros_like(mean_w)]))
    result = _result(run.cfg, run.basis, state, mean_w, mean_s, zero_s, run.digest)
    if run.cfg.optimize.select == "best":
        _, texts = objective.score(np.asarray(state["best"]["weights"])[None, :])
        steered = texts[0]
    else:
        steered = mean_texts[0]
    result["examples"] = [
        {"prompt": p, "baseline": b, "steered": s}
        for p, b, s in zip(run.prompts, objective.baselines, steered, strict=False)
    ]
    if hasattr(objective.judge, "style_report") and is_main(objective.rt.fabric):
        fit = objective.fit
        result["style_classifier"] = objective.judge.style_report(fit.samples, fit.contrast)
    if not is_main(objective.rt.fabric):
        return result
    PersonaRecord.from_dict(result).save(PersonaFiles(Path(run.cfg.optimize.save_dir), run.id))
    plot_convergence(result, run.paths["plot"])
    parts = "  ".join(f"{k} {v:.2f}" for k, v in result["parts"].items())
    log(
        f"{run.id}: {result['selected']} weights fit {result['score']:.3f} ({parts or 'no parts'}) "
        f"(best candidate {result['best_score']:.3f}, search mean {result['mean_score']:.3f}, "
        f"unsteered {result['baseline_score']:.3f}); wrote {run.paths['result']}"
    )
    return result


def run_layers(cfg: Config, layers: list[int], log: Any = print) -> dict[str, Any]:
    """One optimisation per layer (each resumable in ``<save_dir>/layer<L>/``), then the best layer.

    The model is loaded once, and only if some layer's run is not finished yet.
    """
    loaded: list[Runtime] = []

    def runtime() -> Runtime:
        if not loaded:
            loaded.append(load_runtime(cfg.model, cfg.cache_dir, cfg.seed))
        return loaded[0]

    rows = []
    for layer in layers:
        sub = replace(
            cfg,
            steering=replace(cfg.steering, layer=layer),
            optimize=replace(
                cfg.optimize, save_dir=str(Path(cfg.optimize.save_dir) / f"layer{layer}"), layers=None
            ),
        )
        log(f"--- layer {layer} ---")
        result = run_optimize(sub, runtime, log)
        rows.append(
            {
                "layer": result["layer"],
                "selected": result["selected"],
                "score": result["score"],
                "best_score": result["best_score"],
                "mean_score": result["mean_score"],
                "baseline_score": result["baseline_score"],
                "weights": result["weights"],
                "result": str(_paths(Path(sub.optimize.save_dir), str(cfg.optimize.persona_id))["result"]),
            }
        )
    best = max(rows, key=lambda r: r["score"])  # by the weights each layer reports (optimize.select)
    summary = {
        "persona_id": cfg.optimize.persona_id,
        "layers": rows,
        "best_layer": best["layer"],
        "best_score": best["score"],
        "config_digest": cfg.digest("model", "generation", "steering", "judge", "optimize", "traits", "seed"),
    }
    if not is_main_process():
        return summary
    files = PersonaFiles(Path(cfg.optimize.save_dir), str(cfg.optimize.persona_id))
    atomic_write_json(files.layers("json"), summary)
    plot_layers(summary, files.layers("png"))
    return summary


def _initial_weights(cfg: Config) -> np.ndarray:
    traits = cfg.basis_traits
    k = len(traits)
    init = cfg.optimize.initial_weights
    if init is None:
        x0 = np.zeros(k)
        if cfg.optimize.start == "persona_axis" and traits[-1:] == [PERSONA_AXIS]:
            x0[-1] = axis_start(cfg)
        return x0
    if len(init) != k:
        raise ConfigError(
            f"optimize.initial_weights has {len(init)} values for {k} traits ({', '.join(traits)})"
        )
    arr = np.asarray(init, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"optimize.initial_weights must be finite numbers, got {init}")
    if np.any(np.abs(arr) > cfg.optimize.bound):
        raise ConfigError(f"optimize.initial_weights must lie within +-{cfg.optimize.bound} (optimize.bound)")
    return arr


def axis_start(cfg: Config) -> float:
    """P's starting weight with optimize.start=persona_axis: the damage budget's norm (1 without one)."""
    if cfg.optimize.max_norm is None:
        return min(1.0, cfg.optimize.bound)
    return min(cfg.optimize.max_norm / cfg.steering.alpha, cfg.optimize.bound)


def _run_digest(
    cfg: Config, persona: Persona, prompts: list[str], basis: TraitBasis, fingerprint: str
) -> str:
    """Everything that determines the optimisation's trajectory (not where it is saved)."""
    # Where inputs live and how runs are grouped do not change a persona's trajectory.
    # Nor does which weights the finished run reports (select).
    where: tuple[str, ...] = (
        "save_dir",
        "restart",
        "persona_dir",
        "prompts_file",
        "layers",
        "personas",
        "select",
    )
    # Without a damage budget its penalty does nothing: left out, so earlier runs still resume.
    if cfg.optimize.max_norm is None:
        where += ("max_norm", "norm_penalty")
    # Nor does a start that leaves x0 at zeros, so runs from before optimize.start still resume.
    if not np.any(_initial_weights(cfg)) or cfg.optimize.initial_weights is not None:
        where += ("start",)
    opt = {k: v for k, v in asdict(cfg.optimize).items() if k not in where}
    # The persona axis contrasts the samples with answers to every training prompt, not just these.
    axis = {}
    if cfg.steering.persona_axis:
        axis["axis_prompts"] = load_prompts(cfg.optimize.prompts_file, "train")
    return digest(
        {
            "v": RUN_VERSION,
            "model": fingerprint,
            "generation": cfg.generation.outcome() | {"max_batch": None},  # None: as before outcome()
            "steering": _steering_key(cfg),
            "judge": {
                k: v
                for k, v in asdict(cfg.judge).items()
                if k
                not in (
                    "timeout",
                    "concurrency",
                    "max_attempts",
                    "max_retry_seconds",
                    "max_consecutive_failures",
                    "while_generating",
                    "calibration_dir",
                    "check_dir",
                )
            },
            # A changed judge algorithm or prompt changes every verdict, so it is another run.
            "judge_versions": judge_versions(),
            # The offline judge learns the voice against the other personas: they shape the fit too.
            "contrast": [p.digest() for p in other_personas(cfg.optimize.persona_dir, persona.id)],
            "optimize": opt,
            "traits": cfg.traits,
            "seed": cfg.seed,
            "persona": persona.digest(),
            "prompts": prompts,
            "basis": basis.digest(),
            **axis,
        },
        16,
    )


def _steering_key(cfg: Config) -> dict[str, Any]:
    """The steering section as the run digest sees it: where vectors live does not matter, and the
    traits basis is left out so that runs made before steering.basis existed still resume."""
    data = asdict(cfg.steering) | {"trait_vector_dir": None}
    if data["basis"] == "traits":
        del data["basis"]
    return data


def _paths(save_dir: Path, persona_id: str) -> dict[str, Path]:
    files = PersonaFiles(save_dir, persona_id)
    return {
        "result": files.result,
        "best": files.best_weights,
        "checkpoint": files.checkpoint,
        "legacy_checkpoint": files.legacy_checkpoint,
        "lock": files.lock,
        "axis": files.axis,
        "plot": files.convergence,
    }


def _finished_result(path: Path, run_digest: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return None
    return data if data.get("config_digest") == run_digest else None


def _load_checkpoint(run: _Run, log: Any) -> dict[str, Any] | None:
    """The run's checkpoint with its strategy rebuilt, None to start fresh; a pickled checkpoint from
    an older version is never loaded (unpickling a file can run any code)."""
    path, legacy = run.paths["checkpoint"], run.paths["legacy_checkpoint"]
    if run.cfg.optimize.restart:
        return None
    if legacy.is_file() and not path.is_file():
        raise ResumeError(
            f"{legacy} is a pickled checkpoint from an older version and is never loaded (a pickle "
            "can run code); delete it, or rerun with --restart to start over"
        )
    if not path.is_file():
        return None
    return load_checkpoint(path, _strategy_start(run), run.digest)


def _record(state: dict[str, Any], candidates: np.ndarray, scored: list[Scored], traits: list[str]) -> None:
    state["iteration"] += 1
    state["evaluations"] += len(scored)
    fits = [s.fit for s in scored]
    i = int(np.nanargmax(fits))
    if state["best"] is None or fits[i] > state["best"]["score"]:
        state["best"] = {
            "score": float(fits[i]),
            "weights": candidates[i].tolist(),
            "iteration": state["iteration"],
            "parts": scored[i].parts,
        }
    h = state["history"]
    es = state["es"]
    h["iterations"].append(state["iteration"])
    h["best_scores"].append(state["best"]["score"])
    h["best_weights"].append(dict(zip(traits, map(float, state["best"]["weights"]), strict=True)))
    h["generation_best"].append(float(np.nanmax(fits)))
    h["generation_mean"].append(float(np.nanmean(fits)))
    h["best_parts"].append(state["best"].get("parts", {}))
    h["sigma"].append(float(es.sigma))
    h["mean_weights"].append([float(x) for x in es.mean])
    h["verdicts"].append([s.verdicts for s in scored])
    h["expected_verdicts"].append(scored[0].expected)
    h["candidates"].append([[float(x) for x in c] + [s.fit] for c, s in zip(candidates, scored, strict=True)])


def _result(
    cfg: Config,
    basis: TraitBasis,
    state: dict[str, Any],
    mean_w: np.ndarray,
    mean_s: Scored,
    zero_s: Scored,
    run_digest: str,
) -> dict[str, Any]:
    traits = basis.traits
    h = state["history"]
    best_w = dict(zip(traits, map(float, state["best"]["weights"]), strict=True))
    mean = dict(zip(traits, map(float, mean_w), strict=True))
    select = cfg.optimize.select
    chosen = (
        (mean, mean_s.fit, mean_s.parts)
        if select == "mean"
        else (best_w, state["best"]["score"], state["best"].get("parts", {}))
    )
    missing = sum(
        state["history"]["expected_verdicts"][i] * len(v) - sum(v) for i, v in enumerate(h["verdicts"])
    )
    return {
        "persona_id": cfg.optimize.persona_id,
        "layer": basis.layer,
        "alpha": cfg.steering.alpha,
        # What the run reports and serves (PersonaRecord.weights): the optimize.select weights.
        "selected": select,
        "weights": chosen[0],
        "score": chosen[1],
        "parts": chosen[2],
        "best_weights": best_w,
        "best_score": state["best"]["score"],
        "num_iterations": state["iteration"],
        "num_evaluations": state["evaluations"],
        "optimization_history": {k: h[k] for k in ("iterations", "best_scores", "best_weights")},
        "mean_weights": mean,
        "best_parts": state["best"].get("parts", {}),
        "mean_score": mean_s.fit,
        "mean_parts": mean_s.parts,
        "baseline_score": zero_s.fit,
        "baseline_parts": zero_s.parts,
        "missing_verdicts": int(missing),
        "history": {
            k: h[k]
            for k in (
                "generation_best",
                "generation_mean",
                "sigma",
                "mean_weights",
                "verdicts",
                "candidates",
                "state_digest",
                "best_parts",
            )
        },
        "traits": traits,
        "judge": cfg.judge.backend,
        "vector_method": basis.method,
        "residual_scale": basis.scale,
        "fingerprint": basis.fingerprint,
        "basis_digest": basis.digest(),
        "config_digest": run_digest,
        "config": cfg.to_dict(),
        "version": __version__,
    }
