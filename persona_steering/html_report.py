"""The ``report`` stage: one self-contained HTML page per persona, from the files in the save folder.

Reads ``<save_dir>/<id>_optimization.json`` (required), ``<id>_convergence.png``,
``<id>_evaluation.json`` and ``<id>_evaluation.png`` (optional: a note stands in for what is
missing) and the persona's profile, and writes ``<out_dir>/<id>.html``. Sections: persona,
configuration, convergence, weight trajectories, evaluation, answers side by side, and the trait
basis's interference (leakage and additivity, from ``<interference.out_dir>/<slug>/interference.json``
of the same model, when ``make interference`` has run). Images are
embedded as base64 data URIs and every piece of text is HTML-escaped, so the page opens anywhere,
offline, and an answer containing markup shows as text. No model is loaded.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from persona_steering import __version__
from persona_steering.cache import atomic_write_text
from persona_steering.config import Config, ConfigError
from persona_steering.interference_report import mean_additivity, mean_leakage
from persona_steering.judges.base import PARTS as FIT_PARTS
from persona_steering.record import PersonaFiles, PersonaRecord
from persona_steering.rendering import NA, fmt_interval, fmt_number, fmt_test

MAX_EXAMPLES = 4
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; color: #222; }
p { line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
section { margin: 2em 0; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f1f1f1; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.answers td { width: 25%; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #7a5b00; background: #fff8e1; padding: .4em .7em; border-left: 3px solid #e0b000; }
pre.profile { white-space: pre-wrap; background: #f7f7f7; padding: .8em; }
"""

_SERVED = {"mean": "the final CMA-ES search mean", "best": "the best candidate evaluated"}
_PARTS = {"mean": "mean_parts", "best": "best_parts"}


def run_report(cfg: Config, log: Callable[[str], None] = print) -> Path:
    """Write ``<out_dir>/<persona_id>.html`` for ``cfg.optimize.persona_id``.

    Args:
        cfg: ``optimize.persona_id``, ``optimize.save_dir`` and ``optimize.persona_dir`` are read;
            ``report.out_dir`` (output folder) and ``report.max_examples`` (prompts shown with their
            answers side by side).
        log: where progress lines go.

    Returns:
        The path of the page.
    """
    out_dir, max_examples = cfg.report.out_dir, cfg.report.max_examples
    persona_id = cfg.optimize.persona_id
    if not persona_id:
        raise ConfigError("optimize.persona_id is required (--persona-id ID, or make report PERSONA=ID)")
    if max_examples < 1:
        raise ConfigError(f"--max-examples must be >= 1, got {max_examples}")
    files = PersonaFiles(Path(cfg.optimize.save_dir), persona_id)
    record = PersonaRecord.require(files)
    evaluation = _read_json(files.evaluation("json"))
    profile_path = Path(cfg.optimize.persona_dir) / persona_id / "persona_profile.txt"
    interference = _find_interference(Path(cfg.interference.out_dir), record.fingerprint)
    page = render_report(
        record,
        evaluation,
        convergence_png=_read_bytes(files.convergence),
        evaluation_png=_read_bytes(files.evaluation("png")),
        profile=profile_path.read_text(encoding="utf-8").strip() if profile_path.is_file() else None,
        max_examples=max_examples,
        source=str(files.save_dir),
        interference=interference,
    )
    path = atomic_write_text(files.page(out_dir), page)
    log(f"wrote {path}")
    return path


