"""Benchmark of the persona server (``persona-steering bench-serve``, part of ``make bench``).

Through the real openai SDK against the server on 127.0.0.1, with scratch personas (random trait
directions of the model's size, random weights: the numbers are about speed, not about voice):

- throughput: R requests of mixed personas sent at once against the same R sent one at a time;
- time to first token of a streamed request that arrives while B others are decoding;
- tokens/s of the server's rows against the offline ``generate_population`` path on the same rows.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from persona_steering.cache import atomic_write_json, atomic_write_text
from persona_steering.config import Config, ConfigError, GenerationConfig, ServeBenchConfig
from persona_steering.generation import generate_population
from persona_steering.runtime import Runtime, load_runtime
from persona_steering.steering import SteeringSpec
from persona_steering.traits import load_prompts


def run_serve_bench(cfg: Config, rt: Runtime | None = None, log: Any = print) -> dict[str, Any]:
    """Measure; write ``serve.json`` and ``serve.md`` into ``serve_bench.out_dir``; return the result."""
    settings = cfg.serve_bench
    cfg.model.require_one_process("bench-serve")
    before = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _measure(cfg, settings, rt, log)
    finally:
        torch.set_num_threads(before)


def _measure(cfg: Config, settings: ServeBenchConfig, rt: Runtime | None, log: Any) -> dict[str, Any]:
    import openai

    from persona_steering.serve import build_app, serving

    rt = rt or load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
    per = settings.requests // settings.personas
    prompts = load_prompts(cfg.optimize.prompts_file, "train")
    if per > len(prompts):
        raise ConfigError(
            f"bench-serve needs {per} training prompts; {cfg.optimize.prompts_file} has {len(prompts)}"
        )
    prompts = prompts[:per]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as scratch:
        cfg = _scratch_personas(
            cfg, rt, Path(scratch), settings.personas, settings.requests + settings.background
        )
        ids = [f"bench{i}" for i in range(settings.personas)]
        rows = [(pid, p) for pid in ids for p in prompts]  # persona-major, as generate_population orders them
        app = build_app(cfg, rt)
        with serving(app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
            log(f"bench-serve: {len(rows)} requests one at a time ...")
            ask = _asker(client, settings.max_tokens)
            ask(rows[0])  # warm-up
            t0 = time.perf_counter()
            alone = [ask(r) for r in rows]
            sequential_s = time.perf_counter() - t0
            log(f"bench-serve: {len(rows)} requests at once, {settings.repeats} times ...")
            concurrent = []
            for _ in range(settings.repeats):
                t0 = time.perf_counter()
                with ThreadPoolExecutor(len(rows)) as pool:
                    together = list(pool.map(ask, rows))
                concurrent.append(time.perf_counter() - t0)
            concurrent_s = statistics.median(concurrent)
            peak = app.state.scheduler.peak
            log(f"bench-serve: time to first token beside {settings.background} decoding requests ...")
            ttft = [_ttft(client, app.state.scheduler, rows, settings) for _ in range(settings.probes)]
        log("bench-serve: the same rows through generate_population ...")
        offline = [
            _offline(cfg, rt, app.state.catalog, ids, prompts, settings.max_tokens)
            for _ in range(settings.repeats)
        ]
        offline_s, offline_tokens = statistics.median(s for s, _ in offline), offline[0][1]
    tokens = sum(t for _, t in together)
    result = {
        "model_id": rt.model_id,
        "device": str(rt.device),
        "dtype": str(rt.model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "settings": vars(settings),
        "sequential_s": sequential_s,
        "concurrent_s": concurrent_s,
        "concurrent_runs_s": concurrent,
        "offline_runs_s": [s for s, _ in offline],
        "speedup": sequential_s / concurrent_s,
        "peak_rows": peak,
        "same_answers": sum(a[0] == b[0] for a, b in zip(alone, together, strict=True)),
        "completion_tokens": tokens,
        "server_tokens_per_s": tokens / concurrent_s,
        "offline_s": offline_s,
        "offline_tokens": offline_tokens,
        "offline_tokens_per_s": offline_tokens / offline_s,
        "ttft_s": ttft,
        "ttft_median_s": statistics.median(ttft),
        "load_average": os.getloadavg()[0],
    }
    result["server_vs_offline"] = result["server_tokens_per_s"] / result["offline_tokens_per_s"]
    table = markdown_table(result)
    out = Path(settings.out_dir)
    atomic_write_json(out / "serve.json", result)
    atomic_write_text(out / "serve.md", table + "\n")
    log(table)
    log(f"wrote {out / 'serve.json'} and serve.md")
    return result


def markdown_table(r: dict[str, Any]) -> str:
    s = r["settings"]
    n = s["requests"]
    return "\n".join(
        [
            f"persona server, {r['model_id']} on {r['device']} ({r['dtype']}, {r['threads']} threads), "
            f"{n} requests over {s['personas']} personas, {s['max_tokens']} new tokens max, openai SDK",
            "",
            "| measurement | value | goal |",
            "|---|---|---|",
            f"| {n} one at a time | {r['sequential_s']:.2f} s | |",
            f"| {n} at once (peak {r['peak_rows']} rows together; median of {s['repeats']}) | "
            f"{r['concurrent_s']:.2f} s | |",
            f"| throughput ratio | {r['speedup']:.1f}x | >= 6x |",
            f"| same answer at once as alone | {r['same_answers']}/{n} | {n}/{n} |",
            f"| time to first token beside {s['background']} decoding (median of {s['probes']}) | "
            f"{r['ttft_median_s'] * 1000:.0f} ms | < 1000 ms |",
            f"| server tokens/s ({r['completion_tokens']} tokens) | {r['server_tokens_per_s']:.1f} | |",
            f"| generate_population tokens/s, same rows ({r['offline_tokens']} tokens; "
            f"median of {s['repeats']}) | "
            f"{r['offline_tokens_per_s']:.1f} | |",
            f"| server / offline tokens/s | {r['server_vs_offline']:.2f} | >= 0.80 |",
        ]
    )


def _asker(client: Any, max_tokens: int) -> Any:
    def ask(row: tuple[str, str]) -> tuple[str, int]:
        out = client.chat.completions.create(
            model=row[0], messages=[{"role": "user", "content": row[1]}], max_tokens=max_tokens
        )
        return out.choices[0].message.content, out.usage.completion_tokens

    return ask


def _ttft(client: Any, scheduler: Any, rows: list[tuple[str, str]], settings: ServeBenchConfig) -> float:
    """Seconds to the first streamed token of a request sent while ``background`` rows decode."""
    stop = threading.Event()

    def background(row: tuple[str, str]) -> None:
        stream = client.chat.completions.create(
            model=row[0], messages=[{"role": "user", "content": row[1]}], max_tokens=400, stream=True
        )
        for _ in stream:
            if stop.is_set():
                stream.close()  # the server frees the row
                return

    pool = ThreadPoolExecutor(max(settings.background, 1))
    futures = [pool.submit(background, rows[i % len(rows)]) for i in range(settings.background)]
    deadline = time.monotonic() + 300
    while scheduler.load["rows"] < settings.background and time.monotonic() < deadline:
        time.sleep(0.01)
    busy = scheduler.load["rows"]
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=rows[-1][0], messages=[{"role": "user", "content": rows[-1][1]}], max_tokens=8, stream=True
    )
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
    stop.set()
    for f in futures:
        f.result()
    pool.shutdown()
    if busy < settings.background:
        raise RuntimeError(f"only {busy} of {settings.background} background requests were decoding")
    return first if first is not None else float("nan")


def _offline(
    cfg: Config, rt: Runtime, catalog: Any, ids: list[str], prompts: list[str], max_tokens: int
) -> tuple[float, int]:
    """Seconds and new tokens of the same rows through ``generate_population`` (no cache)."""
    personas = [catalog.get(pid) for pid in ids]
    deltas = torch.stack([p.steering.delta for p in personas])  # [personas, hidden]
    gen = GenerationConfig(
        max_new_tokens=max_tokens,
        repetition_penalty=cfg.generation.repetition_penalty,
        max_batch=len(ids) * len(prompts),
    )
    t0 = time.perf_counter()
    layer = personas[0].steering.layer or cfg.steering.layer
    out = generate_population(rt, prompts, gen, SteeringSpec(layer, deltas))
    seconds = time.perf_counter() - t0
    return seconds, sum(len(a.ids) for answers in out for a in answers)


def _scratch_personas(cfg: Config, rt: Runtime, root: Path, count: int, rows: int) -> Config:
    """Random unit trait directions for this model and ``count`` personas with random weights,
    written under ``root``; returns ``cfg`` pointed at them, with room for ``rows`` rows."""
    from dataclasses import replace

    from persona_steering.store import save_vectors

    g = torch.Generator().manual_seed(cfg.seed)
    layers, hidden = rt.num_layers, rt.hidden_size
    meta = {
        "fingerprint": rt.fingerprint,
        "model_id": rt.model_id,
        "num_layers": layers,
        "hidden_size": hidden,
    }
    for trait in cfg.traits:
        tensors = {
            "mean_diff.response_avg": torch.randn(layers + 1, hidden, generator=g),  # [L+1, hidden]
            "norm.response_avg": torch.full((layers + 1,), 10.0),  # [L+1]
        }
        save_vectors(root / "vectors" / rt.slug / f"{trait}.safetensors", tensors, meta)
    layer = min(cfg.steering.layer, layers)
    for i in range(count):
        weights = {
            t: float(w) for t, w in zip(cfg.traits, torch.randn(len(cfg.traits), generator=g), strict=True)
        }
        record = {
            "persona_id": f"bench{i}",
            "traits": cfg.traits,
            "selected": "mean",
            "weights": weights,
            "num_evaluations": 0,
            "layer": layer,
            "alpha": cfg.steering.alpha,
        }
        (root / "runs").mkdir(parents=True, exist_ok=True)
        (root / "runs" / f"bench{i}_optimization.json").write_text(json.dumps(record))
    steering = replace(cfg.steering, trait_vector_dir=str(root / "vectors"), layer=layer)
    return replace(
        cfg,
        steering=steering,
        optimize=replace(cfg.optimize, save_dir=str(root / "runs")),
        serve=replace(cfg.serve, max_rows=max(rows, cfg.serve.max_rows)),
    )
