"""The ``evaluate-models`` stage: several models scored on the traits' eval questions, by prompting alone.

For each model and trait, the trait's first ``num_questions`` eval questions are answered three ways:
unprompted, under the trait's first positive instruction and under its first negative one (as the
system prompt). The judge scores trait expression (0-100, the trait's eval prompt) and coherence
(0-100). The pos-neg gap, the mean over questions of positive minus negative trait score, is how far
prompting alone moves the trait in that model. Nothing is steered or trained.

Models: ``embedded``, a local folder, a .gguf file or a hub id (loaded one at a time with
``load_runtime`` and dropped before the next), or ``openai:<model>`` at an OpenAI-compatible endpoint
(chat completions with the same messages, temperature 0; it has no activations, so prompting is all
it can be scored on).

Memoisation, so that a re-run with nothing new loads no model and sends no request:

- local answers come from ``generate`` with the cache, and each is also indexed under
  'model_answer' by what is known *without* loading the model (fingerprint, precision, tokenizer
  files, messages, settings); a model whose answers are all indexed is not loaded;
- API answers under 'api_answer': endpoint, model, messages and settings. The API key is left out:
  it does not change the answer and must never reach the disk. Failed calls are not stored;
- verdicts through ``Judge.judge`` with the cache.

Outputs in ``<out_dir>/``: ``models.json``, ``models.md`` and ``models.png``.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from persona_steering import __version__
from persona_steering.api import FAILURES, ChatClient, describe
from persona_steering.cache import Cache, atomic_write_json, atomic_write_text, digest
from persona_steering.config import Config, ConfigError, GenerationConfig, JudgeConfig, ModelConfig
from persona_steering.evaluate.core import json_safe
from persona_steering.evaluate.stats import bootstrap_interval
from persona_steering.generation import Request, generate
from persona_steering.judges import Judge, JudgeError, Query, build_judge
from persona_steering.rendering import NA, fmt_interval, markdown_table, save_figure, subplots
from persona_steering.runtime import EMBEDDED, ModelIdentity, ModelLoadError, identify, load_runtime
from persona_steering.traits import Trait, load_traits

logger = logging.getLogger("persona_steering.evaluate.models")

OPENAI_PREFIX = "openai:"
CONDITIONS = {
    "unprompted": "no system prompt",
    "positive": "the trait's first positive instruction as the system prompt",
    "negative": "the trait's first negative instruction as the system prompt",
}
SHORT = {"unprompted": "unprompted", "positive": "pos", "negative": "neg"}
METRICS = ("trait", "coherence")
INDEX = "model_answer"
API = "api_answer"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""A folder's fingerprint covers config and weights only; these shape the chat-templated prompt."""


@dataclass(frozen=True)
class ModelsSettings:
    """The stage's own options (the rest comes from the config)."""

    models: tuple[str, ...]
    """Model specs: embedded, a folder, a .gguf file, a hub id, or openai:<model>."""
    num_questions: int = 5
    """First N of each trait's eval questions."""
    base_url: str | None = None
    """Endpoint of the openai: models; None = judge.base_url (then the SDK default)."""
    out_dir: str = "runs/models"
    """Where models.json, models.md and models.png go."""

    def __post_init__(self) -> None:
        if not self.models or any(not m.strip() for m in self.models):
            raise ConfigError("--models needs comma-separated model specs, none of them empty")
        if self.num_questions < 1:
            raise ConfigError(f"--num-questions must be >= 1, got {self.num_questions}")

    @classmethod
    def from_config(cls, cfg: Config) -> ModelsSettings:
        """``cfg.models``; no models named = the configured model alone."""
        m = cfg.models
        specs = tuple(s.strip() for s in (m.models or cfg.model.name).split(","))
        return cls(specs, m.num_questions, m.base_url, m.out_dir)


@dataclass(frozen=True)
class Row:
    """One question to answer: a trait's eval question under one condition."""

    trait: Trait
    condition: str
    request: Request


