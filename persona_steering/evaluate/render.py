"""The evaluation summary as a Markdown report and a bar plot with confidence intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persona_steering.evaluate.scoring import COHERENCE, ECHO, FIT, LOOP, PARTS, missing_verdicts
from persona_steering.rendering import (
    NA,
    fmt_interval,
    fmt_number,
    fmt_test,
    markdown_table,
    plot_intervals,
)


def render_markdown(summary: dict[str, Any]) -> str:
    """One table per judge (methods x metrics), judge agreement, skipped methods and notes."""
    parts = [
        f"# Evaluation: {summary['persona_id']}\n",
        f"Model {summary['model_id']}, layer {summary['layer']}, alpha {summary['alpha']}, "
        f"{summary['num_prompts']} held-out prompts, traits {', '.join(summary['traits'])}. "
        f"Unit: {summary['statistics']['unit']}. "
        f"Means with {summary['statistics']['interval']} intervals; p: {summary['statistics']['test']}, "
        "Holm-corrected over the methods.\n",
    ]
    for judge, per_method in summary["scores"].items():
        parts.append(f"## Judge: {judge} ({summary['missing_verdicts'][judge]} missing verdicts)\n")
        parts.append(_optimised_line(summary, judge))
        parts.append(_judge_table(per_method))
        unsupported = summary["unsupported"].get(judge) or []
        if unsupported:
            parts.append(f"\nn/a: the {judge} judge cannot score {', '.join(unsupported)}.\n")
    for pair, per_method in summary["agreement"].items():
        parts.append(f"\n## Judge agreement {pair}: Spearman rho of per-prompt persona fit\n")
        rows = [[m, fmt_number(v["rho"]), v["n"]] for m, v in per_method.items()]
        parts.append(markdown_table(["method", "rho", "prompts"], rows))
    infos = [[m, d["description"], _info_text(d["info"])] for m, d in summary["methods"].items()]
    parts.append("\n## Methods\n")
    parts.append(markdown_table(["method", "what", "details"], infos))
    if summary["notes"]:
        parts.append("\n## Notes\n")
        parts.append("".join(f"- {n}\n" for n in summary["notes"]))
    return "\n".join(parts)


def _optimised_line(summary: dict[str, Any], judge: str) -> str:
    """Whether the search methods were optimised against this judge (its scores are then not blind)."""
    optimised = summary["optimised_judge"]
    cma = summary.get("optimizer_judge")
    cma_text = f"; CMA-ES (proposed) used {cma}" if cma and cma != optimised else ""
    if judge == optimised:
        return (
            f"Optimised against: {optimised} (the first judge; random_search and grid search with it"
            f"{cma_text}), so its scores of the searched methods are not independent of the search.\n"
        )
    return f"Optimised against: {optimised}{cma_text}; this judge ({judge}) was not optimised against.\n"


def _judge_table(per_method: dict[str, dict[str, dict[str, Any]]]) -> str:
    metrics = list(next(iter(per_method.values())))
    traits = [m for m in metrics if m.startswith("trait:")]
    headers = [
        "method",
        "joint (persona fit, 1-5)",
        *(f"{p} (0-1)" for p in PARTS),
        "loop rate",
        "echo rate",
        "joint vs base: diff, p (Holm)",
        "joint vs prompt: diff, p (Holm)",
        "coherence (0-100)",
    ]
    headers += [t.split(":", 1)[1] for t in traits] + ["missing"]
    rows = []
    for method, entries in per_method.items():
        fit = entries[FIT]
        row: list[Any] = [
            method,
            _interval(fit),
            *(_interval(entries[p]) for p in PARTS),
            _interval(entries[LOOP]),
            _interval(entries[ECHO]),
            fmt_test(fit["vs_base"]),
            fmt_test(fit["vs_prompt"]),
            _interval(entries[COHERENCE]),
        ]
        row += [_interval(entries[t]) for t in traits]
        row.append(missing_verdicts(entries))
        rows.append(row)
    return markdown_table(headers, rows)


def _interval(entry: dict[str, Any]) -> str:
    if not entry["supported"]:
        return NA
    return fmt_interval(entry["mean"], entry["low"], entry["high"])


def _info_text(info: dict[str, Any]) -> str:
    """Short key=value list of a method's details; weight dicts compacted."""
    items = []
    for key, value in info.items():
        if isinstance(value, dict):
            value = " ".join(
                f"{k}={v:+.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()
            )
        elif isinstance(value, float):
            value = f"{value:.3g}"
        items.append(f"{key}: {value}")
    return "; ".join(items) or "-"


def plot_evaluation(summary: dict[str, Any], path: str | Path) -> Path:
    """Bars of persona fit and coherence per method with their intervals, one pair of panels per judge."""
    panels = []
    for judge, per_method in summary["scores"].items():
        methods = list(per_method)
        for metric, label in ((FIT, "persona fit (1-5)"), (COHERENCE, "coherence (0-100)")):
            entries = [per_method[m][metric] for m in methods]
            panels.append(
                (
                    f"{label}, {judge} judge",
                    methods,
                    [e["mean"] if e["supported"] else None for e in entries],
                    [e["low"] for e in entries],
                    [e["high"] for e in entries],
                )
            )
    title = (
        f"{summary['persona_id']}: held-out evaluation "
        f"({summary['num_prompts']} prompts, layer {summary['layer']})"
    )
    return plot_intervals(path, panels, title)
