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