@dataclass
class ModelSpec:
    """A model to evaluate: local (``config`` and ``ident``) or behind an endpoint (``api``)."""

    label: str
    spec: str
    config: ModelConfig | None = None  # what load_runtime loads
    ident: ModelIdentity | None = None
    tokenizer: str = ""  # digest of a folder's tokenizer files
    api: ApiModel | None = None


@dataclass
class ModelsSetup:
    """Everything checked before any model loads or any file is written."""

    specs: list[ModelSpec]
    traits: list[Trait]
    rows: list[Row]
    folder: Path


@dataclass(frozen=True)
class ModelsResult:
    data: dict[str, Any]
    markdown: str
    folder: Path


def run_models(cfg: Config, log: Callable[[str], None] = print) -> ModelsResult:
    """Answer, judge and summarise every model on every trait; write JSON, Markdown and a plot.

    Args:
        cfg: traits (``cfg.traits``, ``vectors.trait_dir``), generation, judge and statistics settings;
            ``model`` gives precision and accelerator of the local models.
            ``models``: the models, questions per trait, endpoint and output folder.
        log: where progress lines go.

    Returns:
        The data written to ``models.json``, its Markdown rendering and the output folder.
    """
    cfg.model.require_one_process("evaluate-models")
    settings = ModelsSettings.from_config(cfg)
    setup = prepare_models(cfg, settings)
    # Several models and no single policy model: the offline judge's coherence and trait verdicts
    # need none, and are the embedding judge's (a repetition heuristic; traits n/a).
    backend = "embedding" if cfg.judge.backend == "offline" else cfg.judge.backend
    judge = build_judge(replace(cfg.judge, backend=backend), None, cfg.cache_dir)
    with Cache(cfg.cache_dir) as cache:
        answers = {s.label: _answers(s, setup.rows, cfg, cache, log) for s in setup.specs}
        scores = _score(judge, cache, setup.rows, answers)
    data = json_safe(_summary(cfg, settings, setup, judge, answers, scores))
    markdown = render_models(data)
    setup.folder.mkdir(parents=True, exist_ok=True)
    plot_models(data, setup.folder / "models.png")
    atomic_write_text(setup.folder / "models.md", markdown)
    atomic_write_json(setup.folder / "models.json", data)
    return ModelsResult(data, markdown, setup.folder)


def prepare_models(cfg: Config, settings: ModelsSettings) -> ModelsSetup:
    """Read the traits and resolve every model spec (no weights loaded, nothing written)."""
    traits = load_traits(cfg.vectors.trait_dir, cfg.traits)
    specs = [parse_spec(s, cfg, settings.base_url) for s in settings.models]
    seen: dict[str, str] = {}
    for s in specs:
        if s.label in seen:
            raise ConfigError(f"--models: {seen[s.label]!r} and {s.spec!r} are the same model; list it once")
        seen[s.label] = s.spec
    rows = []
    for trait in traits:
        pos, neg = trait.instructions[0]
        for condition, system in zip(CONDITIONS, (None, pos, neg), strict=True):
            rows += [
                Row(trait, condition, Request(q, system))
                for q in trait.eval_questions[: settings.num_questions]
            ]
    return ModelsSetup(specs, traits, rows, Path(settings.out_dir))


def parse_spec(spec: str, cfg: Config, base_url: str | None) -> ModelSpec:
    """A ModelSpec for one ``--models`` entry; ConfigError or ModelLoadError naming a bad one."""
    if spec.startswith(OPENAI_PREFIX):
        name = spec[len(OPENAI_PREFIX) :].strip()
        if not name:
            raise ConfigError(
                f"--models: {spec!r} names no model; write openai:<model>, e.g. openai:gpt-4o-mini"
            )
        return ModelSpec(spec, spec, api=ApiModel(name, base_url or cfg.judge.base_url, cfg.judge))
    path = Path(spec).expanduser()
    is_path = path.exists() or path.suffix == ".gguf" or spec.startswith((".", "/", "~"))
    if spec != EMBEDDED and not is_path:
        _check_hub_id(spec)
    config = replace(cfg.model, name=spec, gguf_file=None, revision=None)
    ident = identify(config)  # ModelLoadError for a missing path or GGUF file
    tokenizer = _tokenizer_digest(path) if ident.gguf is None and path.is_dir() else ""
    return ModelSpec(ident.slug if is_path else spec, spec, config, ident, tokenizer)