def render_report(
    record: PersonaRecord,
    evaluation: dict[str, Any] | None,
    convergence_png: bytes | None = None,
    evaluation_png: bytes | None = None,
    profile: str | None = None,
    max_examples: int = MAX_EXAMPLES,
    source: str = "",
    interference: tuple[dict[str, Any], bytes | None] | None = None,
) -> str:
    """The page as a string: pure, so tests check its structure without files or a browser."""
    pid, result = record.persona_id, record.data
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Persona report: {_e(pid)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Persona report: {_e(pid)}</h1>",
        f"<p>From the files in <code>{_e(source or '?')}</code>; persona_steering {_e(__version__)}.</p>",
        _section(
            "persona",
            "Persona",
            f'<pre class="profile">{_e(profile)}</pre>'
            if profile
            else _note("No persona_profile.txt found for this persona."),
        ),
        _section("configuration", "Configuration", _configuration(record)),
        _section("convergence", "Convergence", _convergence(result, convergence_png)),
        _section(
            "weights", "Weight trajectories", _image(_weights_png(result), "trait weights per iteration")
        ),
        _section(
            "evaluation", "Evaluation on held-out prompts", _evaluation(pid, evaluation, evaluation_png)
        ),
        _section("answers", "Answers side by side", _answers(result, evaluation, max_examples)),
        _section(
            "interference",
            "Trait interference: is the basis linear and independent?",
            _interference(interference),
        ),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _configuration(record: PersonaRecord) -> str:
    result = record.data
    cfg = result.get("config") or {}
    optimize = cfg.get("optimize", {})
    rows = [
        ("model", cfg.get("model", {}).get("name", NA)),
        ("layer (hidden_states row)", record.layer),
        ("alpha", record.alpha),
        ("positions", record.positions or NA),
        ("vector method", record.vector_method or NA),
        ("traits", ", ".join(record.traits)),
        ("judge", record.judge or NA),
        ("iterations / evaluations", f"{result.get('num_iterations')} / {record.num_evaluations}"),
        (
            "population, sigma0, prompts",
            f"{optimize.get('population_size')}, {optimize.get('sigma0')}, {optimize.get('num_prompts')}",
        ),
        ("weights served", _SERVED[record.selected]),
        (
            "persona fit: best candidate / mean of search / unsteered",
            " / ".join(fmt_number(result.get(k), 3) for k in ("best_score", "mean_score", "baseline_score")),
        ),
        (
            "style / relevance / fluency: served / unsteered",
            " / ".join(_parts(result.get(k)) for k in (_PARTS[record.selected], "baseline_parts")),
        ),
        ("style classifier AUC (5-fold)", (result.get("style_classifier") or {}).get("auc", NA)),
        ("missing verdicts", result.get("missing_verdicts", NA)),
        ("config digest", record.config_digest or NA),
    ]
    table = _table(["setting", "value"], [[k, v] for k, v in rows])
    best, mean = result.get("best_weights", {}), result.get("mean_weights", {})
    mark = {k: " (served)" if k == record.selected else "" for k in ("best", "mean")}
    weights = _table(
        ["trait", f"best candidate{mark['best']}", f"distribution mean{mark['mean']}"],
        [[t, _num(best.get(t), "+.3f"), _num(mean.get(t), "+.3f")] for t in record.traits],
    )
    return table + weights


def _parts(parts: dict[str, float] | None) -> str:
    """'style 0.41, relevance 0.87, fluency 0.97', or n/a for a result without parts."""
    if not parts:
        return NA
    return ", ".join(f"{k} {fmt_number(parts.get(k), 2)}" for k in FIT_PARTS)


def _convergence(result: dict[str, Any], png: bytes | None) -> str:
    if png is not None:
        return _image(png, "persona fit per iteration and distribution-mean weights")
    history = result.get("optimization_history", {})
    rows = list(zip(history.get("iterations", []), history.get("best_scores", []), strict=False))
    return _note("The convergence plot was not found; best score per iteration:") + _table(
        ["iteration", "best so far"], [[i, fmt_number(s, 3)] for i, s in rows]
    )


def _evaluation(pid: str, evaluation: dict[str, Any] | None, png: bytes | None) -> str:
    if evaluation is None:
        return _note(f"No evaluation yet: run make evaluate PERSONA={pid} for baselines and intervals.")
    stats = evaluation.get("statistics", {})
    parts = [
        f"<p>{_e(evaluation.get('num_prompts'))} held-out prompts, layer {_e(evaluation.get('layer'))}, "
        f"alpha {_e(evaluation.get('alpha'))}. Means with {_e(stats.get('interval'))} intervals; "
        f"p: {_e(stats.get('test'))}.</p>"
    ]
    optimised = evaluation.get("optimised_judge")
    for judge, per_method in evaluation.get("scores", {}).items():
        blind = "optimised against" if judge == optimised else "not optimised against"
        parts.append(f"<h3>Judge: {_e(judge)} ({blind})</h3>")
        headers = [
            "method",
            "persona fit (1-5)",
            *(f"{p} (0-1)" for p in FIT_PARTS),
            "loop rate",
            "echo rate",
            "vs base: diff, p (Holm)",
            "vs prompt: diff, p (Holm)",
            "coherence (0-100)",
        ]
        rows = []
        for method, entries in per_method.items():
            fit, coherence = entries.get("persona_fit", {}), entries.get("coherence", {})
            rows.append(
                [
                    method,
                    _interval(fit),
                    *(_interval(entries.get(p, {})) for p in FIT_PARTS),
                    _interval(entries.get("loop_rate", {})),
                    _interval(entries.get("echo_rate", {})),
                    fmt_test(fit.get("vs_base")),
                    fmt_test(fit.get("vs_prompt")),
                    _interval(coherence),
                ]
            )
        parts.append(_table(headers, rows))
    if png is not None:
        parts.append(_image(png, "evaluation: persona fit and coherence per method"))
    notes = evaluation.get("notes") or []
    if notes:
        parts.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    return "\n".join(parts)


def _answers(result: dict[str, Any], evaluation: dict[str, Any] | None, limit: int) -> str:
    """base / prompt / proposed answers from the evaluation, else the optimiser's examples."""
    methods = (evaluation or {}).get("methods", {})
    if any(m in methods for m in ("prompt", "proposed")) and "base" in methods:
        prompts = evaluation["prompts"][:limit]  # type: ignore[index]
        cols = [m for m in ("base", "prompt", "proposed") if m in methods]
        rows = [[p, *(methods[m]["answers"][i] for m in cols)] for i, p in enumerate(prompts)]
        return _table(["user", *cols], rows, css="answers")
    examples = result.get("examples") or []
    if not examples:
        return _note("No answers recorded: run make evaluate for held-out answers.")
    # "best": results written before optimize.select, which showed the best candidate's answers.
    rows = [
        [x.get("prompt"), x.get("baseline"), NA, x.get("steered", x.get("best"))] for x in examples[:limit]
    ]
    note = _note(
        "From the optimiser's training-prompt examples; the prompt baseline comes with make evaluate."
    )
    return note + _table(["user", "base", "prompt", "proposed"], rows, css="answers")


def _weights_png(result: dict[str, Any]) -> bytes:
    """Two panels: best-so-far weights and CMA-ES mean weights per iteration, one line per trait."""
    import matplotlib

    matplotlib.use("Agg")  # headless, as every stage draws
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    traits = list(result.get("traits", []))
    history = result.get("optimization_history", {})
    iterations = history.get("iterations", [])
    mean = (result.get("history") or {}).get("mean_weights", [])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, series, title in (
        (
            axes[0],
            [[w.get(t) for t in traits] for w in history.get("best_weights", [])],
            "best candidate so far",
        ),
        (axes[1], mean, "distribution mean"),
    ):
        for j, trait in enumerate(traits):
            ax.plot(iterations[: len(series)], [row[j] for row in series], marker=".", label=trait)
        ax.axhline(0, color="grey", lw=0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers
        ax.set(title=title, xlabel="iteration", ylabel="trait weight")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _find_interference(out_dir: Path, fingerprint: str | None) -> tuple[dict[str, Any], bytes | None] | None:
    """The interference results of this model (same fingerprint) under ``out_dir``, with the heatmap."""
    for path in sorted(out_dir.glob("*/interference.json")):
        data = _read_json(path)
        if data is not None and fingerprint is not None and data.get("fingerprint") == fingerprint:
            return data, _read_bytes(path.parent / "leakage.png")
    return None


def _interference(found: tuple[dict[str, Any], bytes | None] | None) -> str:
    if found is None:
        return _note("No interference results for this model: run make interference.")
    data, png = found
    accuracy = ", ".join(
        f"{t} {_num(r.get('accuracy'), '.2f')}" for t, r in data.get("classifier_report", {}).items()
    )
    rows = [
        [kind, name, fmt_number(mean_leakage(s["leakage"])), fmt_number(mean_additivity(s["additivity"]))]
        for kind, basis in data.get("bases", {}).items()
        for name, s in basis.get("scorers", {}).items()
    ]
    scorers = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in data.get("scorers", {}).items())
    strengths = ", ".join(f"{s:g}" for s in data.get("strengths", []))
    body = (
        f"<p>Each trait steered alone at {_e(strengths)} and every "
        f"pair at +-{_e(data.get('pair_strength'))} (alpha units) on {len(data.get('prompts', []))} held-out "
        f"prompts at layer {_e(data.get('layer'))}. Leakage: slope of another trait's score per unit "
        "of an axis, relative to the axis's own trait (0 = independent). Additivity: R<sup>2</sup> of a "
        "pair's measured effect against the sum of its single effects (1 = additive).</p>"
        f"<ul>{scorers}</ul><p>Pole classifiers' held-out accuracy: {_e(accuracy)}.</p>"
        + _table(["basis", "scorer", "mean off-diagonal |leakage|", "mean additivity R²"], rows)
    )
    return body + (_image(png, "leakage matrices") if png else "")


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], css: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    cls = f' class="{css}"' if css else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{_e(value)}</td>' if numeric else f"<td>{_e(value)}</td>"


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _interval(entry: dict[str, Any]) -> str:
    if not entry or not entry.get("supported", True):
        return NA
    return fmt_interval(entry.get("mean"), entry.get("low"), entry.get("high"))


def _num(value: Any, spec: str) -> str:
    return NA if not isinstance(value, (int, float)) else format(value, spec)


def _e(value: Any) -> str:
    """HTML-escaped text of any value (None as n/a): the only way text enters the page."""
    return html.escape(NA if value is None else str(value), quote=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); rerun the stage that writes it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _read_bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None
