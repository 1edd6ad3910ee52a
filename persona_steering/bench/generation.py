"""One CMA-ES generation's answers three ways, timed, with the extraction and lockstep measurements.

One model, one prompt set, one population of candidate weight vectors, greedy decoding, no cache:

- ``seed-loop``: one candidate x one prompt per ``model.generate`` call, a steering hook
  registered and removed around each, as an implementation that loops does;
- ``per-candidate``: one batched ``generation.generate`` call per candidate (one vector per call);
- ``per-row`` (ours): the whole population in one ``generation.generate`` call, a vector per row,
  the code path of ``optimize.Objective.answers``.

Every method must give the same greedy tokens per row; the run counts matching rows and, when the
model is not float32 (bf16 padding numerics can flip a token), re-runs differing rows in float32.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from persona_steering.basis import TraitBasis, load_basis
from persona_steering.config import Config, GenerationConfig
from persona_steering.extraction import Pair, record_activations
from persona_steering.generation import Request, eos_ids, generate, generate_population, no_logits
from persona_steering.layers import capture_layers, normalize_layer
from persona_steering.runtime import Runtime, load_runtime
from persona_steering.steering import SteeringSpec
from persona_steering.store import VectorFileError
from persona_steering.vectors import unit

METHODS = ("seed-loop", "per-candidate", "per-row")


@dataclass
class Timed:
    """One method's repeated timings, outputs of the last repeat, and peak memory."""

    seconds: list[float]
    ids: list[list[int]]  # [rows][generated tokens], rows in candidate-major order
    calls: int  # generate calls
    batches: int  # batched decode loops (forward groups) those calls ran
    peak_memory_mb: float


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


