"""Benchmark: one CMA-ES generation's answers three ways, the extraction forward, and judge fan-out.

``run_bench(cfg, settings)`` is the stage behind ``persona-steering bench`` (``make bench``). One
model, one prompt set, one population of candidate weight vectors, greedy decoding, no cache:

- ``seed-loop``: one candidate x one prompt per ``model.generate`` call, a steering hook
  registered and removed around each, as an implementation that loops does;
- ``per-candidate``: one batched ``generation.generate`` call per candidate (one vector per call);
- ``per-row`` (ours): the whole population in one ``generation.generate`` call, a vector per row,
  the code path of ``optimize.Objective.answers``.

Every method must give the same greedy tokens per row; the run counts matching rows and, when the
model is not float32 (bf16 padding numerics can flip a token), re-runs differing rows in float32.
Expected time at the defaults (P=8, N=10, M=48) on a 2-core CPU: seed-loop ~5 min, the rest ~2 min;
``--quick`` (P=4, N=4, M=16) about 1-2 min.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import platform
import resource
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persona_steering import __version__
from persona_steering.basis import TraitBasis, load_basis
from persona_steering.cache import atomic_write_bytes, atomic_write_json, atomic_write_text, canonical_json
from persona_steering.config import Config, ConfigError, GenerationConfig, JudgeConfig
from persona_steering.extraction import Pair, capture_layers, record_activations
from persona_steering.generation import Request, chat_text, eos_ids, generate, generate_population
from persona_steering.layers import normalize_layer
from persona_steering.runtime import Runtime, load_runtime
from persona_steering.steering import steer
from persona_steering.store import VectorFileError
from persona_steering.traits import load_prompts
from persona_steering.vectors import unit

METHODS = ("seed-loop", "per-candidate", "per-row")
BENCH_KEY_ENV = "PERSONA_STEERING_BENCH_DUMMY_KEY"
"""Variable holding the dummy key of the judge run: never the user's real OPENAI_API_KEY."""


