"""Bad input gets one clear line, exit 2, and leaves cache/ and runs/ as they were."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from persona_steering.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def base_args(workdir):
    return [
        "--cache-dir",
        str(workdir / "cache"),
        "--out-dir",
        str(workdir / "runs"),
        "--trait-dir",
        str(REPO / "configs/traits"),
    ]


def assert_untouched(workdir):
    assert not (workdir / "runs").exists()
    assert not (workdir / "cache").exists()


def test_unknown_trait(workdir, capsys):
    code, err = run_cli(["vectors", "--traits", "R9", *base_args(workdir)], capsys)
    assert code == 2 and len(err) == 1
    assert "unknown trait 'R9'" in err[0] and "R1, R2, R3, R4, R5" in err[0]
    assert_untouched(workdir)


def test_malformed_trait_file_names_file_and_field(workdir, capsys):
    traits = workdir / "traits"
    traits.mkdir()
    data = yaml.safe_load((REPO / "configs/traits/R2.yaml").read_text())
    del data["questions"]["eval"]
    (traits / "R2.yaml").write_text(yaml.safe_dump(data))
    code, err = run_cli(
        ["vectors", "--traits", "R2", *base_args(workdir)[:4], "--trait-dir", str(traits)], capsys
    )
    assert code == 2 and len(err) == 1
    assert "R2.yaml" in err[0] and "questions.eval" in err[0]
    (traits / "R2.yaml").write_text("name: [unclosed")
    code, err = run_cli(
        ["vectors", "--traits", "R2", *base_args(workdir)[:4], "--trait-dir", str(traits)], capsys
    )
    assert code == 2 and "not valid YAML" in err[0]
    assert_untouched(workdir)


def test_missing_model_path(workdir, capsys):
    code, err = run_cli(["vectors", "--model", "./no-such-model", *base_args(workdir)], capsys)
    assert code == 2 and len(err) == 1 and "no-such-model not found" in err[0]
    assert_untouched(workdir)


def test_unreadable_gguf(workdir, capsys):
    bad = workdir / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    code, err = run_cli(["vectors", "--model", str(bad), "--traits", "R2", *base_args(workdir)], capsys)
    assert code == 2 and len(err) == 1 and "cannot read GGUF file" in err[0]
    assert_untouched(workdir)


def test_bad_override_and_unknown_option(workdir, capsys):
    code, err = run_cli(["vectors", "--set", "generation.max_new_tokens=zero", *base_args(workdir)], capsys)
    assert code == 2 and "generation.max_new_tokens must be an integer" in err[0]
    code, err = run_cli(["vectors", "--set", "vectors.nope=1", *base_args(workdir)], capsys)
    assert code == 2 and "unknown option vectors.nope" in err[0]
    assert_untouched(workdir)


def test_entry_point_exit_code_and_help(workdir):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "persona_steering",
            "vectors",
            "--traits",
            "R9",
            "--trait-dir",
            str(REPO / "configs/traits"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown trait 'R9': no "
        + str(REPO / "configs/traits/R9.yaml")
        + " (known: R1, R2, R3, R4, R5)"
    ]
    helped = subprocess.run(
        [sys.executable, "-m", "persona_steering", "vectors", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0 and "--n-per-question" in helped.stdout


def test_filter_needs_a_judge_that_scores_traits(workdir, capsys):
    code, err = run_cli(["vectors", "--filter", "--judge", "embedding", *base_args(workdir)], capsys)
    assert code == 2 and len(err) == 1 and "--filter needs a judge that scores traits" in err[0]
    assert_untouched(workdir)


def _config_of(argv):
    from persona_steering.cli import _config, _parser

    return _config(_parser().parse_args(argv))


def test_typed_flags_arrive_as_typed_and_set_stays_yaml(workdir):
    cfg = _config_of(["optimize", "--persona-id", "007", "--judge-model", "m#1", "--set", "seed=3"])
    assert cfg.optimize.persona_id == "007" and cfg.judge.model == "m#1" and cfg.seed == 3
    assert _config_of(["optimize", "--persona-id", "yes"]).optimize.persona_id == "yes"
    cfg = _config_of(["optimize", "--personas", "007,yes", "--initial-weights", "1,-0.5"])
    assert cfg.optimize.personas == ["007", "yes"] and cfg.optimize.initial_weights == [1.0, -0.5]
    assert _config_of(["optimize", "--layers", "10,14"]).optimize.layers == [10, 14]
    # a flag wins over --set for the same key, as before
    assert _config_of(["optimize", "--seed", "5", "--set", "seed=3"]).seed == 5


@pytest.mark.parametrize("bad", ["/tmp/x", "../p", "a/b", "", "_x", "a" * 65])
def test_persona_id_that_is_a_path_is_refused(workdir, capsys, bad):
    for command in ("optimize", "evaluate", "export-gguf", "report"):
        code, err = run_cli([command, "--persona-id", bad, "--cache-dir", str(workdir / "cache")], capsys)
        assert code == 2 and len(err) == 1 and "not a usable persona id" in err[0], (command, err)
    code, err = run_cli(["optimize", "--personas", f"ok,{bad}x" if bad else "ok,/x"], capsys)
    assert code == 2 and "optimize.personas" in err[0]
    assert_untouched(workdir)


def _readme_make_lines() -> list[str]:
    """Every `make <target> ...` the README shows, with its VAR=value arguments."""
    import re

    targets = set(re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), re.M))
    text = (REPO / "README.md").read_text()
    found = re.findall(r"""\bmake ([a-z-]+)((?: [A-Z]+=(?:"[^"]*"|[^\s`]+))*)""", text)
    return sorted({f"make {target}{rest}" for target, rest in found if target in targets})


def test_readme_make_lines_give_each_command_only_options_it_knows(tmp_path):
    """Dry-run (make -n) every README make line; each CLI line it prints must parse and configure."""
    import os
    import shlex
    import time

    from persona_steering.cli import _config, _parser

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()
    future = time.time() + 3600  # newer than pyproject.toml: make sees nothing to install
    os.utime(venv / ".installed", (future, future))
    lines = _readme_make_lines()
    assert any('ARGS="--layer 20"' in line or "--layer 20" in line for line in lines)
    assert any(line.startswith("make steer") for line in lines)
    cli = f"{venv}/bin/persona-steering"
    commands = 0
    for line in lines:
        words = shlex.split(line)
        if words[1] in ("setup", "test", "lint", "help", "clean-runs"):
            continue
        proc = subprocess.run(
            ["make", "-n", "-C", str(REPO), *words[1:], f"VENV={venv}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, (line, proc.stderr)
        for printed in proc.stdout.splitlines():
            if not printed.startswith(cli):
                continue
            argv = shlex.split(printed)[1:]
            args = _parser().parse_args(argv)  # SystemExit(2) on an option the command does not know
            _config(args)
            commands += 1
    assert commands >= len(lines) // 2


def test_make_passes_args_only_to_the_targets_own_command(tmp_path):
    import shlex

    proc = subprocess.run(
        ["make", "-n", "-C", str(REPO), "optimize", "ARGS=--layer 20", "MODEL=./m", "VENV=/nonexistent"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    cli = [shlex.split(x)[1:] for x in proc.stdout.splitlines() if "persona-steering" in x]
    assert cli[-2][:3] == ["vectors", "--model", "./m"] and "--layer" not in cli[-2]
    assert cli[-1][0] == "optimize" and cli[-1][-2:] == ["--layer", "20"] and "./m" in cli[-1]


def test_coherence_penalty_needs_coherence_verdicts(workdir, capsys):
    code, err = run_cli(["optimize", "--persona-id", "p", "--coherence-penalty", "0.5"], capsys)
    assert code == 2 and len(err) == 1 and "needs judge.coherence (--coherence)" in err[0]
    cfg = _config_of(["optimize", "--coherence", "--coherence-penalty", "0.5"])
    assert cfg.judge.coherence and cfg.optimize.coherence_penalty == 0.5
    assert_untouched(workdir)


def test_stage_text_is_rendered_by_the_stage_modules():
    from persona_steering.convergence import render_layers, render_personas, render_result
    from persona_steering.rendering import render_examples

    r = {
        "selected": "mean",
        "weights": {"R1": 0.25, "R2": -0.5},
        "best_weights": {"R1": 0.5, "R2": -1.0},
        "best_score": 3.5,
        "mean_score": 3.0,
        "baseline_score": 2.25,
    }
    assert render_result(r).splitlines() == [
        "mean weights  R1=+0.25  R2=-0.50",
        "persona fit   best candidate 3.500   search mean 3.000   unsteered 2.250",
    ]
    row = "| p1 | 3.500 | 3.000 | 2.250 | mean | R1=+0.25 R2=-0.50 |"
    assert render_personas({"p1": r}).splitlines()[-1] == row
    legacy = {k: v for k, v in r.items() if k not in ("selected", "weights")}  # before optimize.select
    assert render_result(legacy).splitlines()[0] == "best weights  R1=+0.50  R2=-1.00"
    # Under the scores, what the persona says: the first three stored answer pairs, in order.
    said = [{"prompt": f"q{i}", "baseline": f"plain {i}", "steered": f"voiced {i}"} for i in range(5)]
    lines = render_result({**r, "examples": said}).splitlines()
    assert lines[:2] == render_result(r).splitlines() and "3 of 5 training prompts" in lines[3]
    assert [line for line in lines if line.startswith("steered:")] == [
        f"steered:   voiced {i}" for i in range(3)
    ]
    summary = {"persona_id": "p1", "layers": [{**r, "layer": 10}], "best_layer": 10, "best_score": 3.5}
    assert render_layers(summary).splitlines()[-2:] == [
        "| 10 | 3.500 | 3.000 | 2.250 |",
        "best layer for p1: 10 (fit 3.500)",
    ]
    text = render_examples([{"prompt": "hi", "baseline": "b", "steered": "s"}] * 2)
    assert text.count("user:      hi\nunsteered: b\nsteered:   s\n") == 2


def test_one_flag_one_meaning():
    from persona_steering.cli import _FLAGS, _POSITIONAL, COMMANDS, _options

    meaning: dict[str, set[str]] = {}
    for command in COMMANDS:
        for flag, key, _, _ in _options(command):
            meaning.setdefault(flag, set()).add(key)
            assert "." in key or key in ("seed", "cache_dir", "traits"), (command, flag, key)
    for flags in _FLAGS.values():
        assert all("." in key for _, key, _, _ in flags)
    # Every option is a config key; import-gguf's file alone is read and shown, never configured.
    assert [key for p in _POSITIONAL.values() for key, _, _ in p if "." not in key] == ["_file"]
    shared = {flag for flag, keys in meaning.items() if len(keys) > 1}
    # Each of these names the command's own output folder or file, grid, sample size, repeats or
    # threads; --traits is the extraction list for `vectors` and the combined traits elsewhere;
    # --max-new-tokens is generation.max_new_tokens except for bench (M, whose default --quick
    # changes) and bench-serve (tokens per answer), which keep their own defaults.
    per_command = {
        "--out-dir",
        "--out",
        "--layers",
        "--read-layer",
        "--num-prompts",
        "--trait",
        "--num-questions",
        "--traits",
        "--repeats",
        "--num-personas",
        "--threads",
        "--max-new-tokens",
    }
    assert shared <= per_command, shared - per_command
    assert meaning["--layer"] == {"steering.layer"} and meaning["--base-url"] == {"judge.base_url"}
    assert meaning["--personas"] == {"optimize.personas"}
    assert meaning["--prompt"] == {"steer.prompt"} and meaning["--weights"] == {"steer.weights"}
