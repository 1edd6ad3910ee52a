"""The ``vectors`` and ``optimize`` stages timed cold, with a warm cache, and fully warm."""

from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from persona_steering.bench.ahead import bench_ahead, bench_ahead_evaluate
from persona_steering.bench.generation import sync
from persona_steering.bench.settings import BenchSettings
from persona_steering.config import Config, JudgeConfig
from persona_steering.runtime import Runtime
from persona_steering.traits import load_prompts

STAGE_TRAITS = 2  # the fewest CMA-ES accepts (it needs two dimensions)
STAGE_PROMPTS = 2
STAGE_ITERATIONS = 2


def bench_stages(cfg: Config, rt: Runtime, settings: BenchSettings, log: Any = print) -> dict[str, Any]:
    """``vectors`` and ``optimize`` on the loaded model, each run three times in a scratch folder:
    cold (empty cache, no outputs), cache-warm (outputs deleted, cache kept) and warm (nothing
    deleted: the re-run a user makes). Counts the model's forward passes in each run; a warm run
    must make none. Small on purpose (two traits, one instruction pair per question; two
    iterations on two prompts with the offline embedding judge), so that it takes about a minute.
    """
    from persona_steering.extraction import run_vectors
    from persona_steering.optimize import run_optimize

    traits = list(cfg.vectors.traits[:STAGE_TRAITS])
    persona = cfg.optimize.persona_id or next(iter(sorted(_persona_ids(cfg.optimize.persona_dir))), None)
    out: dict[str, Any] = {"traits": traits, "persona": persona}
    with tempfile.TemporaryDirectory(prefix="persona-steering-bench-") as scratch:
        stage_cfg = _stage_config(cfg, settings, traits, persona, Path(scratch))
        out["settings"] = {
            "pairs_per_question": stage_cfg.vectors.pairs_per_question,
            "max_new_tokens": stage_cfg.generation.max_new_tokens,
            "population": stage_cfg.optimize.population_size,
            "num_prompts": stage_cfg.optimize.num_prompts,
            "max_iterations": stage_cfg.optimize.max_iterations,
            "judge": stage_cfg.judge.backend,
        }
        stages: dict[str, tuple[Callable[..., Any], str]] = {
            "vectors": (run_vectors, stage_cfg.vectors.out_dir)
        }
        if persona is not None and len(traits) >= STAGE_TRAITS:
            stages["optimize"] = (run_optimize, stage_cfg.optimize.save_dir)
        else:
            log("  optimize: skipped (needs a persona folder and two traits)")
        for name, (stage, outputs) in stages.items():
            run = functools.partial(stage, stage_cfg, rt, log=_quiet)
            out[name] = _cold_warm(rt, run, Path(outputs), log, name)
        # The same cold vectors run recording while generating (vectors.one_pass), in a cache of its
        # own; it runs after the two-pass run, which so bears any warm-up.
        one_pass = dataclasses.replace(
            stage_cfg,
            cache_dir=str(Path(scratch) / "cache-one-pass"),
            vectors=dataclasses.replace(
                stage_cfg.vectors, one_pass=True, out_dir=str(Path(scratch) / "vectors-one-pass")
            ),
        )
        seconds, forwards = _timed(rt, functools.partial(run_vectors, one_pass, rt, log=_quiet))
        log(f"  vectors   cold, one pass: {seconds:7.2f} s, {forwards} forward passes")
        vec = out["vectors"]
        vec |= {"cold_one_pass_s": seconds, "cold_one_pass_forwards": forwards}
        vec["one_pass_speedup"] = vec["cold_s"] / max(seconds, 1e-9)
        if "optimize" in stages:  # its cache holds the persona's fit context: one population, judged two ways
            ahead_cfg = dataclasses.replace(
                stage_cfg, optimize=dataclasses.replace(stage_cfg.optimize, num_prompts=settings.num_prompts)
            )
            out["judge_ahead"] = bench_ahead(ahead_cfg, rt, Path(scratch), settings.bench.judge_delay, log)
            out["judge_ahead"]["evaluate"] = bench_ahead_evaluate(
                dataclasses.replace(
                    stage_cfg,
                    evaluate=dataclasses.replace(stage_cfg.evaluate, num_prompts=settings.num_prompts),
                ),
                rt,
                Path(scratch),
                settings.bench.judge_delay,
                log,
            )
    out.setdefault("optimize", None)
    out.setdefault("judge_ahead", None)
    return out


def _quiet(*_: Any, **__: Any) -> None:
    pass


def _persona_ids(persona_dir: str) -> list[str]:
    folder = Path(persona_dir)
    return (
        [p.name for p in folder.iterdir() if (p / "persona_profile.txt").is_file()] if folder.is_dir() else []
    )


def _stage_config(
    cfg: Config, settings: BenchSettings, traits: list[str], persona: str | None, scratch: Path
) -> Config:
    """The user's config with every output and the cache moved into ``scratch``, and small sizes."""
    prompts = len(load_prompts(cfg.optimize.prompts_file, "train"))
    vectors = str(scratch / "vectors")
    return dataclasses.replace(
        cfg,
        cache_dir=str(scratch / "cache"),
        traits=traits,
        generation=dataclasses.replace(
            cfg.generation,
            max_new_tokens=settings.max_new_tokens,
            temperature=0.0,
            max_batch=cfg.generation.max_batch,
        ),
        vectors=dataclasses.replace(
            cfg.vectors,
            traits=traits,
            pairs_per_question=1,
            filter_with_judge=False,
            out_dir=vectors,
            one_pass=False,  # the one-pass run is timed beside it
        ),
        steering=dataclasses.replace(cfg.steering, trait_vector_dir=vectors),
        judge=JudgeConfig(backend="embedding"),  # offline: a benchmark makes no API calls
        optimize=dataclasses.replace(
            cfg.optimize,
            persona_id=persona,
            num_prompts=min(STAGE_PROMPTS, prompts),
            max_iterations=STAGE_ITERATIONS,
            population_size=settings.population,
            save_dir=str(scratch / "optimize"),
            restart=False,
            layers=None,
            personas=None,
        ),
    )


def _cold_warm(rt: Runtime, stage: Callable[[], Any], outputs: Path, log: Any, name: str) -> dict[str, Any]:
    """Seconds and model forward passes of a stage run cold, cache-warm (``outputs`` deleted) and warm."""
    out: dict[str, Any] = {}
    for label in ("cold", "cache_warm", "warm"):
        if label == "cache_warm":
            shutil.rmtree(outputs)
        out[f"{label}_s"], out[f"{label}_forwards"] = _timed(rt, stage)
        log(f"  {name:<9} {label:<10}: {out[f'{label}_s']:7.2f} s, {out[f'{label}_forwards']} forward passes")
    out["cold_over_warm"] = out["cold_s"] / max(out["warm_s"], 1e-9)
    return out


def _timed(rt: Runtime, stage: Callable[[], Any]) -> tuple[float, int]:
    """Seconds a stage run takes and the model forward passes it makes."""
    forwards = [0]

    def count(*_: Any) -> None:
        forwards[0] += 1

    handle = rt.model.register_forward_pre_hook(count)
    try:
        sync(rt)
        started = time.perf_counter()
        stage()
        sync(rt)
        return time.perf_counter() - started, forwards[0]
    finally:
        handle.remove()
