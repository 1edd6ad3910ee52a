"""Command line: sub-commands map to stage functions; our errors become one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from persona_steering.config import Config, ConfigError, load_config

DEFAULT_CONFIG = "configs/default.yaml"

# Options shared by every sub-command: (flag, dotted config key, type, help).
COMMON = [
    ("--model", "model.name", str, "embedded, a hub id, a local folder or a .gguf file"),
    ("--precision", "model.precision", str, "auto, 32-true, bf16-true, 16-true, bf16-mixed"),
    ("--accelerator", "model.accelerator", str, "auto, cpu, cuda, mps"),
    ("--devices", "model.devices", int, "devices (processes) per node; >1 deals rows across them"),
    ("--num-nodes", "model.num_nodes", int, "machines (multi-node runs start through srun/torchrun)"),
    ("--strategy", "model.strategy", str, "auto or ddp"),
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
            (
                "--pairs-per-question",
                "vectors.pairs_per_question",
                int,
                "instruction pairs per question (0 = all)",
            ),
            ("--out-dir", "vectors.out_dir", str, "output root for vector files"),
            ("--judge", "judge.backend", str, "judge backend for pair filtering (with --filter)"),
        ],
    ),
    "optimize": (
        "find the trait weights whose steering best reproduces a persona (CMA-ES, resumable)",
        [
            ("--persona-id", "optimize.persona_id", str, "persona folder name under --persona-dir"),
            ("--personas", "optimize.personas", str, "comma-separated persona ids, optimised in lockstep"),
            ("--persona-dir", "optimize.persona_dir", str, "folder of personas"),
            ("--layer", "steering.layer", int, "hidden_states row to steer (output of block layer-1)"),
            (
                "--layers",
                "optimize.layers",
                str,
                "comma-separated layers: one run per layer, best layer reported",
            ),
            ("--alpha", "steering.alpha", float, "strength, in units of the layer's mean residual norm"),
            ("--positions", "steering.positions", str, "response, prompt or all"),
            ("--vector-method", "steering.vector_method", str, "mean_diff, svd or pca"),
            ("--trait-vector-dir", "steering.trait_vector_dir", str, "root of vector files"),
            ("--traits", "traits", str, "comma-separated traits to combine (default R1..R5)"),
            ("--max-iterations", "optimize.max_iterations", int, "CMA-ES iterations"),
            ("--population-size", "optimize.population_size", int, "CMA-ES population"),
            ("--sigma0", "optimize.sigma0", float, "initial CMA-ES step size"),
            ("--num-prompts", "optimize.num_prompts", int, "first N training prompts"),
            (
                "--initial-weights",
                "optimize.initial_weights",
                str,
                "comma-separated start weights, one per axis (R1-R5, then P with the persona axis)",
            ),
            ("--save-dir", "optimize.save_dir", str, "output folder"),
            ("--select", "optimize.select", str, "weights to report and serve: mean (search mean) or best"),
            (
                "--coherence-penalty",
                "optimize.coherence_penalty",
                float,
                "subtract P x (1 - coherence/100) from the fit (needs --coherence)",
            ),
            ("--judge", "judge.backend", str, "offline (default), embedding, openai or local"),
            ("--judge-model", "judge.model", str, "judge model name (openai) or model (local)"),
            ("--base-url", "judge.base_url", str, "OpenAI-compatible endpoint"),
        ],
    ),
    "steer": (
        "show unsteered and steered answers for given trait weights",
        [
            ("--weights", "steer.weights", str, "e.g. R2=1.0,R5=-0.5 (unnamed traits get 0)"),
            ("--prompt", "steer.prompt", str, "what the user says (default: the first 3 training prompts)"),
            ("--layer", "steering.layer", int, "hidden_states row to steer"),
            ("--alpha", "steering.alpha", float, "strength, in units of the layer's mean residual norm"),
            ("--positions", "steering.positions", str, "response, prompt or all"),
            ("--vector-method", "steering.vector_method", str, "mean_diff, svd or pca"),
            ("--trait-vector-dir", "steering.trait_vector_dir", str, "root of vector files"),
            ("--traits", "traits", str, "comma-separated traits (default R1..R5)"),
        ],
    ),
    "bench": (
        "time one CMA-ES generation's answers three ways, the extraction forward and judge fan-out",
        [
            ("--population", "bench.population", int, "candidate weight vectors (default 8; --quick 4)"),
            ("--num-prompts", "bench.num_prompts", int, "first N training prompts (default 10; --quick 4)"),
            ("--repeats", "bench.repeats", int, "timed runs per method (default 1)"),
            ("--out-dir", "bench.out_dir", str, "output folder (default runs/bench)"),
            ("--verdicts", "bench.verdicts", int, "judge calls in the fan-out measurement (default 100)"),
            ("--num-personas", "bench.personas", int, "personas in the lockstep measurement (default 4)"),
            (
                "--judge-delay",
                "bench.judge_delay",
                float,
                "seconds the local judge server waits per reply (0.2)",
            ),
            ("--threads", "bench.threads", int, "torch CPU threads during the run (default: one per core)"),
            (
                "--max-new-tokens",
                "bench.max_new_tokens",
                int,
                "M: new tokens per answer (default 48; --quick 16)",
            ),
            ("--layer", "steering.layer", int, "hidden_states row to steer"),
            ("--alpha", "steering.alpha", float, "strength, in units of the layer's mean residual norm"),
            ("--trait-vector-dir", "steering.trait_vector_dir", str, "root of vector files"),
            ("--traits", "traits", str, "comma-separated traits (default R1..R5)"),
        ],
    ),
    "export-gguf": (
        "write a persona's optimised steering vector (or single traits) as a llama.cpp control vector",
        [
            ("--persona-id", "optimize.persona_id", str, "persona whose optimisation result to export"),
            ("--save-dir", "optimize.save_dir", str, "folder of optimisation results"),
            ("--traits", "traits", str, "traits of the basis without --persona-id (default R1..R5)"),
            (
                "--single-traits",
                "export.single_traits",
                str,
                "export these traits one file each instead, e.g. R1,R2",
            ),
            ("--weight", "export.weight", float, "trait weight of each --single-traits export (default 1)"),
            ("--layer", "steering.layer", int, "hidden_states row for --single-traits without --persona-id"),
            ("--alpha", "steering.alpha", float, "strength for --single-traits without --persona-id"),
            ("--trait-vector-dir", "steering.trait_vector_dir", str, "root of vector files"),
            ("--out", "export.out", str, "output file (default runs/export/<persona>.gguf)"),
            ("--out-dir", "export.out_dir", str, "output folder (default runs/export)"),
        ],
    ),
    "import-gguf": ("read a llama.cpp control-vector GGUF (ours or repeng's) and show its vectors", []),
    "evaluate": (
        "compare steering with baselines on the held-out prompts (intervals, paired tests, judge agreement)",
        [
            ("--persona-id", "optimize.persona_id", str, "persona folder name under --persona-dir"),
            ("--persona-dir", "optimize.persona_dir", str, "folder of personas"),
            ("--save-dir", "optimize.save_dir", str, "folder of <persona>_optimization.json and outputs"),
            ("--prompts-file", "optimize.prompts_file", str, "prompts file with 'train' and 'heldout' lists"),
            ("--methods", "evaluate.methods", str, "e.g. base,prompt,proposed (default all)"),
            ("--num-prompts", "evaluate.num_prompts", int, "first N held-out prompts (default all)"),
            ("--judge", "judge.backend", str, "offline (default), embedding, openai or local"),
            ("--judges", "evaluate.judges", str, "several judges at once, e.g. offline,openai"),
            ("--judge-model", "judge.model", str, "judge model name (openai) or model (local)"),
            ("--base-url", "judge.base_url", str, "OpenAI-compatible endpoint"),
            ("--bootstrap", "evaluate.bootstrap", int, "bootstrap resamples for the intervals"),
            ("--vector-strength", "evaluate.vector_strength", float, "meandiff/pca length (alpha units)"),
            ("--layer", "steering.layer", int, "layer if no optimisation result (else its layer)"),
            ("--alpha", "steering.alpha", float, "strength if no optimisation result (else its alpha)"),
            ("--traits", "traits", str, "traits without an optimisation result (else the result's)"),
            ("--trait-dir", "vectors.trait_dir", str, "folder of trait files (for their eval prompts)"),
            ("--trait-vector-dir", "steering.trait_vector_dir", str, "root of vector files"),
        ],
    ),
    "sweep": (
        "trait expression and coherence of one trait vector over a grid of layers x coefficients",
        [
            ("--trait", "sweep.trait", str, "the trait to sweep, e.g. R2"),
            ("--layers", "sweep.layers", str, "comma-separated hidden_states rows (default 10,14,18,22)"),
            ("--coefs", "sweep.coefs", str, "strengths in alpha units: --coefs=-1,-0.5,0.5,1"),
            ("--num-questions", "sweep.num_questions", int, "first N of the trait's eval questions"),
            ("--read-layer", "sweep.read_layer", int, "layer of the judge-free projection proxy"),
            ("--out-dir", "sweep.out_dir", str, "output root (<out-dir>/<model-slug>/<trait>/)"),
            ("--positions", "steering.positions", str, "response, prompt or all"),
            ("--vector-method", "steering.vector_method", str, "mean_diff, svd or pca"),
            ("--trait-dir", "vectors.trait_dir", str, "folder of trait files"),
            ("--trait-vector-dir", "steering.trait_vector_dir", str, "root of vector files"),
            ("--judge", "judge.backend", str, "offline (default), embedding, openai or local"),
            ("--judge-model", "judge.model", str, "judge model name (openai) or model (local)"),
            ("--base-url", "judge.base_url", str, "OpenAI-compatible endpoint"),
        ],
    ),
    "interference": (
        "is the trait basis linear and independent? leakage, linearity and additivity of R1-R5 in both bases",
        [
            (
                "--strengths",
                "interference.strengths",
                str,
                "single-trait strengths: --strengths=-1,-0.5,0.5,1",
            ),
            ("--pair-strength", "interference.pair_strength", float, "every pair at +- this each"),
            ("--num-questions", "interference.num_questions", int, "first N eval questions of each trait"),
            ("--num-prompts", "interference.num_prompts", int, "first N conversational held-out prompts"),
            ("--bases", "interference.bases", str, "traits,orthogonal (default both)"),
            ("--grid-tokens", "interference.max_new_tokens", int, "tokens per grid answer"),
            ("--read-layer", "interference.read_layer", int, "layer of the activation-projection scorer"),
            ("--out-dir", "interference.out_dir", str, "output root (<out-dir>/<model-slug>/)"),
            ("--layer", "steering.layer", int, "hidden_states row to steer"),
            ("--traits", "traits", str, "comma-separated traits (default R1..R5)"),
            ("--trait-dir", "vectors.trait_dir", str, "folder of trait files"),
            ("--trait-vector-dir", "steering.trait_vector_dir", str, "root of vector files"),
            (
                "--judge",
                "judge.backend",
                str,
                "openai or local add the LLM trait judge to the offline scorers",
            ),
            ("--judge-model", "judge.model", str, "judge model name (openai) or model (local)"),
            ("--base-url", "judge.base_url", str, "OpenAI-compatible endpoint"),
        ],
    ),
    "damage": (
        "damage curve: next-token KL, perplexity and loop rate against steering norm per layer; the budget",
        [
            ("--layers", "damage.layers", str, "comma-separated hidden_states rows (default 10,14,18,20,22)"),
            ("--norms", "damage.norms", str, "steering norms in alpha units: --norms=0.25,0.5,1,2"),
            ("--num-prompts", "damage.num_prompts", int, "first N held-out prompts for the loop rate"),
            ("--max-kl", "damage.max_kl", float, "budget: mean next-token KL in nats"),
            ("--out-dir", "damage.out_dir", str, "output root (<out-dir>/<model-slug>/)"),
            ("--traits", "traits", str, "comma-separated traits (default R1..R5)"),
            ("--trait-vector-dir", "steering.trait_vector_dir", str, "root of vector files"),
        ],
    ),
    "judge-check": (
        "score the hand-written calibration answers: does the judge rank in-voice > assistant > degenerate?",
        [
            ("--judge", "judge.backend", str, "offline (default), embedding, openai or local"),
            ("--judge-model", "judge.model", str, "judge model name (openai) or model (local)"),
            ("--base-url", "judge.base_url", str, "OpenAI-compatible endpoint"),
            ("--calibration-dir", "judge.calibration_dir", str, "folder of <persona>.json calibration sets"),
            ("--persona-dir", "optimize.persona_dir", str, "folder of personas"),
        ],
    ),
    "similarity": (
        "cosine similarity of trait vectors: between traits, between extraction methods, across layers",
        [
            ("--traits", "traits", str, "comma-separated traits (default R1..R5)"),
            ("--layer", "steering.layer", int, "hidden_states row of the heatmap and tables"),
            ("--vector-method", "steering.vector_method", str, "mean_diff, svd or pca"),
            ("--trait-vector-dir", "steering.trait_vector_dir", str, "root of vector files"),
            ("--out-dir", "similarity.out_dir", str, "output root (<out-dir>/<model-slug>/)"),
        ],
    ),
    "project": (
        "project answers in a CSV/JSONL file onto trait vectors (optionally the shift under a second model)",
        [
            ("--traits", "traits", str, "comma-separated traits (default R1..R5)"),
            (
                "--layers",
                "project.layers",
                str,
                "comma-separated hidden_states rows (default steering.layer)",
            ),
            ("--vector-method", "steering.vector_method", str, "mean_diff, svd or pca"),
            ("--trait-vector-dir", "steering.trait_vector_dir", str, "root of vector files"),
            (
                "--compare-model",
                "project.compare_model",
                str,
                "a second model (e.g. a fine-tune) read the same way",
            ),
            ("--out", "project.out", str, "output CSV (default <input>_projections.csv beside the input)"),
        ],
    ),
    "monitor": (
        "colour each token of a generated answer by its projection onto one trait",
        [
            ("--trait", "monitor.trait", str, "the trait to monitor, e.g. R5"),
            ("--prompt", "steer.prompt", str, "what the user says"),
            ("--system", "monitor.system", str, "an optional system prompt"),
            ("--read-layer", "monitor.read_layer", int, "hidden_states row to read (default --layer)"),
            ("--weights", "steer.weights", str, "steer while monitoring, e.g. R2=1.0 (default unsteered)"),
            ("--layer", "steering.layer", int, "hidden_states row to steer"),
            ("--alpha", "steering.alpha", float, "strength, in units of the layer's mean residual norm"),
            ("--traits", "traits", str, "traits the weights name (default R1..R5)"),
            ("--vector-method", "steering.vector_method", str, "mean_diff, svd or pca"),
            ("--trait-dir", "vectors.trait_dir", str, "folder of trait files (for the poles' labels)"),
            ("--trait-vector-dir", "steering.trait_vector_dir", str, "root of vector files"),
            ("--out-dir", "monitor.out_dir", str, "folder of the plot and its JSON (default runs/monitor)"),
        ],
    ),
    "new-trait": (
        "draft a trait definition with the configured LLM and write <trait-dir>/<NAME>.yaml",
        [
            ("--trait", "new_trait.trait", str, "the new trait's name (the file name)"),
            ("--description", "new_trait.description", str, "what the trait is, its two poles"),
            ("--trait-dir", "vectors.trait_dir", str, "folder of trait files"),
            ("--judge", "judge.backend", str, "must be openai: the LLM that writes the draft"),
            ("--judge-model", "judge.model", str, "model name at the endpoint"),
            ("--base-url", "judge.base_url", str, "OpenAI-compatible endpoint"),
        ],
    ),
    "build-persona": (
        "build personas/<ID>/ from one speaker's turns in a raw_conversations.json (offline)",
        [
            (
                "--conversations",
                "build_persona.conversations",
                str,
                "JSON list of conversations of {speaker, text} turns",
            ),
            ("--speaker", "build_persona.speaker", str, "whose turns make the persona"),
            ("--persona-id", "optimize.persona_id", str, "the new persona's folder name"),
            ("--persona-dir", "optimize.persona_dir", str, "folder of personas"),
            (
                "--num-samples",
                "build_persona.num_samples",
                int,
                "representative utterances kept (default 15)",
            ),
        ],
    ),
    "report": (
        "one self-contained HTML page per persona: configuration, convergence, evaluation, answers",
        [
            ("--persona-id", "optimize.persona_id", str, "persona whose results to show"),
            ("--save-dir", "optimize.save_dir", str, "folder of optimisation and evaluation results"),
            ("--persona-dir", "optimize.persona_dir", str, "folder of personas (for the profile)"),
            ("--out-dir", "report.out_dir", str, "output folder (default runs/report)"),
            (
                "--max-examples",
                "report.max_examples",
                int,
                "prompts shown with answers side by side (default 4)",
            ),
        ],
    ),
    "evaluate-models": (
        "score several models on the traits' eval questions, unprompted and under pos/neg instructions",
        [
            (
                "--models",
                "models.models",
                str,
                "comma-separated: embedded, folder, .gguf, hub id, openai:<model>",
            ),
            ("--traits", "traits", str, "comma-separated traits (default R1..R5)"),
            ("--num-questions", "models.num_questions", int, "first N eval questions per trait (default 5)"),
            (
                "--models-base-url",
                "models.base_url",
                str,
                "endpoint of the openai:<model> entries (default --base-url)",
            ),
            ("--out-dir", "models.out_dir", str, "output folder (default runs/models)"),
            ("--trait-dir", "vectors.trait_dir", str, "folder of trait files"),
            ("--judge", "judge.backend", str, "offline or embedding (no trait scores), openai or local"),
            ("--judge-model", "judge.model", str, "judge model name (openai) or model (local)"),
            ("--base-url", "judge.base_url", str, "OpenAI-compatible endpoint of the judge"),
            ("--bootstrap", "evaluate.bootstrap", int, "bootstrap resamples for the intervals"),
        ],
    ),
    "bench-serve": (
        "time the persona server: concurrent vs one-at-a-time requests, time to first token, vs offline",
        [
            (
                "--requests",
                "serve_bench.requests",
                int,
                "requests in the throughput measurement (default 32)",
            ),
            (
                "--num-personas",
                "serve_bench.personas",
                int,
                "scratch personas they are spread over (default 4)",
            ),
            (
                "--background",
                "serve_bench.background",
                int,
                "requests decoding during the first-token probe (16)",
            ),
            ("--probes", "serve_bench.probes", int, "first-token measurements, median reported (default 3)"),
            (
                "--repeats",
                "serve_bench.repeats",
                int,
                "runs of the concurrent and offline measurements (default 3)",
            ),
            (
                "--threads",
                "serve_bench.threads",
                int,
                "torch CPU threads during the run (default: one per core)",
            ),
            ("--out-dir", "serve_bench.out_dir", str, "output folder (default runs/bench)"),
            ("--max-new-tokens", "serve_bench.max_tokens", int, "new tokens per answer (default 48)"),
        ],
    ),
    "serve": (
        "serve the personas: OpenAI- and Ollama-compatible API and a chat page, one batched decode loop",
        [
            ("--host", "serve.host", str, "address to bind (default 127.0.0.1: this machine only)"),
            ("--port", "serve.port", int, "TCP port"),
            ("--api-key-env", "serve.api_key_env", str, "environment variable whose key clients must send"),
            ("--max-queue", "serve.max_queue", int, "waiting requests before 429"),
            ("--max-rows", "serve.max_rows", int, "rows decoded together"),
            ("--max-tokens", "serve.max_tokens", int, "new tokens when a request names none"),
            ("--save-dir", "optimize.save_dir", str, "folder of optimised personas"),
            ("--trait-vector-dir", "steering.trait_vector_dir", str, "root of vector files"),
        ],
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    handles_signals = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if handles_signals else None
    try:
        cfg = _config(args)
        code = int(_STAGES[args.command](cfg, args) or 0)
        _leave_process_group(finished=True)
        return code
    except (KeyboardInterrupt, Terminated) as exc:
        # The stage has unwound: checkpoints and cache entries are written whole or not at all.
        print(
            "interrupted: finished iterations and every verdict received are kept; "
            "run the same command to resume",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # At once: judge calls still in flight would hold a normal exit for up to judge.timeout.
        os._exit(143 if isinstance(exc, Terminated) else 130)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        _leave_process_group(finished=False)
        return 2
    finally:
        if handles_signals:
            signal.signal(signal.SIGTERM, previous)


def _leave_process_group(finished: bool) -> None:
    if "torch" in sys.modules:  # commands that never loaded torch have no process group to leave
        from persona_steering.distributed import leave_process_group

        leave_process_group(finished)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as KeyboardInterrupt is for SIGINT (exit code 143)."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-steering", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, options) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", default=None, help=f"YAML config (default {DEFAULT_CONFIG} if present)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override any config value by dotted key, e.g. --set generation.temperature=0.7",
        )
        p.add_argument("-v", "--verbose", action="store_true", help="log retries and progress details")
        for flag, key, typ, help_ in _options(name):
            metavar = flag.lstrip("-").upper().replace("-", "_")
            p.add_argument(flag, dest=key, type=typ, default=None, metavar=metavar, help=f"{help_} [{key}]")
        for flag, key, value, help_ in _FLAGS.get(name, []):
            p.add_argument(
                flag, dest=key, action="store_const", const=value, default=None, help=f"{help_} [{key}]"
            )
        for key, metavar, help_ in _POSITIONAL.get(name, []):
            p.add_argument(key, metavar=metavar, help=help_)
    return parser


def _options(command: str) -> list[tuple[str, str, Any, str]]:
    """COMMON then the command's own options; a command's own entry for a common flag replaces it
    (bench's --max-new-tokens is its M, whose default depends on --quick)."""
    own = COMMANDS[command][1]
    flags = {flag for flag, *_ in own}
    return [o for o in COMMON if o[0] not in flags] + own


# Switches: (flag, dotted config key, the value it sets, help).
_FLAGS: dict[str, list[tuple[str, str, bool, str]]] = {
    "vectors": [("--filter", "vectors.filter_with_judge", True, "keep only pairs the judge finds effective")],
    "optimize": [
        ("--restart", "optimize.restart", True, "discard an existing run of this persona in --save-dir"),
        (
            "--coherence",
            "judge.coherence",
            True,
            "also judge coherence of every steered answer (recorded; used only with --coherence-penalty)",
        ),
    ],
    "bench": [
        (
            "--quick",
            "bench.quick",
            True,
            "P=4 candidates, N=4 prompts, M=16 tokens (about 2 minutes on a CPU)",
        ),
        ("--no-stages", "bench.stages", False, "skip the cold/warm runs of the vectors and optimize stages"),
    ],
    "new-trait": [("--overwrite", "new_trait.overwrite", True, "replace an existing trait file")],
    "build-persona": [("--overwrite", "build_persona.overwrite", True, "replace an existing persona folder")],
}

# Positional arguments: (dotted config key, or an _underscore name the config does not hold; metavar; help).
_POSITIONAL: dict[str, list[tuple[str, str, str]]] = {
    "import-gguf": [("_file", "FILE", "the .gguf control-vector file (read and shown; nothing is written)")],
    "project": [
        (
            "project.input",
            "ANSWERS",
            "CSV or JSONL file with prompt (or question), answer and optional system [project.input]",
        )
    ],
}


def _config(args: argparse.Namespace) -> Config:
    from pathlib import Path

    path = args.config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    # Flags arrive typed by argparse and are applied as they are; only --set values are YAML.
    values = {
        key: value
        for key, value in vars(args).items()
        if ("." in key or key in ("seed", "cache_dir", "traits")) and value is not None
    }
    return load_config(path, list(args.overrides), values)


def _run_vectors(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.distributed import is_main_process
    from persona_steering.extraction import render_vectors, run_vectors

    results = run_vectors(cfg)
    if is_main_process():  # with several processes, rank 0 alone prints
        print(render_vectors(results))
    return 0


def _run_optimize(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.convergence import render_layers, render_personas, render_result
    from persona_steering.distributed import is_main_process
    from persona_steering.optimize import run_layers, run_optimize, run_personas

    if cfg.optimize.personas:
        text = render_personas(run_personas(cfg, cfg.optimize.personas))
    elif cfg.optimize.layers:
        text = render_layers(run_layers(cfg, cfg.optimize.layers))
    else:
        text = render_result(run_optimize(cfg))
    if is_main_process():  # with several processes, rank 0 alone prints
        print(text)
    return 0


def _run_steer(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.steer import run_steer

    print(run_steer(cfg))
    return 0


def _run_bench(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.bench import run_bench

    run_bench(cfg)
    return 0


def _run_export_gguf(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.export import run_export

    run_export(cfg)
    return 0


def _run_import_gguf(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.export import describe_control_vector

    print(describe_control_vector(args._file))
    return 0


def _run_evaluate(cfg: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    from persona_steering.evaluate.run import run_evaluate

    result = run_evaluate(cfg)
    print(Path(result["files"]["md"]).read_text())
    return 0


def _run_sweep(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.evaluate.sweep import render_sweep, run_sweep

    print(render_sweep(run_sweep(cfg)))
    return 0


def _run_interference(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.interference import run_interference
    from persona_steering.interference_report import render_interference

    print(render_interference(run_interference(cfg)))
    return 0


def _run_damage(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.damage import render_damage, run_damage

    print(render_damage(run_damage(cfg)))
    return 0


def _run_judge_check(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.calibration import run_judge_check

    run_judge_check(cfg)
    return 0


def _run_similarity(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.evaluate.similarity import run_similarity

    print(run_similarity(cfg)["markdown"])
    return 0


def _run_project(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.projection import run_project

    print(run_project(cfg)["markdown"])
    return 0


def _run_monitor(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering import monitor

    print(monitor.render(monitor.run_monitor(cfg), color=sys.stdout.isatty()))
    return 0


def _run_new_trait(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.authoring import new_trait

    new_trait(cfg)
    return 0


def _run_build_persona(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.persona_builder import build_persona

    build_persona(cfg)
    return 0


def _run_report(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.html_report import run_report

    run_report(cfg)
    return 0


def _run_evaluate_models(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.evaluate.models import render_run, run_models

    print(render_run(run_models(cfg)))
    return 0


def _run_bench_serve(cfg: Config, args: argparse.Namespace) -> int:
    from persona_steering.serve_bench import run_serve_bench

    run_serve_bench(cfg)
    return 0


def _run_serve(cfg: Config, args: argparse.Namespace) -> int:
    try:
        from persona_steering.serve import run_serve
    except ImportError as exc:
        missing = f"{exc.name} is missing"
        raise ConfigError(f"serve needs the serve extra ({missing}): pip install -e '.[serve]'") from None
    run_serve(cfg)
    return 0


_STAGES: dict[str, Callable[[Config, argparse.Namespace], int]] = {
    "vectors": _run_vectors,
    "optimize": _run_optimize,
    "steer": _run_steer,
    "bench": _run_bench,
    "export-gguf": _run_export_gguf,
    "import-gguf": _run_import_gguf,
    "evaluate": _run_evaluate,
    "sweep": _run_sweep,
    "interference": _run_interference,
    "damage": _run_damage,
    "similarity": _run_similarity,
    "judge-check": _run_judge_check,
    "project": _run_project,
    "monitor": _run_monitor,
    "new-trait": _run_new_trait,
    "build-persona": _run_build_persona,
    "report": _run_report,
    "evaluate-models": _run_evaluate_models,
    "serve": _run_serve,
    "bench-serve": _run_bench_serve,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from persona_steering.cache import CacheError, LockedError
    from persona_steering.checkpoint import ResumeError
    from persona_steering.layers import LayerError
    from persona_steering.runtime import ModelLoadError
    from persona_steering.store import VectorFileError
    from persona_steering.traits import DefinitionError

    errors: list[type[BaseException]] = [
        ConfigError,
        DefinitionError,
        ModelLoadError,
        VectorFileError,
        LayerError,
        ResumeError,
        CacheError,
        LockedError,
    ]
    try:
        from persona_steering.judges import JudgeError

        errors.append(JudgeError)
    except ImportError:
        pass
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
