"""Judging while generating, timed: one CMA-ES population steered and judged cold, the verdicts
computed after the whole population has generated, and block by block while the next block decodes
(``judge.while_generating``). Once with the embedding judge, once with an OpenAI-compatible judge
(the package's fake server) that answers after a delay."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from persona_steering.bench.generation import sync
from persona_steering.bench.judge import BENCH_KEY_ENV, fake_judge, temporary_env
from persona_steering.cache import Cache
from persona_steering.config import Config, JudgeConfig
from persona_steering.fake_openai import FakeOpenAI
from persona_steering.record import PersonaFiles
from persona_steering.runtime import Runtime

AHEAD_BLOCKS = 4
"""Blocks the population is generated in (``generation.max_batch``): the shape of five personas in
lockstep on this CPU (640 rows, at most 256 a block), where a block's verdicts can overlap the next."""


def bench_ahead(cfg: Config, rt: Runtime, scratch: Path, delay: float, log: Any = print) -> dict[str, Any]:
    """Seconds to steer and judge one population, judged after against judged while generating.

    The persona's fit context and unsteered answers go into ``cfg.cache_dir`` first (untimed; the
    optimize stage has usually left them there); each run gets a copy of that cache, so the steered
    answers and the verdicts are computed cold every time, and nothing else is.
    """
    from persona_steering.basis import configured_basis
    from persona_steering.judges.embedding import EmbeddingJudge
    from persona_steering.judges.openai import OpenAIJudge
    from persona_steering.optimize import Objective
    from persona_steering.runtime import identify
    from persona_steering.traits import load_persona, load_prompts

    opt = cfg.optimize
    persona = load_persona(opt.persona_dir, str(opt.persona_id))
    prompts = load_prompts(opt.prompts_file, "train")[: opt.num_prompts]
    ident = identify(cfg.model)
    basis = configured_basis(cfg.steering, cfg.traits, ident.slug, ident.fingerprint)
    population = opt.population_size or 8
    weights = np.random.default_rng(cfg.seed).normal(0.0, opt.sigma0, (population, len(basis.traits)))
    rows = population * len(prompts)
    gen = dataclasses.replace(cfg.generation, max_batch=math.ceil(rows / AHEAD_BLOCKS))
    out: dict[str, Any] = {"rows": rows, "blocks": AHEAD_BLOCKS, "delay_s": delay}
    with Cache(cfg.cache_dir) as cache:  # the fit context and unsteered answers, once, before the copies
        warm = Objective(rt, cfg, basis, persona, prompts, EmbeddingJudge(), cache)
        _ = warm.fit, warm.baselines
    with (
        FakeOpenAI(content="4", delay=delay, max_requests=100 * rows, max_seconds=600) as server,
        temporary_env(BENCH_KEY_ENV, "sk-bench-dummy"),
    ):
        served = fake_judge(server, cfg.judge.concurrency)
        for name in ("embedding", "openai"):
            for ahead in (False, True):
                folder = scratch / f"cache-ahead-{name}-{ahead}"
                shutil.copytree(cfg.cache_dir, folder)
                jc = dataclasses.replace(
                    served if name == "openai" else JudgeConfig(backend="embedding"),
                    while_generating="always" if ahead else "never",
                )
                run_cfg = dataclasses.replace(cfg, cache_dir=str(folder), generation=gen, judge=jc)
                judge = OpenAIJudge(jc, env_file=os.devnull) if name == "openai" else EmbeddingJudge()
                with Cache(folder) as cache:
                    objective = Objective(rt, run_cfg, basis, persona, prompts, judge, cache)
                    _ = objective.fit, objective.baselines  # warm (cached): not what is timed
                    sync(rt)
                    started = time.perf_counter()
                    scored, _ = objective.score(weights)
                    sync(rt)
                    seconds = time.perf_counter() - started
                label = "while_generating" if ahead else "after"
                out.setdefault(name, {})[f"{label}_s"] = seconds
                out[name][f"{label}_fits"] = [s.fit for s in scored]
                log(f"  judge {name:<9} {label:<16}: {seconds:7.2f} s, {rows} rows in {AHEAD_BLOCKS} blocks")
            r = out[name]
            r["same_fits"] = r.pop("after_fits") == r.pop("while_generating_fits")
            r["saved_s"] = r["after_s"] - r["while_generating_s"]
            r["speedup"] = r["after_s"] / max(r["while_generating_s"], 1e-9)
    return out


def bench_ahead_evaluate(
    cfg: Config, rt: Runtime, scratch: Path, delay: float, log: Any = print
) -> dict[str, Any]:
    """Seconds of a cold ``evaluate`` (base, prompt and proposed on ``cfg.evaluate.num_prompts``
    held-out prompts, greedy and sampled) scored by an OpenAI-compatible judge replying after
    ``delay``: judged after all answers against judged while the next block generates.

    ``cfg`` is a finished optimisation's (its result is what ``proposed`` steers with). Each run gets
    a copy of ``cfg.cache_dir``, so its held-out answers and verdicts are computed cold, and of the
    result, so that the evaluation files go to ``scratch``, never beside the user's result.
    """
    from persona_steering.evaluate.run import answer_settings, run_evaluate
    from persona_steering.traits import load_prompts

    methods = ["base", "prompt", "proposed"]
    files = PersonaFiles(Path(cfg.optimize.save_dir), str(cfg.optimize.persona_id))
    prompts = len(load_prompts(cfg.optimize.prompts_file, "heldout")[: cfg.evaluate.num_prompts or None])
    per_set = len(methods) * prompts
    gen = dataclasses.replace(cfg.generation, max_batch=math.ceil(per_set / AHEAD_BLOCKS))
    sets = len(answer_settings(cfg))
    out: dict[str, Any] = {"rows": per_set * sets, "sets": sets, "blocks": AHEAD_BLOCKS, "delay_s": delay}
    with (
        FakeOpenAI(content="4", delay=delay, max_requests=1000 * per_set, max_seconds=600) as server,
        temporary_env(BENCH_KEY_ENV, "sk-bench-dummy"),
    ):
        for ahead in (False, True):
            folder = scratch / f"cache-ahead-evaluate-{ahead}"
            shutil.copytree(cfg.cache_dir, folder)
            save_dir = scratch / f"optimize-ahead-evaluate-{ahead}"
            save_dir.mkdir()
            for path in (files.result, files.axis):
                if path.is_file():
                    shutil.copy2(path, save_dir / path.name)
            jc = dataclasses.replace(
                fake_judge(server, cfg.judge.concurrency), while_generating="always" if ahead else "never"
            )
            run_cfg = dataclasses.replace(
                cfg,
                cache_dir=str(folder),
                generation=gen,
                judge=jc,
                evaluate=dataclasses.replace(cfg.evaluate, methods=methods, judges=["openai"]),
                optimize=dataclasses.replace(cfg.optimize, save_dir=str(save_dir)),
            )
            sync(rt)
            started = time.perf_counter()
            summary = run_evaluate(run_cfg, rt, log=lambda *_: None)
            sync(rt)
            seconds = time.perf_counter() - started
            label = "while_generating" if ahead else "after"
            out[f"{label}_s"] = seconds
            out[f"{label}_scores"] = summary["scores"]
            log(f"  evaluate, judge openai {label:<16}: {seconds:7.2f} s, {out['rows']} answers")
    out["same_scores"] = out.pop("after_scores") == out.pop("while_generating_scores")
    out["saved_s"] = out["after_s"] - out["while_generating_s"]
    out["speedup"] = out["after_s"] / max(out["while_generating_s"], 1e-9)
    return out
