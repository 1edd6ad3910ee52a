"""Command line: sub-commands map to stage functions; our errors become one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from persona_steering.config import Config, ConfigError, load_config

DEFAULT_CONFIG = "configs/default.yaml"

# Options shared by every sub-command: (flag, dotted config key, type, help).
COMMON = [
    ("--model", "model.name", str, "embedded, a hub id, a local folder or a .gguf file"),
    ("--precision", "model.precision", str, "auto, 32-true, bf16-true, 16-true, bf16-mixed"),
    ("--accelerator", "model.accelerator", str, "auto, cpu, cuda, mps"),
    ("--devices", "model.devices", int, "number of devices"),
    ("--seed", "seed", int, "seed for sampling and optimisation"),
    ("--cache-dir", "cache_dir", str, "diskcache folder"),
    ("--max-batch", "generation.max_batch", int, "rows per forward pass"),
    ("--max-new-tokens", "generation.max_new_tokens", int, "new tokens per answer"),
]

COMMANDS: dict[str, tuple[str, list[tuple[str, str, Any, str]]]] = {
    "vectors": (
        "extract per-layer trait vectors for the configured traits",
        [
            ("--traits", "vectors.traits", str, "comma-separated trait names (default R1..R5)"),
            ("--trait-dir", "vectors.trait_dir", str, "folder of trait files"),
            ("--n-per-question", "vectors.n_per_question", int, "answers per question and instruction"),
            ("--pairs-per-question", "vectors.pairs_per_question", int, "instruction pairs per question (0 = all)"),
            ("--out-dir", "vectors.out_dir", str, "output root for vector files"),
            ("--judge", "judge.backend", str, "judge backend for pair filtering (with --filter)"),
        ],
    ),
    "optimize": (
        "find the trait weights whose steering best reproduces a persona (CMA-ES, resumable)",
        [
            ("--persona-id", "optimize.persona_id", str, "persona folder name under --persona-dir"),
            ("--persona-dir", "optimize.persona_dir", str, "folder of personas"),
            ("--layer", "steering.layer", int, "hidden_states row to steer (output of block layer-1)"),
            ("--alpha", "steering.alpha", float, "strength, in units of the layer's mean residual norm"),
            ("--positions", "steering.positions", str, "response, prompt or all"),
            ("--vector-method", "steering.vector_method", str, "mean_diff, svd or pca"),
            ("--trait-vector-dir", "steering.trait_vector_dir", str, "root of vector files"),
            ("--traits", "traits", str, "comma-separated traits to combine (default R1..R5)"),
            ("--max-iterations", "optimize.max_iterations", int, "CMA-ES iterations"),
            ("--population-size", "optimize.population_size", int, "CMA-ES population"),
            ("--sigma0", "optimize.sigma0", float, "initial CMA-ES step size"),
            ("--num-prompts", "optimize.num_prompts", int, "first N training prompts"),
            ("--initial-weights", "optimize.initial_weights", str, "comma-separated start weights, one per trait"),
            ("--save-dir", "optimize.save_dir", str, "output folder"),
            ("--judge", "judge.backend", str, "embedding (offline), openai or local"),
            ("--judge-model", "judge.model", str, "judge model name (openai) or model (local)"),
            ("--base-url", "judge.base_url", str, "OpenAI-compatible endpoint"),
        ],
    ),
    "steer": (
        "show unsteered and steered answers for given trait weights",
        [
            ("--weights", "_weights", str, "e.g. R2=1.0,R5=-0.5 (unnamed traits get 0)"),
            ("--prompt", "_prompt", str, "what the user says (default: the first 3 training prompts)"),
            ("--layer", "steering.layer", int, "hidden_states row to steer"),
            ("--alpha", "steering.alpha", float, "strength, in units of the layer's mean residual norm"),
            ("--positions", "steering.positions", str, "response, prompt or all"),
            ("--vector-method", "steering.vector_method", str, "mean_diff, svd or pca"),
            ("--trait-vector-dir", "steering.trait_vector_dir", str, "root of vector files"),
            ("--traits", "traits", str, "comma-separated traits (default R1..R5)"),
        ],
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = _config(args)
        return int(_STAGES[args.command](cfg, args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-steering", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, options) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", default=None, help=f"YAML config (default {DEFAULT_CONFIG} if present)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config value by dotted key, e.g. --set generation.temperature=0.7")
        p.add_argument("-v", "--verbose", action="store_true", help="log retries and progress details")
        for flag, key, typ, help_ in COMMON + options:
            metavar = flag.lstrip("-").upper().replace("-", "_")
            p.add_argument(flag, dest=key, type=typ, default=None, metavar=metavar, help=f"{help_} [{key}]")
        for flag, dest, help_ in _FLAGS.get(name, []):
            p.add_argument(flag, dest=dest, action="store_true", help=help_)
    return parser


_FLAGS: dict[str, list[tuple[str, str, str]]] = {
    "vectors": [("--filter", "vectors.filter_with_judge", "keep only pairs the judge finds effective")],
    "optimize": [
        ("--restart", "optimize.restart", "discard an existing run of this persona in --save-dir"),
        ("--coherence", "judge.coherence", "also judge coherence of every steered answer"),
    ],
}


def _config(args: argparse.Namespace) -> Config:
    from pathlib import Path

    path = args.config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    overrides = list(args.overrides)
    for key, value in vars(args).items():
        if "." in key or key in ("seed", "cache_dir", "traits"):
            if value is None or value is False:
                continue
            if key in ("vectors.traits", "traits", "optimize.initial_weights"):
                overrides.append(f"{key}=[{value}]")
            else:
                overrides.append(f"{key}={'true' if value is True else value}")
    return load_config(path, overrides)


def _run_vectors(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.extraction import run_vectors

    results = run_vectors(cfg)
    if results:
        print(f"vectors in {results[0].path.rsplit('/', 1)[0]}/")
    for r in results:
        state = "up to date" if r.skipped else "written"
        print(f"  {r.trait}: {r.pairs} pairs from {r.questions} questions, |mean_diff| at layer {r.mid_layer} = {r.mid_norm:.2f} ({state})")
    return 0


def _run_optimize(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.optimize import run_optimize

    result = run_optimize(cfg)
    weights = "  ".join(f"{k}={v:+.2f}" for k, v in result["best_weights"].items())
    print(f"best weights  {weights}")
    print(f"persona fit   best {result['best_score']:.3f}   mean-of-search {result['mean_score']:.3f}   unsteered {result['baseline_score']:.3f}")
    return 0


def _run_steer(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.optimize import steered_examples

    weights: dict[str, float] = {}
    for item in filter(None, (args._weights or "").split(",")):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--weights item {item!r} must look like R2=1.0") from None
    for ex in steered_examples(cfg, weights, [args._prompt] if args._prompt else None):
        print(f"user:      {ex['prompt']}\nunsteered: {ex['baseline']}\nsteered:   {ex['steered']}\n")
    return 0


_STAGES: dict[str, Callable[[Config, argparse.Namespace], int]] = {
    "vectors": _run_vectors,
    "optimize": _run_optimize,
    "steer": _run_steer,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from persona_steering.layers import LayerError
    from persona_steering.runtime import ModelLoadError
    from persona_steering.store import VectorFileError
    from persona_steering.traits import DefinitionError

    from persona_steering.optimize import ResumeError

    errors: list[type[BaseException]] = [ConfigError, DefinitionError, ModelLoadError, VectorFileError, LayerError, ResumeError]
    try:
        from persona_steering.judges import JudgeError

        errors.append(JudgeError)
    except ImportError:
        pass
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
