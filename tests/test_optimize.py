"""CMA-ES stage end to end on the tiny model: outputs, warm re-run, refusals, SIGKILL and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests_helpers import assert_same_run, judge_threads

from persona_steering.cache import Cache
from persona_steering.cli import main
from persona_steering.config import load_config
from persona_steering.optimize import run_optimize
from persona_steering.record import PersonaFiles, PersonaRecord

SEED_000_FIELDS = {
    "persona_id",
    "layer",
    "alpha",
    "best_weights",
    "best_score",
    "selected",
    "weights",
    "score",
    "num_iterations",
    "num_evaluations",
    "optimization_history",
}


def test_optimize_writes_seed_000_outputs_and_rerun_does_no_work(project, monkeypatch):
    tmp_path, overrides = project
    cfg = load_config(None, overrides)
    result = run_optimize(cfg, log=lambda *_: None)
    saved = json.loads((tmp_path / "runs" / "p1_optimization.json").read_text())
    assert SEED_000_FIELDS <= set(saved)
    assert saved["num_iterations"] == 4 and saved["num_evaluations"] == 16
    assert set(saved["best_weights"]) == {"T1", "T2"}
    assert saved["optimization_history"]["iterations"] == [1, 2, 3, 4]
    assert saved["best_score"] == max(saved["optimization_history"]["best_scores"])
    # By default the run serves the final search mean, scored once more at the end (docs/proposed_mean.md).
    assert saved["selected"] == "mean" and saved["weights"] == saved["mean_weights"]
    assert saved["score"] == saved["mean_score"] and saved["parts"] == saved["mean_parts"]
    assert saved["weights"] != saved["best_weights"]
    # The embedding judge gives an unchanged answer neutral style, exactly; relevance is a rank
    # among the prompt pool, which the tiny model's random text need not win.
    assert saved["baseline_parts"]["style"] == 0.5 and 0.0 <= saved["baseline_parts"]["relevance"] <= 1.0
    assert set(saved["best_parts"]) == {"style", "relevance", "fluency"}
    best = json.loads((tmp_path / "runs" / "p1_best_weights.json").read_text())
    assert best["weights"] == saved["weights"] and best["config_digest"] == saved["config_digest"]
    assert best["best_weights"] == saved["best_weights"] and best["selected"] == "mean"
    assert (tmp_path / "runs" / "p1_convergence.png").read_bytes()[:4] == b"\x89PNG"
    assert result["best_score"] == saved["best_score"]

    def no_load(*a, **k):
        raise AssertionError("a finished run must not load the model")

    monkeypatch.setattr("persona_steering.optimize.load_runtime", no_load)
    again = run_optimize(load_config(None, overrides), log=lambda *_: None)
    assert again == saved


def test_serving_the_best_candidate_instead_refinishes_the_run_from_the_cache(project):
    tmp_path, overrides = project
    mean = run_optimize(load_config(None, overrides), log=lambda *_: None)
    lines: list[str] = []
    best = run_optimize(load_config(None, [*overrides, "optimize.select=best"]), log=lines.append)
    assert best["selected"] == "best" and best["weights"] == best["best_weights"] == mean["best_weights"]
    assert best["score"] == best["best_score"] and best["parts"] == best["best_parts"]
    # the same trajectory and the same mean, only another choice at the end; nothing re-run
    assert best["history"] == mean["history"] and best["mean_score"] == mean["mean_score"]
    assert best["config_digest"] == mean["config_digest"]
    assert any("reporting the best weights instead" in line for line in lines)
    # No verdict is asked again. The best candidate's answers are generated again at most once per
    # prompt: its delta, computed alone, may differ in the last float bits from the population's.
    misses = json.loads(lines[-1].removeprefix("cache: "))["misses"]
    assert set(misses) <= {"generation"} and misses.get("generation", 0) <= 2  # 2 training prompts
    short = json.loads((tmp_path / "runs" / "p1_best_weights.json").read_text())
    assert short["selected"] == "best" and short["weights"] == best["best_weights"]
    record = PersonaRecord.require(PersonaFiles(tmp_path / "runs", "p1"))
    assert record.selected == "best" and record.selected_weights == best["best_weights"]


def test_stale_temp_files_of_a_killed_run_are_removed_at_start(project):
    tmp_path, overrides = project
    runs = tmp_path / "runs"
    runs.mkdir()
    stale = [runs / ".p1_checkpoint.json.k1l2d3.tmp", runs / ".p1_optimization.json.x9y8z7.tmp"]
    other = runs / ".p2_checkpoint.json.a1b2c3.tmp"  # another persona's: maybe a live writer's
    for path in [*stale, other]:
        path.write_text("half a file")
    run_optimize(load_config(None, overrides + ["optimize.max_iterations=1"]), log=lambda *_: None)
    assert not any(p.exists() for p in stale) and other.exists()
    assert json.loads((runs / "p1_checkpoint.json").read_text())["iteration"] == 1


def test_different_config_over_existing_run_is_refused(project, capsys):
    tmp_path, overrides = project
    cfg = load_config(None, overrides + ["optimize.max_iterations=1"])
    run_optimize(cfg, log=lambda *_: None)
    ckpt = tmp_path / "runs" / "p1_checkpoint.json"
    before = ckpt.read_bytes()
    capsys.readouterr()
    args = [
        "optimize",
        *sum((["--set", o] for o in overrides), []),
        "--set",
        "optimize.max_iterations=2",
        "--alpha",
        "3.0",
    ]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another configuration" in err[0] and "--restart" in err[0]
    assert ckpt.read_bytes() == before
    assert main([*args, "--restart"]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--persona-id", "nobody"], "unknown persona 'nobody'"),
        (["--initial-weights", "nan,0"], "must be finite"),
        (["--initial-weights", "1,2,3"], "3 values for 2 traits"),
        (["--layer", "9"], "layer 9 is out of range"),
    ],
)
def test_bad_input_one_line_nothing_written(project, capsys, extra, message):
    tmp_path, overrides = project
    with Cache(tmp_path / "cache") as cache:
        entries = cache.count()
    code = main(["optimize", *sum((["--set", o] for o in overrides), []), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()
    with Cache(tmp_path / "cache") as cache:
        assert cache.count() == entries


def test_persona_without_samples_and_vectors_of_another_model(project, capsys, tiny_model_dir):
    tmp_path, overrides = project
    samples = tmp_path / "personas" / "p1" / "persona_samples.json"
    kept = samples.read_text()
    samples.unlink()
    code = main(["optimize", *sum((["--set", o] for o in overrides), [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "persona_samples.json: missing" in err[0]
    samples.write_text(kept)
    from tests_helpers import perturbed_copy

    other = perturbed_copy(tiny_model_dir, tmp_path / "other")
    code = main(
        ["optimize", *sum((["--set", o] for o in overrides), []), "--model", str(other), "--persona-id", "p1"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "no vectors for trait T1 of this model" in err[0]
    assert not (tmp_path / "runs").exists()


def _cli(overrides, save_dir, cache_dir):
    args = [sys.executable, "-m", "persona_steering", "optimize"]
    for o in overrides:
        args += ["--set", o]
    return args + ["--save-dir", str(save_dir), "--cache-dir", str(cache_dir)]


def test_sigkill_then_resume_equals_uninterrupted(project):
    tmp_path, overrides = project
    overrides = [o for o in overrides if not o.startswith("optimize.max_iterations")] + [
        "optimize.max_iterations=6"
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Uninterrupted reference, with its own cache (seeded from the vectors stage's cache).
    ref = subprocess.run(
        _cli(overrides, tmp_path / "ref", tmp_path / "cache-ref"),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr
    # Killed run: SIGKILL soon after its first checkpoint lands, then resume with the same command.
    ckpt = tmp_path / "killed" / "p1_checkpoint.json"
    proc = subprocess.Popen(
        _cli(overrides, tmp_path / "killed", tmp_path / "cache-k"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.time() + 300
    # Killed the moment the first checkpoint lands (mid-way through the next iteration): an iteration
    # of the tiny model takes well under a second, so a later kill can find the run finished.
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "p1_optimization.json").exists(), "killed too late to test resume"
    with Cache(tmp_path / "cache-k") as cache:
        before = {ns: cache.count(ns) for ns in ("generation", "verdict")}
    resumed = subprocess.run(
        _cli(overrides, tmp_path / "killed", tmp_path / "cache-k"),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after iteration" in resumed.stdout
    a = json.loads((tmp_path / "ref" / "p1_optimization.json").read_text())
    b = json.loads((tmp_path / "killed" / "p1_optimization.json").read_text())
    assert_same_run(a, b)
    assert a["num_evaluations"] == b["num_evaluations"]
    # Nothing computed twice: the killed+resumed cache holds exactly the uninterrupted run's entries,
    # and the resumed process missed only what the killed one had not stored.
    with Cache(tmp_path / "cache-ref") as ref_cache, Cache(tmp_path / "cache-k") as k_cache:
        for ns in ("generation", "verdict"):
            assert k_cache.count(ns) == ref_cache.count(ns), ns
    lines = [line for line in resumed.stdout.splitlines() if line.startswith("cache: ")]
    assert len(lines) == 1, resumed.stdout
    stats = json.loads(lines[0].split("cache: ", 1)[1])
    with Cache(tmp_path / "cache-k") as cache:
        for ns in ("generation", "verdict"):
            assert stats["misses"].get(ns, 0) == cache.count(ns) - before[ns]


def test_layer_sweep_loads_once_and_reports_best_layer(project, monkeypatch):
    import persona_steering.optimize as optimize

    tmp_path, overrides = project
    real = optimize.load_runtime
    loads = []

    def counting(*a, **k):
        loads.append(1)
        return real(*a, **k)

    monkeypatch.setattr(optimize, "load_runtime", counting)
    cfg = load_config(None, overrides + ["optimize.max_iterations=2", "optimize.layers=1,3"])
    summary = optimize.run_layers(cfg, cfg.optimize.layers, log=lambda *_: None)
    assert [r["layer"] for r in summary["layers"]] == [1, 3] and len(loads) == 1
    best = max(summary["layers"], key=lambda r: r["score"])  # by the served (mean) weights' fit
    assert summary["best_layer"] == best["layer"] and summary["best_score"] == best["score"]
    assert all(r["selected"] == "mean" and r["score"] == r["mean_score"] for r in summary["layers"])
    # each layer's row is that layer's own result file, and the summary file holds the same rows
    assert json.loads((tmp_path / "runs" / "p1_layers.json").read_text())["layers"] == summary["layers"]
    for r in summary["layers"]:
        assert json.loads(Path(r["result"]).read_text())["layer"] == r["layer"]
    assert (tmp_path / "runs" / "p1_layers.png").is_file()
    again = optimize.run_layers(cfg, cfg.optimize.layers, log=lambda *_: None)
    assert again == summary and len(loads) == 1  # finished runs: no model load


def test_lockstep_personas_equal_alone_and_share_generate_calls(project, monkeypatch):
    import persona_steering.generation as generation
    import persona_steering.optimize as optimize

    tmp_path, overrides = project
    second = tmp_path / "personas" / "p2"
    second.mkdir()
    (second / "persona_profile.txt").write_text("A cold formal clerk.")
    (second / "persona_samples.json").write_text(
        json.dumps(["please answer the question", "that is not good"])
    )
    base = overrides + ["optimize.max_iterations=3"]
    alone = {}
    for pid in ("p1", "p2"):
        cfg = load_config(
            None, base + [f"optimize.persona_id={pid}", f"optimize.save_dir={tmp_path / ('alone-' + pid)}"]
        )
        alone[pid] = run_optimize(cfg, log=lambda *_: None)
    calls = []
    real = generation.generate

    def counting(rt, requests, *a, **k):
        if k.get("steering") is not None:
            calls.append(len(requests))
        return real(rt, requests, *a, **k)

    monkeypatch.setattr(generation, "generate", counting)
    cfg = load_config(
        None, base + [f"optimize.save_dir={tmp_path / 'together'}", "optimize.personas=[p1, p2]"]
    )
    together = optimize.run_personas(cfg, ["p1", "p2"], log=lambda *_: None)
    # 3 iterations, each one call with both personas' rows (2 x 4 candidates x 2 prompts), then the
    # per-persona final scoring calls.
    assert calls[:3] == [16, 16, 16]
    for pid in ("p1", "p2"):
        assert_same_run(together[pid], alone[pid], pid)
        assert (tmp_path / "together" / f"{pid}_optimization.json").is_file()
    # Each persona's checkpoint stands alone: p2 finishes with the single-persona command too.
    cfg2 = load_config(None, base + ["optimize.persona_id=p2", f"optimize.save_dir={tmp_path / 'together'}"])
    assert run_optimize(cfg2, log=lambda *_: None) == together["p2"]


def test_persona_axis_is_the_meandiff_direction_weighed_beside_the_traits(project, capsys):
    """steering.persona_axis: CMA-ES weighs T1, T2 and P; P is the persona's mean difference, written
    beside the result, and evaluate steers the proposed weights with it."""
    import torch

    from persona_steering.basis import load_basis
    from persona_steering.config import ConfigError
    from persona_steering.evaluate.run import run_evaluate
    from persona_steering.persona_axis import persona_directions
    from persona_steering.runtime import load_runtime
    from persona_steering.store import VectorFileError
    from persona_steering.traits import load_persona
    from persona_steering.vectors import unit

    tmp_path, overrides = project
    cfg = load_config(None, [*overrides, "steering.persona_axis=true", "optimize.max_iterations=2"])
    assert cfg.basis_traits == ["T1", "T2", "P"]
    result = run_optimize(cfg, log=lambda *_: None)
    assert result["traits"] == ["T1", "T2", "P"] and set(result["best_weights"]) == {"T1", "T2", "P"}
    axis_file = tmp_path / "runs" / "p1_axis.safetensors"
    basis = load_basis(tmp_path / "vectors", _slug(cfg), ["T1", "T2", "P"], 2, axis_file=axis_file)
    rt = load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
    with Cache(cfg.cache_dir) as cache:
        directions, pairs = persona_directions(rt, cfg, load_persona(tmp_path / "personas", "p1"), cache, 2)
    assert pairs == 3
    expected = unit(directions["mean_diff"]) * cfg.steering.alpha * basis.scale
    assert torch.allclose(
        basis.deltas(torch.tensor([0.0, 0.0, 1.0]), cfg.steering.alpha)[0], expected, atol=1e-6
    )
    with pytest.raises(VectorFileError, match="no persona axis for layer 1"):
        load_basis(tmp_path / "vectors", _slug(cfg), ["T1", "T2", "P"], 1, axis_file=axis_file)
    with pytest.raises(ConfigError, match="persona axis"):
        load_config(None, [*overrides, "traits=[T1, P]"])

    out = run_evaluate(
        load_config(
            None,
            [
                *overrides,
                "evaluate.methods=[base, meandiff, proposed]",
                "evaluate.samples=0",
                "evaluate.judges=[embedding]",
                "evaluate.bootstrap=100",
                "evaluate.permutations=100",
            ],
        ),
        log=lambda *_: None,
    )
    proposed = out["methods"]["proposed"]["info"]
    assert proposed["weights"] == result["weights"]
    assert out["methods"]["meandiff"]["info"]["cosine_with_traits"].keys() == {"T1", "T2", "P"}
    assert out["methods"]["meandiff"]["info"]["cosine_with_traits"]["P"] == pytest.approx(1.0, abs=1e-5)


def _slug(cfg):
    from persona_steering.runtime import identify

    return identify(cfg.model).slug


def test_judging_while_generating_is_the_same_run_judged_off_the_main_thread(project, monkeypatch):
    import threading

    tmp_path, overrides = project
    base = overrides + ["optimize.max_iterations=2", "generation.max_batch=2"]  # 8 blocks a population
    threads = judge_threads(monkeypatch)
    runs = {}
    for ahead in (False, True):
        cfg = load_config(
            None,
            base
            + [
                f"judge.while_generating={'always' if ahead else 'auto'}",  # auto: not on a CPU
                f"optimize.save_dir={tmp_path / f'ahead-{ahead}'}",
                f"cache_dir={tmp_path / f'cache-{ahead}'}",  # nothing judged for one run helps the other
            ],
        )
        threads.clear()
        runs[ahead] = run_optimize(cfg, log=lambda *_: None)
        if ahead:
            # Every verdict was computed in the background, block by block (more calls than
            # populations), and the main thread's judge calls all found them in the cache.
            assert threads and all(t.startswith("judge-ahead") for t in threads)
            assert len(threads) > 2 + 2
        else:
            assert threads and all(t == threading.main_thread().name for t in threads)
    assert_same_run(runs[True], runs[False])


def test_judges_that_run_the_policy_model_never_judge_ahead_and_a_dead_judge_still_fails(tmp_path):
    from persona_steering.judges import Judge, JudgeError, Query
    from persona_steering.judges.ahead import JudgeAhead
    from persona_steering.judges.embedding import EmbeddingJudge
    from persona_steering.judges.local import LocalJudge
    from persona_steering.judges.offline import OfflineJudge
    from persona_steering.judges.openai import OpenAIJudge

    class Dead(Judge):
        backend = "dead"

        def identity(self):
            return {"dead": 1}

        def _judge(self, queries):
            raise JudgeError("the endpoint is gone")

    with Cache(tmp_path) as cache:
        ahead = JudgeAhead(cache, enabled=True)
        judges = (OfflineJudge, LocalJudge, EmbeddingJudge, OpenAIJudge, Dead)
        assert [ahead.accepts(j) for j in judges] == [False, False, True, True, True]
        assert not JudgeAhead(cache, enabled=False).accepts(Dead())
        with pytest.raises(JudgeError, match="the endpoint is gone"), ahead:
            ahead.submit(Dead(), [Query("coherence", "q", "a")])
    assert not JudgeAhead(None, enabled=True).enabled  # what judging ahead leaves is the warm cache


def test_start_on_the_persona_axis_is_the_persona_direction_at_the_damage_budget(project):
    """optimize.start=persona_axis: CMA-ES's first mean is P alone at max_norm / alpha, so the start
    steers exactly at the budget; without the axis, or with initial_weights, the start is as before,
    and a run from before the option (start at zeros) is still found under it."""
    import numpy as np

    from persona_steering.config import ConfigError
    from persona_steering.optimize import _initial_weights

    tmp_path, overrides = project
    axis = [*overrides, "steering.persona_axis=true", "optimize.max_norm=0.25", "steering.alpha=0.125"]
    x0 = _initial_weights(load_config(None, [*axis, "optimize.start=persona_axis"]))
    assert x0.tolist() == [0.0, 0.0, 2.0]
    assert not np.any(_initial_weights(load_config(None, [*axis, "optimize.start=zeros"])))
    given = load_config(None, [*axis, "optimize.start=persona_axis", "optimize.initial_weights=[0.5, 0, 1]"])
    assert _initial_weights(given).tolist() == [0.5, 0.0, 1.0]
    no_axis = load_config(None, [*overrides, "steering.persona_axis=false", "optimize.start=persona_axis"])
    assert _initial_weights(no_axis).tolist() == [0.0, 0.0]
    unbounded = load_config(None, [*axis, "optimize.start=persona_axis", "optimize.max_norm=null"])
    assert _initial_weights(unbounded).tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ConfigError, match="optimize.start must be one of zeros, persona_axis"):
        load_config(None, [*overrides, "optimize.start=middle"])

    # The search is the one started from those weights by hand: the same candidates, the same result.
    def first_population(save_dir: str, *start: str) -> list[list[float]]:
        cfg = load_config(None, [*axis, *start, f"optimize.save_dir={save_dir}", "optimize.max_iterations=1"])
        run_optimize(cfg, log=lambda *_: None)
        return json.loads((Path(save_dir) / "p1_checkpoint.json").read_text())["told"][0]["candidates"]

    named = first_population(str(tmp_path / "named"), "optimize.start=persona_axis")
    by_hand = first_population(str(tmp_path / "by_hand"), "optimize.initial_weights=[0, 0, 2.0]")
    assert named == by_hand
    assert np.mean(named, axis=0)[-1] > 0.5  # centred on P = 2, not on zero (sigma0 0.5)

    # A start that leaves x0 at zeros is not part of the run's identity: an earlier run is found.
    before = [*overrides, "steering.persona_axis=false", f"optimize.save_dir={tmp_path / 'old'}"]
    run_optimize(
        load_config(None, [*before, "optimize.start=zeros", "optimize.max_iterations=1"]), log=lambda *_: None
    )
    lines: list[str] = []
    after = load_config(None, [*before, "optimize.start=persona_axis", "optimize.max_iterations=1"])
    run_optimize(after, log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any("finished run found" in line and "nothing to do" in line for line in lines), lines