def bench_decoding(max_new_tokens: int, max_batch: int) -> GenerationConfig:
    """The decoding every bench method runs: greedy and without a repetition penalty, whatever the
    config says. The seed-loop is plain HF ``generate``, whose penalty would also count the prompt's
    tokens, so only this compares like with like (every bench table so far was measured so)."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0, max_batch=max_batch
    )


@dataclass
class Population:
    """The population to answer and the three ways of answering it."""

    rt: Runtime
    gen: GenerationConfig
    prompts: list[str]
    texts: list[str]
    deltas: torch.Tensor  # [P, hidden]
    layer: int
    positions: str
    seed: int

    def spec(self, deltas: torch.Tensor) -> SteeringSpec:
        """These vectors [rows, hidden] at the population's layer and positions."""
        return SteeringSpec(self.layer, deltas, self.positions)

    @property
    def batch(self) -> int:
        """Rows per decode batch (the bench resolves ``max_batch`` before it builds the population)."""
        assert self.gen.max_batch is not None
        return self.gen.max_batch

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
        return out, len(self.deltas), len(self.deltas) * -(-n // self.batch)

    def per_row(self, rows: Sequence[tuple[int, int]] | None = None) -> tuple[list[list[int]], int, int]:
        """What optimisation does (``generation.generate_population``): every row in one call."""
        if rows is not None:  # a subset (the float32 re-check): same code path, chosen rows
            return self._generate(rows, self.gen), 1, -(-len(rows) // self.batch)
        answers = generate_population(self.rt, self.prompts, self.gen, self.spec(self.deltas), seed=self.seed)
        ids = [a.ids for cand in answers for a in cand]
        return ids, 1, -(-len(ids) // self.batch)

    def _generate(self, rows: Sequence[tuple[int, int]], gen: GenerationConfig) -> list[list[int]]:
        """One uncached ``generation.generate`` call over (candidate, prompt) rows, a vector per row."""
        deltas = torch.stack([self.deltas[c] for c, _ in rows])  # [rows, hidden]
        requests = [Request(self.prompts[p]) for _, p in rows]
        answers = generate(
            self.rt,
            requests,
            gen,
            steering=self.spec(deltas),
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
        with self.spec(delta[None]).apply(rt.model, attention_mask=mask), rt.autocast():
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


def time_methods(run: Population, repeats: int, log: Any) -> dict[str, Timed]:
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
                sync(run.rt)
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


def method_summary(timed: dict[str, Timed]) -> dict[str, dict[str, Any]]:
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


def count_identical(reference: list[list[int]], other: list[list[int]]) -> int:
    return sum(a == b for a, b in zip(reference, other, strict=True))


def float32_recheck(cfg: Config, run: Population, timed: dict[str, Timed]) -> dict[str, Any] | None:
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
        "identical_in_float32": count_identical(single, batched),
        "row_indices": differing,
    }


@torch.inference_mode()
def _residual_norm(rt: Runtime, texts: list[str], row: int) -> float:
    """Mean residual-stream norm at a hidden_states row over the prompts' tokens (first token left out:
    its norm is ~100x the others and would dominate, see docs/FACTS.md)."""
    enc = rt.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"].to(rt.device), enc["attention_mask"].to(rt.device)  # [N, len]
    with capture_layers(rt.model) as states, rt.autocast():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        rt.model(input_ids=ids, attention_mask=mask, position_ids=positions, **no_logits(rt.model))
    hidden = states[row].float()  # [N, len, hidden]
    keep = mask.clone()
    keep[torch.arange(len(texts)), mask.argmax(dim=-1)] = 0  # each row's first real token
    return float(hidden.norm(dim=-1)[keep.bool()].mean())


LOCKSTEP_PROMPTS = 2


def bench_lockstep(run: Population, personas: int) -> dict[str, Any]:
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
            generate_population(run.rt, prompts, run.gen, run.spec(g), seed=run.seed)

    def together() -> None:
        all_rows = torch.cat(groups)
        generate_population(run.rt, prompts, run.gen, run.spec(all_rows), seed=run.seed)

    seconds = {}
    for name, fn in (("alone", alone), ("lockstep", together)):
        sync(run.rt)
        started = time.perf_counter()
        fn()
        sync(run.rt)
        seconds[name] = time.perf_counter() - started
    return {
        "personas": personas,
        "prompts": len(prompts),
        "rows": personas * len(run.deltas) * len(prompts),
        "alone_s": seconds["alone"],
        "lockstep_s": seconds["lockstep"],
        "speedup": seconds["alone"] / seconds["lockstep"],
    }


LEAVE_TOKENS = 4
"""The rows-leave measurement decodes LEAVE_TOKENS x M tokens, so that answers end at mixed lengths."""


def bench_leave(run: Population) -> dict[str, Any]:
    """One call over every row with ``finished_rows_leave`` off then on: same tokens, the decode
    row-steps each computes, and seconds. Answers run to LEAVE_TOKENS x M new tokens, on the first
    LOCKSTEP_PROMPTS prompts (a minute or two on a CPU), so that some end early and some do not."""
    m = run.gen.max_new_tokens * LEAVE_TOKENS
    prompts = run.prompts[:LOCKSTEP_PROMPTS]
    out: dict[str, Any] = {"rows": len(run.deltas) * len(prompts), "max_new_tokens": m}
    ids: dict[bool, list[list[int]]] = {}
    for leave in (False, True):
        gen = dataclasses.replace(run.gen, max_new_tokens=m, finished_rows_leave=leave)
        sync(run.rt)
        started = time.perf_counter()
        answers = generate_population(run.rt, prompts, gen, run.spec(run.deltas), seed=run.seed)
        sync(run.rt)
        out["leave_s" if leave else "keep_s"] = time.perf_counter() - started
        ids[leave] = [a.ids for cand in answers for a in cand]
    lengths = [len(x) for x in ids[True]]
    # A decode step feeds one token per row still in the batch; the prefill is the same either way.
    steps = [min(n + 1, m) - 1 for n in lengths]  # decode forwards after the prefill, per row
    chunks = [steps[i : i + run.batch] for i in range(0, len(steps), run.batch)]
    out |= {
        "identical_rows": count_identical(ids[False], ids[True]),
        "ended_early": sum(n < m for n in lengths),
        "mean_length": sum(lengths) / len(lengths),
        "row_steps_keep": sum(len(c) * max(c) for c in chunks),
        "row_steps_leave": sum(steps),
    }
    out["row_steps_saved"] = 1 - out["row_steps_leave"] / max(out["row_steps_keep"], 1)
    out["speedup"] = out["keep_s"] / out["leave_s"]
    return out


def bench_compute(rt: Runtime, per_row: Timed, size: int = 2048) -> dict[str, Any]:
    """How close per-row decoding runs to the machine's compute limit: the model's FLOPs per generated
    token (2 x the weights a token passes through: every matrix but the input embedding, the LM head
    once; attention scores left out, so the work is a lower bound) times the tokens per-row produced
    per second, against the FLOP/s of a large square matmul in the model's dtype."""
    a = torch.randn(size, size, dtype=rt.model.dtype, device=rt.device)
    b = torch.randn(size, size, dtype=rt.model.dtype, device=rt.device)
    a @ b  # warm-up: kernel selection
    sync(rt)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        sync(rt)
        times.append(time.perf_counter() - started)
    peak = 2 * size**3 / min(times)
    embed = rt.model.get_input_embeddings().weight
    head = rt.model.get_output_embeddings()
    weights = sum(p.numel() for p in rt.model.parameters() if p is not embed)
    if head is not None and head.weight is embed:  # tied: the head multiplies by the embedding matrix
        weights += embed.numel()
    per_token = 2 * weights
    tokens = sum(len(ids) for ids in per_row.ids)
    achieved = per_token * tokens / statistics.median(per_row.seconds)
    return {
        "matmul_size": size,
        "peak_gflops": peak / 1e9,
        "gflop_per_token": per_token / 1e9,
        "achieved_gflops": achieved / 1e9,
        "fraction_of_peak": achieved / peak,
    }


def bench_extraction(run: Population, answers: list[list[int]]) -> dict[str, Any]:
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
    sync(run.rt)
    seconds = time.perf_counter() - started
    return {"rows": len(rows), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def sync(rt: Runtime) -> None:
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