def _check_hub_id(spec: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise ConfigError(
            f"--models: {spec!r} is neither embedded, an existing folder or .gguf file, "
            "a hub id (org/name) nor openai:<model>"
        ) from None


def _tokenizer_digest(folder: Path) -> str:
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    return digest([[f.name, f.read_text(errors="replace")] for f in files], 16)


def messages(request: Request) -> list[dict[str, str]]:
    """The chat messages of a request for an endpoint (its server applies the template)."""
    system = [{"role": "system", "content": request.system}] if request.system else []
    return [*system, {"role": "user", "content": request.user}]


# --- answers -----------------------------------------------------------------------------------------


def _answers(
    spec: ModelSpec, rows: list[Row], cfg: Config, cache: Cache, log: Callable[[str], None]
) -> list[str | None]:
    """One answer per row (None where an endpoint gave none)."""
    requests = [r.request for r in rows]
    if spec.api is not None:
        log(f"{spec.label}: {len(requests)} answers from {spec.api.endpoint}")
        return list(spec.api.answer(requests, cfg.generation.max_new_tokens, cache))
    keys = [_index_key(spec, r, cfg.generation, cfg.seed) for r in requests]
    hits = [cache.get(INDEX, k, _text_row) for k in keys]
    cached = [h["text"] for h in hits if h is not None]
    if len(cached) == len(keys):
        log(f"{spec.label}: {len(keys)} answers from the cache")
        return list(cached)
    log(f"{spec.label}: loading to answer {len(keys) - len(cached)} of {len(keys)} questions")
    texts = _generate_local(spec, requests, cfg, cache)
    _release_memory()
    for key, text in zip(keys, texts, strict=True):
        cache.set(INDEX, key, {"text": text})
    return list(texts)


def _text_row(value: Any) -> bool:
    """A cached answer row: {"text": str}."""
    return isinstance(value, dict) and isinstance(value.get("text"), str)


def _generate_local(spec: ModelSpec, requests: list[Request], cfg: Config, cache: Cache) -> list[str]:
    """Load the model, answer, and let it go: only the texts outlive this call."""
    assert spec.config is not None
    rt = load_runtime(spec.config, cfg.cache_dir, cfg.seed)
    answers = generate(rt, requests, cfg.generation, cache=cache, seed=cfg.seed, desc=spec.label)
    return [a.text for a in answers]


def _release_memory() -> None:
    """Collect the dropped model now, so the next one never loads beside it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _index_key(spec: ModelSpec, request: Request, gen: GenerationConfig, seed: int) -> dict[str, Any]:
    """What determines a local answer, known without loading: the same inputs ``generate`` keys on,
    with the tokenizer files standing in for the templated prompt. max_batch is left out as there."""
    assert spec.ident is not None
    settings = gen.outcome()
    return {
        "model": spec.ident.fingerprint,
        "precision": spec.ident.precision,
        "kwargs": spec.ident.kwargs,
        "tokenizer": spec.tokenizer,
        "messages": messages(request),
        "gen": settings,
        "seed": seed if gen.temperature > 0 else None,
    }


class ApiModel:
    """A model behind an OpenAI-compatible chat endpoint, called through ``api.ChatClient``.

    Transient failures are retried within ``judge.max_attempts`` and ``judge.max_retry_seconds``; a
    question that still fails has no answer (None, not cached). Failures every call would repeat
    (401, 403, 404, spent quota, a dead endpoint) raise ModelLoadError.
    """

    def __init__(self, name: str, base_url: str | None, cfg: JudgeConfig, env_file: str = ".env") -> None:
        self.name = name
        self.cfg = cfg
        try:
            self._client = ChatClient(
                cfg,
                f"{OPENAI_PREFIX}{name}",
                model=name,
                base_url=base_url,
                options="--models and --base-url",
                env_file=env_file,
                logger=logger,
            )
        except JudgeError as exc:
            raise ModelLoadError(str(exc)) from None

    @property
    def endpoint(self) -> str:
        return self._client.endpoint

    def answer(self, requests: Sequence[Request], max_tokens: int, cache: Cache) -> list[str | None]:
        """Answers in order, from the cache where present; equal calls are sent once."""
        calls = [
            {
                "endpoint": self.endpoint,
                "model": self.name,
                "messages": messages(r),
                "settings": {"temperature": 0, "max_tokens": max_tokens},
            }
            for r in requests
        ]
        done: dict[str, str | None] = {}
        todo: dict[str, dict[str, Any]] = {}
        for call in calls:
            kd = digest(call)
            if kd not in done and kd not in todo:
                hit = cache.get(API, call, _text_row)
                if hit is not None:
                    done[kd] = hit["text"]
                else:
                    todo[kd] = call
        for (kd, call), text in zip(todo.items(), self._ask_all(list(todo.values())), strict=True):
            done[kd] = text
            if text is not None:
                cache.set(API, call, {"text": text})
        return [done[digest(c)] for c in calls]

    def _ask_all(self, calls: list[dict[str, Any]]) -> list[str | None]:
        if not calls:
            return []
        self._client.reset()
        with ThreadPoolExecutor(min(self.cfg.concurrency, len(calls)), thread_name_prefix="answer") as pool:
            futures = [pool.submit(self._ask, c) for c in calls]
            try:
                return [f.result() for f in futures]
            except JudgeError as exc:
                self._client.stop(str(exc))
                for f in futures:
                    f.cancel()  # every queued call would fail the same way
                raise ModelLoadError(str(exc)) from None

    def _ask(self, call: dict[str, Any]) -> str | None:
        try:
            response = self._client.chat(call["messages"], **call["settings"])
        except FAILURES as exc:
            logger.warning("%s%s gave no answer: %s", OPENAI_PREFIX, self.name, describe(exc))
            return None
        if not response.choices or response.choices[0].message.content is None:
            return None
        return str(response.choices[0].message.content).strip()


# --- scores and summary ------------------------------------------------------------------------------


def _score(
    judge: Judge, cache: Cache, rows: list[Row], answers: dict[str, list[str | None]]
) -> dict[str, dict[str, list[float | None]]]:
    """{label: {metric: one score per row}} from one memoised judge call over the distinct queries."""
    can_trait = "trait" in judge.kinds
    unique: dict[str, Query] = {}
    slots: dict[tuple[str, str, int], str] = {}
    for label, texts in answers.items():
        for i, (row, text) in enumerate(zip(rows, texts, strict=True)):
            if text is None:
                continue  # no answer, so no verdict: counted as missing
            queries = {"coherence": Query("coherence", row.request.user, text)}
            if can_trait:
                t = row.trait
                queries["trait"] = Query("trait", row.request.user, text, rubric=t.eval_prompt, trait=t.name)
            for metric, query in queries.items():
                kd = digest(query.key())
                unique.setdefault(kd, query)
                slots[(label, metric, i)] = kd
    verdicts = dict(zip(unique, judge.judge(list(unique.values()), cache), strict=True))
    return {
        label: {
            m: [
                verdicts[slots[label, m, i]].score if (label, m, i) in slots else None
                for i in range(len(rows))
            ]
            for m in METRICS
        }
        for label in answers
    }


def _summary(
    cfg: Config,
    settings: ModelsSettings,
    setup: ModelsSetup,
    judge: Judge,
    answers: dict[str, list[str | None]],
    scores: dict[str, dict[str, list[float | None]]],
) -> dict[str, Any]:
    ev = cfg.evaluate
    supported = {"trait": "trait" in judge.kinds, "coherence": True}

    def stat(values: list[float | None], metric: str) -> dict[str, Any]:
        return _stat(values, supported[metric], ev.bootstrap, ev.confidence, cfg.seed)

    results = {
        s.label: {
            t.name: _trait_entry(setup.rows, t, answers[s.label], scores[s.label], stat) for t in setup.traits
        }
        for s in setup.specs
    }
    return {
        "models": [_model_info(s) for s in setup.specs],
        "traits": [t.name for t in setup.traits],
        "conditions": CONDITIONS,
        "instructions": {
            t.name: {"positive": t.instructions[0][0], "negative": t.instructions[0][1]} for t in setup.traits
        },
        "questions": {t.name: t.eval_questions[: settings.num_questions] for t in setup.traits},
        "judge": judge.identity(),
        "trait_score_supported": supported["trait"],
        "statistics": {
            "interval": f"{ev.confidence:.0%} percentile bootstrap of the mean, {ev.bootstrap} resamples",
            "pos_neg_gap": "mean over questions of positive minus negative trait score (paired)",
        },
        "generation": {
            "max_new_tokens": cfg.generation.max_new_tokens,
            "temperature": cfg.generation.temperature,
        },
        "results": results,
        "missing_answers": {label: sum(t is None for t in texts) for label, texts in answers.items()},
        "config_digest": cfg.digest("model", "generation", "judge", "evaluate", "vectors", "traits", "seed"),
        "version": __version__,
    }


def _trait_entry(
    rows: list[Row],
    trait: Trait,
    answers: list[str | None],
    scores: dict[str, list[float | None]],
    stat: Callable[[list[float | None], str], dict[str, Any]],
) -> dict[str, Any]:
    """One model's answers and statistics per condition for one trait, and its pos-neg gap."""
    entry: dict[str, Any] = {}
    for c in CONDITIONS:
        idx = [i for i, r in enumerate(rows) if r.trait.name == trait.name and r.condition == c]
        entry[c] = {"answers": [answers[i] for i in idx]}
        entry[c].update({m: stat([scores[m][i] for i in idx], m) for m in METRICS})
    pos, neg = (entry[c]["trait"]["per_question"] for c in ("positive", "negative"))
    # Paired per question: the same question asked both ways, so its difference is the gap's sample.
    gaps = [None if p is None or q is None else p - q for p, q in zip(pos, neg, strict=True)]
    entry["pos_neg_gap"] = {k: v for k, v in stat(gaps, "trait").items() if k != "missing"}
    return entry


def _stat(
    values: list[float | None], supported: bool, resamples: int, confidence: float, seed: int
) -> dict[str, Any]:
    """Mean and bootstrap interval over the present values; n/a (all None) when unsupported."""
    iv = bootstrap_interval(values, resamples, confidence, seed) if supported else None
    return {
        "supported": supported,
        "mean": iv.mean if iv else None,
        "low": iv.low if iv else None,
        "high": iv.high if iv else None,
        "n": iv.n if iv else 0,
        "missing": sum(v is None for v in values) if supported else 0,
        "per_question": values,
    }


def _model_info(spec: ModelSpec) -> dict[str, Any]:
    info = {"label": spec.label, "spec": spec.spec}
    if spec.api is not None:
        return {**info, "kind": "openai", "model_id": spec.api.name, "endpoint": spec.api.endpoint}
    assert spec.ident is not None
    ident = spec.ident
    return {
        **info,
        "kind": "local",
        "model_id": ident.model_id,
        "fingerprint": ident.fingerprint,
        "precision": ident.precision,
    }


# --- rendering ---------------------------------------------------------------------------------------


def render_models(data: dict[str, Any]) -> str:
    """Markdown tables of trait expression (with the pos-neg gap) and coherence, models x traits."""
    judge = data["judge"]["backend"]
    n = {t: len(q) for t, q in data["questions"].items()}
    parts = [
        "# Models: trait expression by prompting\n",
        f"{len(data['models'])} models; traits {', '.join(data['traits'])} "
        f"({', '.join(f'{t}: {k} questions' for t, k in n.items())}); {judge} judge. "
        "unprompted: no system prompt; pos / neg: the trait's first positive / negative instruction "
        f"as the system prompt. Means with {data['statistics']['interval']}. pos-neg gap: "
        "mean over questions of pos minus neg, how far prompting alone moves the trait.\n",
        "## Trait expression (0-100)\n",
        _table(data, "trait", gap=True),
    ]
    if not data["trait_score_supported"]:
        parts.append(
            f"\nn/a: the {judge} judge cannot score trait expression; use --judge openai or local.\n"
        )
    parts += ["\n## Coherence (0-100)\n", _table(data, "coherence", gap=False)]
    missing = {k: v for k, v in data["missing_answers"].items() if v}
    if missing:
        parts.append(
            "\nNo answer (endpoint failures, not cached): "
            + ", ".join(f"{k} {v}" for k, v in missing.items())
            + "\n"
        )
    return "\n".join(parts)


def _table(data: dict[str, Any], metric: str, gap: bool) -> str:
    headers = ["model"]
    for t in data["traits"]:
        headers += [f"{t} {SHORT[c]}" for c in CONDITIONS] + ([f"{t} pos-neg gap"] if gap else [])
    rows = []
    for model in data["models"]:
        per_trait = data["results"][model["label"]]
        row: list[Any] = [model["label"]]
        missing = 0
        for t in data["traits"]:
            for c in CONDITIONS:
                e = per_trait[t][c][metric]
                row.append(fmt_interval(e["mean"], e["low"], e["high"], 1) if e["supported"] else NA)
                missing += e["missing"]
            if gap:
                row.append(_gap_cell(per_trait[t]["pos_neg_gap"]))
        rows.append([*row, missing])
    return markdown_table([*headers, "missing"], rows)


def _gap_cell(entry: dict[str, Any]) -> str:
    if entry["mean"] is None:
        return NA
    return f"{entry['mean']:+.1f} [{entry['low']:+.1f}, {entry['high']:+.1f}]"


def plot_models(data: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars, one panel per trait: each model's three conditions side by side, with intervals.
    Trait expression when the judge scores it, else coherence."""
    metric = "trait" if data["trait_score_supported"] else "coherence"
    labels = [m["label"] for m in data["models"]]
    traits = data["traits"]
    cols = min(3, len(traits))
    rows = math.ceil(len(traits) / cols)
    fig, axes = subplots(
        rows, cols, figsize=(cols * max(4.5, 1.1 * len(labels) + 2), 4.2 * rows), squeeze=False
    )
    width = 0.8 / len(CONDITIONS)
    for k, ax in enumerate(axes.flat):
        if k >= len(traits):
            ax.set_visible(False)
            continue
        for j, c in enumerate(CONDITIONS):
            entries = [data["results"][label][traits[k]][c][metric] for label in labels]
            means = [math.nan if e["mean"] is None else e["mean"] for e in entries]
            err = [_errors(m, e["low"], e["high"]) for m, e in zip(means, entries, strict=True)]
            xs = [x + (j - 1) * width for x in range(len(labels))]
            ax.bar(xs, means, width, label=SHORT[c], yerr=list(zip(*err, strict=True)), capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set(title=traits[k], ylim=(0, 118), yticks=range(0, 101, 20), ylabel=f"{metric} (0-100)")
        ax.legend(fontsize=7, ncol=3, loc="upper center")  # in the headroom above 100
    judge = data["judge"]["backend"]
    what = "trait expression" if metric == "trait" else f"coherence (the {judge} judge cannot score traits)"
    fig.suptitle(f"{what} by prompting, {judge} judge" if metric == "trait" else what)
    return save_figure(fig, path)


def _errors(mean: float, low: float | None, high: float | None) -> tuple[float, float]:
    """Error-bar lengths below and above a bar; none without an interval."""
    if low is None or high is None or math.isnan(mean):
        return 0.0, 0.0
    return mean - low, high - mean


def render_run(result: ModelsResult) -> str:
    """What ``evaluate-models`` prints: the Markdown and where the files went."""
    return f"{result.markdown}\nwrote {result.folder}/models.json, models.md, models.png"