@dataclass
class BenchSettings:
    """What one benchmark run measures."""

    population: int = 8
    """P: candidate weight vectors (one CMA-ES generation)."""
    num_prompts: int = 10
    """N: first training prompts answered by every candidate."""
    max_new_tokens: int = 48
    """M: new tokens per answer (greedy)."""
    repeats: int = 1
    """Timed runs per method (median and spread); the seed-loop dominates the run time."""
    max_batch: int | None = None
    """Rows per forward pass; None = generation.max_batch of the config."""
    out_dir: str = "runs/bench"
    """Where bench.json, bench.md and bench.png go."""
    personas: int = 4
    """Personas for the lockstep measurement (one generate per persona vs one for all)."""
    verdicts: int = 100
    """Judge calls in the fan-out measurement."""
    judge_delay: float = 0.2
    """Seconds the local OpenAI-compatible server waits before each reply."""
    threads: int | None = None
    """torch CPU threads during the run; None = torch's default (one per core)."""
    stages: bool = True
    """Also time the vectors and optimize stages cold, with a warm cache, and fully warm."""

    def __post_init__(self) -> None:
        for name in ("population", "num_prompts", "max_new_tokens", "repeats", "verdicts", "personas"):
            if getattr(self, name) < 1:
                raise ConfigError(f"bench --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_batch", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"bench --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.judge_delay <= 10:
            raise ConfigError(f"bench --judge-delay must be within 0..10 seconds, got {self.judge_delay}")

    @classmethod
    def from_options(cls, quick: bool = False, **given: Any) -> BenchSettings:
        """Defaults (or the --quick ones), then every option the user gave (None = not given)."""
        base = {"population": 4, "num_prompts": 4, "max_new_tokens": 16} if quick else {}
        return cls(**(base | {k: v for k, v in given.items() if v is not None}))


@dataclass
class Timed:
    """One method's repeated timings, outputs of the last repeat, and peak memory."""

    seconds: list[float]
    ids: list[list[int]]  # [rows][generated tokens], rows in candidate-major order
    calls: int  # generate calls
    batches: int  # batched decode loops (forward groups) those calls ran
    peak_memory_mb: float


def run_bench(
    cfg: Config, settings: BenchSettings, rt: Runtime | None = None, log: Any = print
) -> dict[str, Any]:
    """Measure; write ``bench.json``, ``bench.md`` and ``bench.png`` into ``settings.out_dir``; print.

    Args:
        cfg: model, steering (layer, alpha, positions, vectors), traits, prompts file, judge concurrency.
        settings: population, prompts, tokens, repeats, batch size, threads, output folder, judge fan-out.
        rt: an already loaded model (tests); loaded from ``cfg.model`` when None.
        log: where progress and the table go.

    Returns:
        The JSON-safe result written to ``bench.json``.
    """
    prompts = load_prompts(cfg.optimize.prompts_file, "train")
    if settings.num_prompts > len(prompts):
        raise ConfigError(
            f"bench --num-prompts {settings.num_prompts}: {cfg.optimize.prompts_file} has {len(prompts)}"
        )
    load_start = os.getloadavg()[0]  # before our own work adds to it
    with _torch_threads(settings.threads):
        result = _measure(cfg, settings, prompts[: settings.num_prompts], rt, log)
    result["environment"]["load_average"] = {"start": load_start, "end": os.getloadavg()[0]}
    result["busy"] = _busy_note(result["environment"])
    table = markdown_table(result)
    _write_outputs(Path(settings.out_dir), result, table)
    log(table)
    log(f"wrote {Path(settings.out_dir) / 'bench.json'}, bench.md, bench.png")
    return result


def _measure(
    cfg: Config, settings: BenchSettings, prompts: list[str], rt: Runtime | None, log: Any
) -> dict[str, Any]:
    """Every measurement of one run, as the JSON-safe result (without the load check)."""
    rt = rt or load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
    max_batch = settings.max_batch or cfg.generation.max_batch
    gen = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, temperature=0.0, max_batch=max_batch
    )  # greedy
    texts = [chat_text(rt.tokenizer, Request(p)) for p in prompts]
    basis, source = candidate_basis(cfg, rt, texts)
    weights = candidate_weights(cfg, settings.population, len(basis.traits))  # [P, k]
    deltas = basis.deltas(torch.as_tensor(weights, dtype=torch.float32), cfg.steering.alpha)  # [P, hidden]
    log(
        f"bench: {rt.model_id} ({rt.model.dtype}, {_device_name(rt)}, "
        f"{torch.get_num_threads()} threads), {source}"
    )
    log(
        f"bench: P={settings.population} candidates x N={len(prompts)} prompts x M={gen.max_new_tokens} "
        f"tokens, {settings.repeats} repeat(s); the seed-loop is the slow part (~5 min at the defaults "
        "on 2 idle CPU cores)"
    )
    run = _Generation(rt, gen, prompts, texts, deltas, basis.layer, cfg.steering.positions, cfg.seed)
    run.warm_up()
    timed = _time_methods(run, settings.repeats, log)
    identical = {m: _count_identical(timed["seed-loop"].ids, timed[m].ids) for m in METHODS[1:]}
    extra = {
        "max_batch": gen.max_batch,
        "layer": basis.layer,
        "alpha": cfg.steering.alpha,
        "positions": cfg.steering.positions,
        "seed": cfg.seed,
        "traits": basis.traits,
    }
    prompt_tokens = sum(len(rt.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return {
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": _environment(rt),
        "settings": dataclasses.asdict(settings) | extra,
        "vectors": source,
        "prompt_tokens": prompt_tokens * len(deltas),
        "methods": _method_summary(timed),
        "identical": {m: {"rows": identical[m], "of": len(run.rows)} for m in METHODS[1:]},
        "float32_recheck": _float32_recheck(cfg, run, timed) if rt.model.dtype != torch.float32 else None,
        "extraction": _bench_extraction(run, timed["per-row"].ids),
        "lockstep": _bench_lockstep(run, settings.personas),
        "judge": bench_judge(cfg.judge, settings.verdicts, settings.judge_delay, log),
        "stages": bench_stages(cfg, rt, settings, log) if settings.stages else None,
    }


def _busy_note(env: dict[str, Any]) -> str | None:
    """A warning when other jobs shared the CPU: with more runnable threads than cores, OpenMP's
    multi-threaded kernels (batched matmuls) wait on descheduled threads and slow down many times
    over (measured here: 92 s with 2 threads against 5 s with 1), while single-row decoding hardly
    does, so the ratios would mislead."""
    if env["device_type"] != "cpu" or not env["cpus"]:
        return None
    load = env["load_average"]
    others = max(load["start"], load["end"] - env["threads"])
    if others < env["cpus"] / 2:
        return None
    return (
        f"WARNING: the CPU was busy with other jobs (load average {load['start']:.1f} at start, "
        f"{load['end']:.1f} at end, {env['cpus']} cores): batched timings suffer most; rerun on an idle "
        "machine or with --threads 1"
    )


def candidate_weights(cfg: Config, population: int, k: int) -> np.ndarray:
    """[P, k] weights like a first CMA-ES generation: N(0, sigma0) around zero, within the bounds."""
    rng = np.random.default_rng(cfg.seed)
    w = rng.normal(0.0, cfg.optimize.sigma0, size=(population, k))
    return np.clip(w, -cfg.optimize.bound, cfg.optimize.bound)


def candidate_basis(cfg: Config, rt: Runtime, texts: list[str]) -> tuple[TraitBasis, str]:
    """The model's trait basis, or random unit directions of its hidden size when it has no vectors.

    Returns:
        (basis, a sentence saying which one and why).
    """
    try:
        basis = load_basis(
            cfg.steering.trait_vector_dir,
            rt.slug,
            cfg.traits,
            cfg.steering.layer,
            cfg.steering.vector_method,
            cfg.steering.summary,
            hidden_size=rt.hidden_size,
            fingerprint=rt.fingerprint,
            kind=cfg.steering.basis,
        )
        return basis, f"trait vectors {', '.join(cfg.traits)} at layer {basis.layer}"
    except VectorFileError:
        pass
    row = normalize_layer(cfg.steering.layer, rt.num_layers)
    g = torch.Generator().manual_seed(cfg.seed)
    directions = unit(torch.randn(len(cfg.traits), rt.hidden_size, generator=g))  # [k, hidden]
    # Same units as real vectors: scale = the layer's mean residual norm, measured on the prompts.
    basis = TraitBasis(
        list(cfg.traits),
        row,
        directions,
        _residual_norm(rt, texts, row),
        "random",
        cfg.steering.summary,
        rt.fingerprint,
        rt.num_layers,
    )
    note = (
        f"NO trait vectors for this model in {cfg.steering.trait_vector_dir}/{rt.slug}: random unit "
        f"directions at layer {row} instead (timings hold; run `make vectors` for real ones)"
    )
    return basis, note


@dataclass
class _Generation:
    """The population to answer and the three ways of answering it."""

    rt: Runtime
    gen: GenerationConfig
    prompts: list[str]
    texts: list[str]
    deltas: torch.Tensor  # [P, hidden]
    layer: int
    positions: str
    seed: int

    @property
    def rows(self) -> list[tuple[int, int]]:
        """(candidate, prompt) per row, candidate-major as in ``Objective.answers``."""
        return [(c, p) for c in range(len(self.deltas)) for p in range(len(self.prompts))]

    def seed_loop(self) -> tuple[list[list[int]], int, int]:
        """(ids per row, generate calls, batches) for one candidate x one prompt per call."""
        return (
            [self.single_row(self.texts[p], self.deltas[c]) for c, p in self.rows],
            len(self.rows),
            len(self.rows),
        )

    def per_candidate(self) -> tuple[list[list[int]], int, int]:
        """(ids per row, generate calls, batches) for one call per candidate, its vector on every row."""
        n = len(self.prompts)
        out: list[list[int]] = []
        for c in range(len(self.deltas)):
            out.extend(self._generate([(c, p) for p in range(n)], self.gen))
        return out, len(self.deltas), len(self.deltas) * -(-n // self.gen.max_batch)

    def per_row(self, rows: Sequence[tuple[int, int]] | None = None) -> tuple[list[list[int]], int, int]:
        """What optimisation does (``generation.generate_population``): every row in one call."""
        if rows is not None:  # a subset (the float32 re-check): same code path, chosen rows
            return self._generate(rows, self.gen), 1, -(-len(rows) // self.gen.max_batch)
        answers = generate_population(
            self.rt, self.prompts, self.gen, self.deltas, self.layer, self.positions, seed=self.seed
        )
        ids = [a.ids for cand in answers for a in cand]
        return ids, 1, -(-len(ids) // self.gen.max_batch)

    def _generate(self, rows: Sequence[tuple[int, int]], gen: GenerationConfig) -> list[list[int]]:
        """One uncached ``generation.generate`` call over (candidate, prompt) rows, a vector per row."""
        deltas = torch.stack([self.deltas[c] for c, _ in rows])  # [rows, hidden]
        requests = [Request(self.prompts[p]) for _, p in rows]
        answers = generate(
            self.rt,
            requests,
            gen,
            deltas=deltas,
            layer=self.layer,
            positions=self.positions,
            cache=None,
            seed=self.seed,
        )
        return [a.ids for a in answers]

    @torch.inference_mode()
    def single_row(self, text: str, delta: torch.Tensor, max_new_tokens: int | None = None) -> list[int]:
        """One prompt, one vector, plain HF ``generate``: no padding, hook on for this call only."""
        rt = self.rt
        ids = rt.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = ids.to(rt.device)  # [1, prompt_len]
        mask = torch.ones_like(ids)
        eos = sorted(eos_ids(rt))
        with steer(rt.model, self.layer, delta[None], self.positions, attention_mask=mask), rt.autocast():
            out = rt.model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens or self.gen.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=rt.tokenizer.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        new = out[0, ids.shape[1] :].tolist()
        # generation.generate returns the tokens before the first end-of-turn: cut the same way.
        return next((new[:i] for i, t in enumerate(new) if t in eos), new)

    def warm_up(self) -> None:
        """One small call of each kind, untimed: first-call allocations and kernel selection."""
        self._generate(self.rows[:2], dataclasses.replace(self.gen, max_new_tokens=2))
        self.single_row(self.texts[0], self.deltas[0], max_new_tokens=2)


def _time_methods(run: _Generation, repeats: int, log: Any) -> dict[str, Timed]:
    """Each method ``repeats`` times, interleaved so that slow drift of the machine hits all alike."""
    calls: dict[str, Callable[[], tuple[list[list[int]], int, int]]] = {
        "seed-loop": run.seed_loop,
        "per-candidate": run.per_candidate,
        "per-row": run.per_row,
    }
    timed: dict[str, Timed] = {}
    for r in range(repeats):
        for name, fn in calls.items():
            with _peak_memory(run.rt) as peak:
                started = time.perf_counter()
                ids, n_calls, n_batches = fn()
                _sync(run.rt)
                seconds = time.perf_counter() - started
            log(f"  {name:<14} repeat {r + 1}/{repeats}: {seconds:7.2f} s")
            prev = timed.get(name)
            timed[name] = Timed(
                (prev.seconds if prev else []) + [seconds],
                ids,
                n_calls,
                n_batches,
                max(peak[0], prev.peak_memory_mb if prev else 0.0),
            )
    return timed


def _method_summary(timed: dict[str, Timed]) -> dict[str, dict[str, Any]]:
    """Median, spread, speed-up over the seed-loop, tokens and memory per method."""
    reference = statistics.median(timed["seed-loop"].seconds)
    out = {}
    for name, t in timed.items():
        median = statistics.median(t.seconds)
        tokens = sum(len(ids) for ids in t.ids)
        out[name] = {
            "seconds": t.seconds,
            "median_s": median,
            "spread_s": max(t.seconds) - min(t.seconds),
            "speedup_vs_seed_loop": reference / median,
            "calls": t.calls,
            "batches": t.batches,
            "rows": len(t.ids),
            "generated_tokens": tokens,
            "tokens_per_s": tokens / median,
            "peak_memory_mb": t.peak_memory_mb,
        }
    return out


def _count_identical(reference: list[list[int]], other: list[list[int]]) -> int:
    return sum(a == b for a, b in zip(reference, other, strict=True))


def _float32_recheck(cfg: Config, run: _Generation, timed: dict[str, Timed]) -> dict[str, Any] | None:
    """Rows where a batched method differs from the seed-loop, re-run both ways in float32.

    bf16 left-padded batches can flip a greedy token before any steering (see docs/FACTS.md); in float32
    they must agree, so a float32 mismatch would be a real bug.
    """
    seed_ids = timed["seed-loop"].ids
    differing = sorted({i for m in METHODS[1:] for i, ids in enumerate(timed[m].ids) if ids != seed_ids[i]})
    if not differing:
        return {"rows": 0, "identical_in_float32": 0}
    rt32 = load_runtime(dataclasses.replace(cfg.model, precision="32-true"), cfg.cache_dir, cfg.seed)
    run32 = dataclasses.replace(run, rt=rt32)
    rows = [run.rows[i] for i in differing]
    batched, _, _ = run32.per_row(rows)
    single = [run32.single_row(run.texts[p], run.deltas[c]) for c, p in rows]
    return {
        "rows": len(rows),
        "identical_in_float32": _count_identical(single, batched),
        "row_indices": differing,
    }


@torch.inference_mode()
def _residual_norm(rt: Runtime, texts: list[str], row: int) -> float:
    """Mean residual-stream norm at a hidden_states row over the prompts' tokens (first token left out:
    its norm is ~100x the others and would dominate, see docs/FACTS.md)."""
    enc = rt.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"].to(rt.device), enc["attention_mask"].to(rt.device)  # [N, len]
    with capture_layers(rt.model) as states, rt.autocast():
        rt.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    hidden = states[row].float()  # [N, len, hidden]
    keep = mask.clone()
    keep[torch.arange(len(texts)), mask.argmax(dim=-1)] = 0  # each row's first real token
    return float(hidden.norm(dim=-1)[keep.bool()].mean())


LOCKSTEP_PROMPTS = 2


def _bench_lockstep(run: _Generation, personas: int) -> dict[str, Any]:
    """One iteration's generation for several personas: a ``generate_population`` call per persona
    (each optimised alone) against one call carrying every persona's rows (``optimize --personas``).
    Each persona gets its own candidates: the population's vectors rescaled by a persona factor."""
    factors = np.random.default_rng(run.seed + 7).uniform(0.5, 1.5, personas)
    groups = [run.deltas * float(f) for f in factors]  # [P, hidden] each
    # Two prompts keep this measurement to a minute or two on a CPU: at the full N the alone/lockstep
    # pair costs 2 x personas x a per-row generation (about 8 minutes here at the defaults).
    prompts = run.prompts[:LOCKSTEP_PROMPTS]

    def alone() -> None:
        for g in groups:
            generate_population(run.rt, prompts, run.gen, g, run.layer, run.positions, seed=run.seed)

    def together() -> None:
        all_rows = torch.cat(groups)
        generate_population(run.rt, prompts, run.gen, all_rows, run.layer, run.positions, seed=run.seed)

    seconds = {}
    for name, fn in (("alone", alone), ("lockstep", together)):
        _sync(run.rt)
        started = time.perf_counter()
        fn()
        _sync(run.rt)
        seconds[name] = time.perf_counter() - started
    return {
        "personas": personas,
        "prompts": len(prompts),
        "rows": personas * len(run.deltas) * len(prompts),
        "alone_s": seconds["alone"],
        "lockstep_s": seconds["lockstep"],
        "speedup": seconds["alone"] / seconds["lockstep"],
    }


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
    out.setdefault("optimize", None)
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
            max_batch=settings.max_batch or cfg.generation.max_batch,
        ),
        vectors=dataclasses.replace(
            cfg.vectors, traits=traits, pairs_per_question=1, filter_with_judge=False, out_dir=vectors
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
    forwards = [0]

    def count(*_: Any) -> None:
        forwards[0] += 1

    out: dict[str, Any] = {}
    handle = rt.model.register_forward_pre_hook(count)
    try:
        for label in ("cold", "cache_warm", "warm"):
            if label == "cache_warm":
                shutil.rmtree(outputs)
            forwards[0] = 0
            _sync(rt)
            started = time.perf_counter()
            stage()
            _sync(rt)
            out[f"{label}_s"] = time.perf_counter() - started
            out[f"{label}_forwards"] = forwards[0]
            log(f"  {name:<9} {label:<10}: {out[f'{label}_s']:7.2f} s, {forwards[0]} forward passes")
    finally:
        handle.remove()
    out["cold_over_warm"] = out["cold_s"] / max(out["warm_s"], 1e-9)
    return out


def _bench_extraction(run: _Generation, answers: list[list[int]]) -> dict[str, Any]:
    """The all-layer recording forward over the per-row answers: tokens per second."""
    rows = [
        Pair(run.prompts[p], "", "", run.texts[p], tuple(ids))
        for (_, p), ids in zip(run.rows, answers, strict=True)
    ]
    tokens = sum(
        len(run.rt.tokenizer(r.prompt_text, add_special_tokens=False)["input_ids"]) + len(r.answer_ids)
        for r in rows
    )
    started = time.perf_counter()
    record_activations(run.rt, rows, run.gen.max_batch)
    _sync(run.rt)
    seconds = time.perf_counter() - started
    return {"rows": len(rows), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def bench_judge(judge_cfg: JudgeConfig, verdicts: int, delay: float, log: Any = print) -> dict[str, Any]:
    """``verdicts`` OpenAIJudge calls against a local server that answers after ``delay`` seconds,
    at the configured concurrency and one at a time. The dummy key lives in the environment only
    for this call."""
    from persona_steering.judges import Query
    from persona_steering.judges.openai import OpenAIJudge

    queries = [Query("coherence", f"question {i}", f"answer {i}") for i in range(verdicts)]
    out: dict[str, Any] = {"verdicts": verdicts, "delay_s": delay, "concurrency": judge_cfg.concurrency}
    with (
        _DelayedServer(
            delay, max_requests=4 * verdicts, max_seconds=60 + 3 * verdicts * (delay + 0.5)
        ) as server,
        _env(BENCH_KEY_ENV, "sk-bench-dummy"),
    ):
        for label, concurrency in (("ours", judge_cfg.concurrency), ("one_at_a_time", 1)):
            jc = dataclasses.replace(
                judge_cfg,
                backend="openai",
                model="bench",
                base_url=server.base_url,
                api_key_env=BENCH_KEY_ENV,
                concurrency=concurrency,
                timeout=30.0,
                max_attempts=2,
            )
            judge = OpenAIJudge(jc, env_file=os.devnull)
            started = time.perf_counter()
            got = judge.judge(queries, None)
            out[f"{label}_s"] = time.perf_counter() - started
            out[f"{label}_ok"] = sum(v.ok for v in got)
            log(f"  judge {label:<14} concurrency {concurrency}: {out[f'{label}_s']:7.2f} s")
    out["speedup"] = out["one_at_a_time_s"] / out["ours_s"]
    return out


def markdown_table(result: dict[str, Any]) -> str:
    """The results as Markdown tables a user can paste into an issue."""
    s, env, j, ex = result["settings"], result["environment"], result["judge"], result["extraction"]
    lock = result["lockstep"]
    lines = [
        f"**persona-steering bench** {result['created']}: {env['model_id']} ({env['dtype']}) on "
        f"{env['device']}, torch {env['torch']}, {env['threads']} threads",
        f"P={s['population']} candidates x N={s['num_prompts']} prompts x M={s['max_new_tokens']} new "
        f"tokens, greedy, layer {s['layer']}, max_batch {s['max_batch']}, {s['repeats']} repeat(s), "
        f"no cache; {result['vectors']}",
        *([f"**{result['busy']}**"] if result.get("busy") else []),
        "",
        _md_row(
            [
                "method",
                "calls",
                "batches",
                "rows",
                "seconds (median)",
                "spread",
                "x seed-loop",
                "new tokens",
                "tokens/s",
                "peak MB",
                "same tokens",
            ]
        ),
        _md_row(["---"] + ["---:"] * 10),
    ]
    for name in METHODS:
        m = result["methods"][name]
        same = result["identical"].get(name)
        lines.append(
            _md_row(
                [
                    f"{name} (ours)" if name == "per-row" else name,
                    m["calls"],
                    m["batches"],
                    m["rows"],
                    f"{m['median_s']:.2f}",
                    f"{m['spread_s']:.2f}",
                    f"{m['speedup_vs_seed_loop']:.1f}x",
                    m["generated_tokens"],
                    f"{m['tokens_per_s']:.1f}",
                    f"{m['peak_memory_mb']:.0f}",
                    f"{same['rows']}/{same['of']}" if same else "reference",
                ]
            )
        )
    if (r := result["float32_recheck"]) and r["rows"]:
        lines.append(
            f"\nfloat32 re-run of the {r['rows']} differing row(s): {r['identical_in_float32']} identical"
        )
    memory = "max allocated during the method" if env["device_type"] == "cuda" else "process max RSS so far"
    lines += [
        "",
        f"peak MB: {memory}. Prompt tokens {result['prompt_tokens']}; all-layer extraction forward: "
        f"{ex['rows']} rows, {ex['tokens']} tokens in {ex['seconds']:.2f} s = "
        f"{ex['tokens_per_s']:.0f} tokens/s",
        "",
        f"personas in lockstep ({lock['personas']} personas x P x {lock['prompts']} prompts = "
        f"{lock['rows']} rows): "
        f"one generate per persona {lock['alone_s']:.2f} s, one for all "
        f"{lock['lockstep_s']:.2f} s = {lock['speedup']:.1f}x",
        "",
        *_stages_table(result.get("stages")),
        _md_row(
            [
                f"judge fan-out ({j['verdicts']} verdicts, server delay {j['delay_s']} s)",
                "seconds",
                "verdicts ok",
                "x one at a time",
            ]
        ),
        _md_row(["---", "---:", "---:", "---:"]),
        _md_row(
            ["one at a time (concurrency 1)", f"{j['one_at_a_time_s']:.2f}", j["one_at_a_time_ok"], "1.0x"]
        ),
        _md_row(
            [
                f"ours (concurrency {j['concurrency']})",
                f"{j['ours_s']:.2f}",
                j["ours_ok"],
                f"{j['speedup']:.1f}x",
            ]
        ),
    ]
    return "\n".join(lines) + "\n"


def _stages_table(stages: dict[str, Any] | None) -> list[str]:
    """Cold, cache-warm and warm stage runs as Markdown lines (none when not measured)."""
    if not stages:
        return []
    st = stages["settings"]
    lines = [
        f"stages in a scratch folder ({', '.join(stages['traits'])}; vectors: {st['pairs_per_question']} "
        f"pair per question; optimize {stages['persona']}: {st['max_iterations']} iterations x "
        f"{st['population']} candidates x {st['num_prompts']} prompts, {st['judge']} judge; "
        f"M={st['max_new_tokens']}). cache-warm: outputs deleted, cache kept; warm: the plain re-run",
        "",
        _md_row(
            ["stage", "cold s", "cache-warm s", "warm s", "forwards cold / cache-warm / warm", "cold / warm"]
        ),
        _md_row(["---", "---:", "---:", "---:", "---:", "---:"]),
    ]
    for name in ("vectors", "optimize"):
        r = stages.get(name)
        if r is None:
            lines.append(_md_row([name, "skipped", "", "", "", ""]))
            continue
        lines.append(
            _md_row(
                [
                    name,
                    f"{r['cold_s']:.2f}",
                    f"{r['cache_warm_s']:.2f}",
                    f"{r['warm_s']:.3f}",
                    f"{r['cold_forwards']} / {r['cache_warm_forwards']} / {r['warm_forwards']}",
                    f"{r['cold_over_warm']:.0f}x",
                ]
            )
        )
    return [*lines, ""]


def _md_row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _write_outputs(out_dir: Path, result: dict[str, Any], table: str) -> None:
    canonical_json(result)  # refuse NaN or non-JSON values before anything is written
    atomic_write_json(out_dir / "bench.json", result)
    atomic_write_text(out_dir / "bench.md", table)
    atomic_write_bytes(out_dir / "bench.png", _plot(result))


def _plot(result: dict[str, Any]) -> bytes:
    """PNG: seconds per generation method and per judge mode, speed-ups written on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, j = result["methods"], result["judge"]
    stages = result.get("stages")
    ratios = [3, 2, 3] if stages else [3, 2]
    fig, axes = plt.subplots(
        1, len(ratios), figsize=(5 * len(ratios) - 4, 4), gridspec_kw={"width_ratios": ratios}
    )
    ax1, ax2 = axes[:2]
    panels = (
        (
            ax1,
            list(METHODS),
            [methods[m]["median_s"] for m in METHODS],
            [methods[m]["speedup_vs_seed_loop"] for m in METHODS],
            "one CMA-ES generation (greedy)",
        ),
        (
            ax2,
            ["one at a time", "ours"],
            [j["one_at_a_time_s"], j["ours_s"]],
            [1.0, j["speedup"]],
            f"{j['verdicts']} judge verdicts",
        ),
    )
    for ax, labels, seconds, ratios, title in panels:
        # Grey for the one-at-a-time reference, orange for ours, blue for what lies between.
        colors = ["#999999", *["#6699cc"] * (len(labels) - 2), "#cc6633"]
        bars = ax.bar(labels, seconds, color=colors)
        for bar, ratio in zip(bars, ratios, strict=True):
            ax.annotate(
                f"{ratio:.1f}x",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=9,
            )
        ax.set(ylabel="seconds", title=title)
    if stages:
        _plot_stages(axes[2], stages)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _plot_stages(ax: Any, stages: dict[str, Any]) -> None:
    """Grouped bars, log scale: each stage cold, cache-warm and warm."""
    names = [n for n in ("vectors", "optimize") if stages.get(n)]
    runs = (("cold", "#999999"), ("cache_warm", "#6699cc"), ("warm", "#cc6633"))
    width = 0.27
    for j, (label, color) in enumerate(runs):
        xs = [i + (j - 1) * width for i in range(len(names))]
        ax.bar(
            xs, [stages[n][f"{label}_s"] for n in names], width, color=color, label=label.replace("_", "-")
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set(ylabel="seconds (log)", title="stage re-runs")
    ax.legend(fontsize=8)


def _environment(rt: Runtime) -> dict[str, Any]:
    import transformers

    return {
        "model_id": rt.model_id,
        "fingerprint": rt.fingerprint,
        "dtype": str(rt.model.dtype).removeprefix("torch."),
        "device": _device_name(rt),
        "device_type": rt.device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _device_name(rt: Runtime) -> str:
    if rt.device.type == "cuda":
        return torch.cuda.get_device_name(rt.device)
    return f"{rt.device.type} ({os.cpu_count()} cores, {platform.machine()})"


def _sync(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)  # kernels run asynchronously: stop the clock after they finish


@contextmanager
def _peak_memory(rt: Runtime) -> Iterator[list[float]]:
    """Yields a one-item list filled on exit: peak MB. On CUDA, allocated memory during the block;
    on CPU, the process's max RSS so far (getrusage cannot be reset, so it never goes down)."""
    peak = [0.0]
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    try:
        yield peak
    finally:
        if rt.device.type == "cuda":
            peak[0] = torch.cuda.max_memory_allocated(rt.device) / 2**20
        else:
            peak[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set for the block only (unchanged when None)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the block only."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class _DelayedServer:
    """A minimal OpenAI-compatible chat endpoint on 127.0.0.1 that replies "90" after ``delay`` s.

    Bounded: after ``max_requests`` requests or ``max_seconds`` it answers 503, and it stops (waking
    any sleeping handler) when the block ends.
    """

    def __init__(self, delay: float, max_requests: int, max_seconds: float) -> None:
        self.delay, self.max_requests, self.deadline = delay, max_requests, time.monotonic() + max_seconds
        self.count = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _delayed_handler(self))
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def admit(self) -> bool:
        with self.lock:
            self.count += 1
            return self.count <= self.max_requests and time.monotonic() < self.deadline

    def __enter__(self) -> _DelayedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _delayed_handler(state: _DelayedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no access log on stderr
            pass

        def do_POST(self) -> None:
            request = _json_body(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if not state.admit():
                return self._send(
                    503, {"error": {"message": "bench server budget spent", "type": "server_error"}}
                )
            state.stop.wait(state.delay)
            token = {"token": "90", "logprob": 0.0, "bytes": [57, 48]}
            logprobs = {"content": [token | {"top_logprobs": [token]}]} if request.get("logprobs") else None
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": "90"},
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
            self._send(
                200,
                {
                    "id": "bench",
                    "object": "chat.completion",
                    "created": 0,
                    "model": "bench",
                    "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                },
            )

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            body = canonical_json(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up: nothing to answer

    return Handler


def _json_body(raw: bytes) -> dict[str, Any]:
    import json

    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
