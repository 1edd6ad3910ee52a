"""The benchmark on the tiny model: same greedy tokens from all three methods, output files and fields."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from tests_helpers import write_fake_vectors

from persona_steering.bench import METHODS, BenchSettings, run_bench
from persona_steering.cli import main
from persona_steering.config import BenchConfig, ConfigError, load_config
from persona_steering.runtime import identify
from persona_steering.traits import load_prompts

PROMPTS = ["how was your day ?", "what should i cook for dinner ?", "tell me about a trip", "hello !"]
# One thread: the tiny model gains nothing from two, and a busy shared CPU slows OpenMP kernels badly.
SMALL = "--population 3 --num-prompts 3 --max-new-tokens 6 --max-batch 4 --verdicts 6 --judge-delay 0.01"
SMALL += " --threads 1"


@pytest.fixture()
def overrides(tmp_path: Path, tiny_model_dir: Path) -> list[str]:
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"train": PROMPTS, "heldout": ["hello !"]}))
    return [
        f"model.name={tiny_model_dir}",
        "model.accelerator=cpu",
        "model.precision=32-true",
        f"cache_dir={tmp_path / 'cache'}",
        f"steering.trait_vector_dir={tmp_path / 'vectors'}",
        "steering.layer=2",
        "steering.alpha=1.0",
        "traits=[T1, T2]",
        f"optimize.prompts_file={prompts}",
    ]


def _check_consistent(result: dict, rows: int) -> None:
    methods = result["methods"]
    assert set(methods) == set(METHODS)
    reference = statistics.median(methods["seed-loop"]["seconds"])
    for name, m in methods.items():
        assert m["rows"] == rows and len(m["seconds"]) == result["settings"]["repeats"]
        assert m["median_s"] == statistics.median(m["seconds"])
        assert m["spread_s"] == max(m["seconds"]) - min(m["seconds"])
        assert m["speedup_vs_seed_loop"] == pytest.approx(reference / m["median_s"])
        assert m["tokens_per_s"] == pytest.approx(m["generated_tokens"] / m["median_s"])
        assert m["peak_memory_mb"] > 0
    assert methods["seed-loop"]["speedup_vs_seed_loop"] == 1.0
    assert methods["seed-loop"]["generated_tokens"] > 0
    # Same greedy tokens per row, hence the same token counts, from every method (float32).
    assert {m["generated_tokens"] for m in methods.values()} == {methods["seed-loop"]["generated_tokens"]}
    assert result["identical"] == {m: {"rows": rows, "of": rows} for m in METHODS[1:]}
    judge = result["judge"]
    assert judge["ours_ok"] == judge["one_at_a_time_ok"] == judge["verdicts"]
    assert judge["speedup"] == pytest.approx(judge["one_at_a_time_s"] / judge["ours_s"])


def test_bench_cli_writes_outputs_and_methods_agree(tmp_path: Path, overrides: list[str], capsys) -> None:
    out = tmp_path / "bench"
    code = main(["bench", *sum((["--set", o] for o in overrides), []), *SMALL.split(), "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    assert {
        "version",
        "created",
        "environment",
        "settings",
        "vectors",
        "prompt_tokens",
        "methods",
        "identical",
        "float32_recheck",
        "extraction",
        "leave",
        "compute",
        "judge",
        "fluency",
    } <= set(result)
    s = result["settings"]
    assert (s["population"], s["num_prompts"], s["max_new_tokens"], s["max_batch"], s["layer"]) == (
        3,
        3,
        6,
        4,
        2,
    )
    _check_consistent(result, rows=9)
    assert result["float32_recheck"] is None  # the run was float32
    assert result["environment"]["threads"] == 1
    calls = {m: (result["methods"][m]["calls"], result["methods"][m]["batches"]) for m in METHODS}
    assert calls == {"seed-loop": (9, 9), "per-candidate": (3, 3), "per-row": (1, 3)}
    assert result["vectors"].startswith("NO trait vectors") and "random unit directions" in result["vectors"]
    assert result["extraction"]["rows"] == 9 and result["extraction"]["tokens_per_s"] > 0
    lock = result["lockstep"]
    assert lock["personas"] == 4 and lock["prompts"] == 2 and lock["rows"] == 4 * 3 * 2
    assert lock["speedup"] == pytest.approx(lock["alone_s"] / lock["lockstep_s"])
    leave = result["leave"]  # rows leaving the batch change no token; at most they save steps
    assert leave["rows"] == 3 * 2 and leave["identical_rows"] == leave["rows"]
    assert leave["max_new_tokens"] == 6 * 4 and 0 <= leave["row_steps_leave"] <= leave["row_steps_keep"]
    compute = result["compute"]  # the achieved rate is the weights' FLOPs x tokens / per-row seconds
    per_row = result["methods"]["per-row"]
    assert compute["achieved_gflops"] == pytest.approx(compute["gflop_per_token"] * per_row["tokens_per_s"])
    assert compute["fraction_of_peak"] == pytest.approx(compute["achieved_gflops"] / compute["peak_gflops"])
    fluency = result["fluency"]  # both ways give the same log-probabilities; the shared one is timed
    assert 0 < fluency["rows"] <= 2 * 9 and fluency["max_abs_diff"] < 1e-4
    assert fluency["speedup"] == pytest.approx(fluency["whole_rows_s"] / fluency["shared_prompt_s"])
    assert "offline judge fluency log-probs" in printed
    if leave["ended_early"] == 0:
        assert leave["row_steps_leave"] == leave["row_steps_keep"] == 6 * (6 * 4 - 1)
    # Stages: cold runs work, a warm re-run makes no forward pass; with the cache warm but the outputs
    # gone, optimize replays everything from the cache and vectors re-reads activations only.
    stages = result["stages"]
    vec, opt = stages["vectors"], stages["optimize"]
    assert stages["traits"] == ["R1", "R2"] and stages["persona"] == "cheerful_best_friend"
    assert vec["cold_forwards"] > vec["cache_warm_forwards"] > 0 == vec["warm_forwards"]
    assert opt["cold_forwards"] > 0 == opt["cache_warm_forwards"] == opt["warm_forwards"]
    assert opt["cold_over_warm"] == pytest.approx(opt["cold_s"] / opt["warm_s"])
    # Cold two-pass (the default) makes the generation's forwards and the recording pass's too.
    assert vec["cold_forwards"] >= vec["cold_one_pass_forwards"] + vec["cache_warm_forwards"]
    assert vec["one_pass_speedup"] == pytest.approx(vec["cold_s"] / vec["cold_one_pass_s"])
    ahead = stages["judge_ahead"]  # one population (3 candidates x 3 prompts) judged two ways, two judges
    assert (ahead["rows"], ahead["blocks"]) == (9, 4)
    for name in ("embedding", "openai"):
        r = ahead[name]
        assert r["after_s"] > 0 and r["while_generating_s"] > 0 and r["same_fits"] is True
        assert r["saved_s"] == pytest.approx(r["after_s"] - r["while_generating_s"])
    ev = ahead["evaluate"]  # a cold evaluate of the stage's optimisation, the fake server judging
    heldout = load_prompts(load_config(None, overrides).optimize.prompts_file, "heldout")[: s["num_prompts"]]
    assert ev["rows"] == 3 * len(heldout) * 4 and ev["sets"] == 4 and ev["same_scores"] is True
    assert ev["speedup"] == pytest.approx(ev["after_s"] / ev["while_generating_s"])
    table = (out / "bench.md").read_text()
    assert "| per-row (ours) | 1 | 3 | 9 |" in table and "9/9" in table and table in printed
    assert (
        "| vectors |" in table
        and "| optimize |" in table
        and "finished rows leave the batch (6 rows" in table
        and "cold vectors, activations recorded while generating" in table
        and "judge while generating" in table
        and "| openai |" in table
        and "cold evaluate (base, prompt, proposed;" in table
    )
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*tmp"))


def test_bench_with_trait_vectors_and_repeats(tmp_path: Path, overrides: list[str], tiny_rt) -> None:
    cfg = load_config(None, overrides)
    slug = identify(cfg.model).slug
    write_fake_vectors(
        tmp_path / "vectors" / slug, tiny_rt.fingerprint, tiny_rt.model_id, ["T1", "T2"], seed=1
    )
    cfg = replace(
        cfg,
        generation=replace(cfg.generation, max_batch=8),
        bench=BenchConfig(
            population=2,
            num_prompts=2,
            max_new_tokens=5,
            repeats=2,
            out_dir=str(tmp_path / "b"),
            verdicts=4,
            judge_delay=0.0,
            stages=False,
        ),
    )
    result = run_bench(cfg, rt=tiny_rt, log=lambda *_: None)
    assert result["vectors"] == "trait vectors T1, T2 at layer 2" and result["stages"] is None
    _check_consistent(result, rows=4)


def test_bfloat16_rows_are_rechecked_in_float32(tmp_path: Path, overrides: list[str]) -> None:
    """In bf16 a batched row may differ from its single-row run (padding numerics); every such row
    is re-run both ways in float32, where they must agree."""
    cfg = load_config(None, [o for o in overrides if "precision" not in o] + ["model.precision=bf16-true"])
    cfg = replace(
        cfg,
        generation=replace(cfg.generation, max_batch=12),
        bench=BenchConfig(
            population=3,
            num_prompts=4,
            max_new_tokens=8,
            out_dir=str(tmp_path / "b"),
            verdicts=2,
            judge_delay=0.0,
            personas=1,
            stages=False,
        ),
    )
    result = run_bench(cfg, log=lambda *_: None)
    assert result["environment"]["dtype"] == "bfloat16"
    recheck = result["float32_recheck"]
    some_differ = any(result["identical"][m]["rows"] < 12 for m in METHODS[1:])
    assert recheck is not None and recheck["identical_in_float32"] == recheck["rows"]
    assert (recheck["rows"] > 0) == some_differ


def test_float32_recheck_reruns_differing_rows(tmp_path: Path, overrides: list[str], monkeypatch) -> None:
    """A batched row that differs from its seed-loop row (as bf16 padding can make it) is generated
    again both ways in float32; there the two agree, so the difference was numerics, not a bug."""
    from persona_steering.bench import generation as bench_generation
    from persona_steering.bench.generation import Population, Timed, bench_decoding, float32_recheck
    from persona_steering.generation import Request, chat_text
    from persona_steering.runtime import load_runtime

    cfg = load_config(None, [o for o in overrides if "precision" not in o] + ["model.precision=bf16-true"])
    rt = load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
    prompts = PROMPTS[:2]
    deltas = torch.randn(2, rt.hidden_size, generator=torch.Generator().manual_seed(0))
    texts = [chat_text(rt.tokenizer, Request(p)) for p in prompts]
    run = Population(rt, bench_decoding(5, 4), prompts, texts, deltas, 2, "response", 0)
    ids, _, _ = run.per_row()
    tampered = [list(r) for r in ids]
    tampered[2] = tampered[2][:-1] + [tampered[2][-1] + 1]  # row 2 (candidate 1, prompt 0) now differs
    timed = {m: Timed([1.0], ids, 1, 1, 1.0) for m in ("seed-loop", "per-candidate")}
    timed["per-row"] = Timed([1.0], tampered, 1, 1, 1.0)
    loaded = []
    monkeypatch.setattr(
        bench_generation, "load_runtime", lambda m, *a: loaded.append(m.precision) or load_runtime(m, *a)
    )
    recheck = float32_recheck(cfg, run, timed)
    assert recheck == {"rows": 1, "identical_in_float32": 1, "row_indices": [2]}
    assert loaded == ["32-true"]


def test_bench_settings_quick_and_errors(overrides: list[str], capsys) -> None:
    quick = BenchSettings.from_config(load_config(None, ["bench.quick=true", "bench.population=6"]))
    assert (quick.population, quick.num_prompts, quick.max_new_tokens) == (6, 4, 16)
    plain = BenchSettings.from_config(load_config(None, []))
    assert (plain.population, plain.num_prompts, plain.max_new_tokens) == (8, 10, 48)
    with pytest.raises(ConfigError, match="--repeats must be >= 1"):
        load_config(None, ["bench.repeats=0"])
    code = main(["bench", *sum((["--set", o] for o in overrides), []), "--num-prompts", "99"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--num-prompts 99" in err[0], err


def test_busy_cpu_is_flagged() -> None:
    from persona_steering.bench.run import _busy_note

    env = {"device_type": "cpu", "cpus": 2, "threads": 2}
    assert _busy_note(env | {"load_average": {"start": 0.3, "end": 2.4}}) is None  # only our own threads
    note = _busy_note(env | {"load_average": {"start": 3.9, "end": 5.8}})
    assert note is not None and "--threads 1" in note
    assert _busy_note(env | {"device_type": "cuda", "load_average": {"start": 9.0, "end": 9.0}}) is None
