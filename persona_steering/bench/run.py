"""The ``persona-steering bench`` stage (``make bench``): measure, then write bench.json, .md, .png.

Expected time at the defaults (P=8, N=10, M=48) on a 2-core CPU: seed-loop ~5 min, the rest ~2 min;
``--quick`` (P=4, N=4, M=16) about 1-2 min.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from persona_steering import __version__
from persona_steering.bench import render
from persona_steering.bench.generation import (
    METHODS,
    Population,
    bench_compute,
    bench_decoding,
    bench_extraction,
    bench_leave,
    bench_lockstep,
    candidate_basis,
    candidate_weights,
    count_identical,
    float32_recheck,
    method_summary,
    time_methods,
)
from persona_steering.bench.judge import bench_fluency, bench_judge
from persona_steering.bench.settings import BenchSettings
from persona_steering.bench.stages import bench_stages
from persona_steering.cache import atomic_write_json, atomic_write_text, canonical_json
from persona_steering.config import Config, ConfigError
from persona_steering.generation import Request, batch_rows, chat_text
from persona_steering.runtime import Runtime, load_runtime
from persona_steering.traits import load_prompts


def run_bench(cfg: Config, rt: Runtime | None = None, log: Any = print) -> dict[str, Any]:
    """Measure; write ``bench.json``, ``bench.md`` and ``bench.png`` into ``settings.bench.out_dir``; print.

    Args:
        cfg: model, steering (layer, alpha, positions, vectors), traits, prompts file, judge concurrency,
            generation.max_batch, and ``bench``: population, prompts, tokens, repeats, threads, output
            folder, judge fan-out.
        rt: an already loaded model (tests); loaded from ``cfg.model`` when None.
        log: where progress and the table go.

    Returns:
        The JSON-safe result written to ``bench.json``.
    """
    settings = BenchSettings.from_config(cfg)
    prompts = load_prompts(cfg.optimize.prompts_file, "train")
    if settings.num_prompts > len(prompts):
        raise ConfigError(
            f"bench --num-prompts {settings.num_prompts}: {cfg.optimize.prompts_file} has {len(prompts)}"
        )
    load_start = os.getloadavg()[0]  # before our own work adds to it
    with _torch_threads(settings.bench.threads):
        result = _measure(cfg, settings, prompts[: settings.num_prompts], rt, log)
    result["environment"]["load_average"] = {"start": load_start, "end": os.getloadavg()[0]}
    result["busy"] = _busy_note(result["environment"])
    table = render.bench_markdown(result)
    _write_outputs(Path(settings.bench.out_dir), result, table)
    log(table)
    log(f"wrote {Path(settings.bench.out_dir) / 'bench.json'}, bench.md, bench.png")
    return result


def _measure(
    cfg: Config, settings: BenchSettings, prompts: list[str], rt: Runtime | None, log: Any
) -> dict[str, Any]:
    """Every measurement of one run, as the JSON-safe result (without the load check)."""
    rt = rt or load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
    texts = [chat_text(rt.tokenizer, Request(p)) for p in prompts]
    longest = max(len(rt.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    # Resolved here, so the table says how many rows shared a batch (generate resolves it the same way).
    max_batch = batch_rows(rt, cfg.generation.max_batch, longest + settings.max_new_tokens)
    gen = bench_decoding(settings.max_new_tokens, max_batch)
    basis, source = candidate_basis(cfg, rt, texts)
    weights = candidate_weights(cfg, settings.population, len(basis.traits))  # [P, k]
    deltas = basis.deltas(torch.as_tensor(weights, dtype=torch.float32), cfg.steering.alpha)  # [P, hidden]
    log(
        f"bench: {rt.model_id} ({rt.model.dtype}, {_device_name(rt)}, "
        f"{torch.get_num_threads()} threads), {source}"
    )
    log(
        f"bench: P={settings.population} candidates x N={len(prompts)} prompts x M={gen.max_new_tokens} "
        f"tokens, {settings.bench.repeats} repeat(s); the seed-loop is the slow part (~5 min at the defaults "
        "on 2 idle CPU cores)"
    )
    run = Population(rt, gen, prompts, texts, deltas, basis.layer, cfg.steering.positions, cfg.seed)
    run.warm_up()
    timed = time_methods(run, settings.bench.repeats, log)
    identical = {m: count_identical(timed["seed-loop"].ids, timed[m].ids) for m in METHODS[1:]}
    extra = {
        "max_batch": gen.max_batch,
        "max_batch_from_memory": cfg.generation.max_batch is None,
        "repetition_penalty": gen.repetition_penalty,
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
        "settings": settings.as_dict() | extra,
        "vectors": source,
        "prompt_tokens": prompt_tokens * len(deltas),
        "methods": method_summary(timed),
        "identical": {m: {"rows": identical[m], "of": len(run.rows)} for m in METHODS[1:]},
        "float32_recheck": float32_recheck(cfg, run, timed) if rt.model.dtype != torch.float32 else None,
        "extraction": bench_extraction(run, timed["per-row"].ids),
        "lockstep": bench_lockstep(run, settings.bench.personas),
        "leave": bench_leave(run),
        "compute": bench_compute(rt, timed["per-row"]),
        "judge": bench_judge(cfg.judge, settings.bench.verdicts, settings.bench.judge_delay, log),
        "fluency": bench_fluency(run, timed["per-row"].ids),
        "stages": bench_stages(cfg, rt, settings, log) if settings.bench.stages else None,
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


def _write_outputs(out_dir: Path, result: dict[str, Any], table: str) -> None:
    canonical_json(result)  # refuse NaN or non-JSON values before anything is written
    atomic_write_json(out_dir / "bench.json", result)
    atomic_write_text(out_dir / "bench.md", table)
    render.plot(result, out_dir / "bench.png")


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
