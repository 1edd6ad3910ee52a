"""Configuration values a run cannot use are one-line ConfigErrors naming the option."""

import pytest

from persona_steering.cli import main
from persona_steering.config import ConfigError, load_config


@pytest.mark.parametrize(
    "override, message",
    [
        ("steering.alpha=nan", "steering.alpha must be a finite number"),
        ("steering.alpha=inf", "steering.alpha must be a finite number"),
        ("steering.alpha=0", "steering.alpha must be in (0, 10]"),
        ("steering.alpha=-1", "steering.alpha must be in (0, 10]"),
        ("steering.alpha=10.5", "steering.alpha must be in (0, 10]"),
        ("optimize.bound=nan", "optimize.bound must be a finite number"),
        ("optimize.bound=inf", "optimize.bound must be a finite number"),
        ("optimize.bound=0", "optimize.bound must be > 0"),
        ("optimize.sigma0=inf", "optimize.sigma0 must be a finite number"),
        ("generation.temperature=nan", "generation.temperature must be a finite number"),
        ("generation.temperature=inf", "generation.temperature must be a finite number"),
        ("generation.repetition_penalty=inf", "generation.repetition_penalty must be a finite number"),
        ("optimize.coherence_penalty=nan", "optimize.coherence_penalty must be a finite number"),
        ("optimize.coherence_penalty=-inf", "optimize.coherence_penalty must be a finite number"),
        ("judge.timeout=nan", "judge.timeout must be a finite number"),
        ("judge.timeout=inf", "judge.timeout must be a finite number"),
        ("judge.timeout=0", "judge.timeout must be > 0 seconds"),
        ("judge.max_retry_seconds=inf", "judge.max_retry_seconds must be a finite number"),
        ("judge.max_consecutive_failures=0", "judge.max_consecutive_failures must be >= 1"),
        ("vectors.filter_threshold=nan", "vectors.filter_threshold must be a finite number"),
    ],
)
def test_unusable_numbers_are_config_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_gives_one_line_for_a_nan(capsys):
    assert main(["optimize", "--set", "steering.alpha=nan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "steering.alpha must be a finite number" in err[0], err


def test_defaults_and_edges_are_accepted():
    cfg = load_config(None, ["steering.alpha=10", "generation.temperature=0"])
    assert cfg.steering.alpha == 10 and cfg.judge.timeout == 20.0


def test_the_shipped_yaml_and_the_dataclass_defaults_are_one_configuration():
    """A command run outside the repository (no configs/default.yaml) or through the Python API must
    get the measured defaults (repetition penalty, damage budget, budget), not other ones."""
    from pathlib import Path

    yaml_path = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    shipped, built_in = load_config(yaml_path).to_dict(), load_config(None).to_dict()
    differing = {
        f"{section}.{key}": (built_in[section][key], value)
        for section, values in shipped.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if built_in[section][key] != value
    }
    differing.update(
        {k: (built_in[k], v) for k, v in shipped.items() if not isinstance(v, dict) and built_in[k] != v}
    )
    assert differing == {}, differing
    assert load_config(yaml_path).digest() == load_config(None).digest()


def test_precision_mode_and_code_version_reach_the_generation_key(tiny_model_dir):
    """bf16-mixed and 32-true both hold float32 weights; their answers must not share cache entries."""
    from persona_steering.cache import digest
    from persona_steering.config import GenerationConfig, ModelConfig
    from persona_steering.generation import GENERATION_VERSION, _row_key
    from persona_steering.runtime import load_runtime

    keys = {}
    for precision in ("32-true", "bf16-mixed"):
        rt = load_runtime(
            ModelConfig(name=str(tiny_model_dir), accelerator="cpu", precision=precision),
            cache_dir=tiny_model_dir / "cache",
        )
        keys[precision] = _row_key(rt, "x", GenerationConfig(), 0, None, 0)
    a, b = keys["32-true"], keys["bf16-mixed"]
    assert a["dtype"] == b["dtype"] and digest(a) != digest(b)
    assert a["precision"] == "32-true" and b["precision"] == "bf16-mixed" and a["v"] == GENERATION_VERSION


@pytest.mark.parametrize("stage", ["evaluate", "sweep", "evaluate-models"])
def test_stages_that_do_not_share_work_refuse_several_processes(stage, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([stage, "--devices", "2", "--accelerator", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{stage} runs in one process" in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing loaded


def test_a_command_option_reaches_the_config_digest_by_flag_and_by_set():
    """bench --population was an _underscore option outside the config; now it is bench.population."""
    from persona_steering.cli import _config, _parser

    def config(*argv: str):
        return _config(_parser().parse_args(["bench", *argv]))

    by_flag, by_set = config("--population", "4"), config("--set", "bench.population=4")
    assert by_flag.bench.population == by_set.bench.population == 4
    assert by_flag.digest() == by_set.digest() and by_flag.digest("bench") == by_set.digest("bench")
    other = config("--population", "6")
    assert other.bench.population == 6 and other.digest() != by_flag.digest()
    assert other.digest("bench") != by_flag.digest("bench") and config().bench.population is None
    assert config("--population", "6", "--set", "bench.population=4").bench.population == 6  # flag wins
    assert config("--no-stages").bench.stages is False and config().bench.stages is True
