"""What an optimisation shows: convergence and per-layer plots, and the text tables ``optimize`` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot_convergence(result: dict[str, Any], path: Path) -> Path:
    """Best-so-far, generation best and mean fit per iteration, and the weights' trajectories."""
    from matplotlib.ticker import MaxNLocator

    from persona_steering.rendering import save_figure, subplots

    h = result["optimization_history"]
    extra = result["history"]
    fig, (ax1, ax2) = subplots(1, 2, figsize=(11, 4))
    ax1.plot(h["iterations"], h["best_scores"], "o-", label="best so far")
    ax1.plot(h["iterations"], extra["generation_best"], "s--", alpha=0.7, label="generation best")
    ax1.plot(h["iterations"], extra["generation_mean"], "^:", alpha=0.7, label="generation mean")
    ax1.axhline(result["baseline_score"], color="grey", lw=1, label="unsteered")
    if "score" in result:  # the served weights, scored once at the end
        label = f"served ({'search mean' if _selected(result) == 'mean' else 'best candidate'})"
        ax1.plot([h["iterations"][-1]], [result["score"]], "*", ms=12, color="black", label=label)
    ax1.set(xlabel="iteration", ylabel="persona fit (1-5)", title=f"{result['persona_id']}: convergence")
    ax1.legend(fontsize=8)
    means = np.asarray(extra["mean_weights"])
    for j, trait in enumerate(result["traits"]):
        ax2.plot(h["iterations"], means[:, j], label=trait)
    ax2.axhline(0, color="grey", lw=0.5)
    ax2.set(xlabel="iteration", ylabel="weight (distribution mean)", title="trait weights")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(fig, path)


def plot_layers(summary: dict[str, Any], path: Path) -> Path:
    from persona_steering.rendering import save_figure, subplots

    rows = summary["layers"]
    fig, ax = subplots(figsize=(6, 3.5))
    ax.plot([r["layer"] for r in rows], [r["best_score"] for r in rows], "o-", label="best")
    ax.plot([r["layer"] for r in rows], [r["mean_score"] for r in rows], "s--", label="search mean")
    ax.axhline(rows[0]["baseline_score"], color="grey", lw=1, label="unsteered")
    ax.set(xlabel="layer", ylabel="persona fit (1-5)", title=f"{summary['persona_id']}: fit by layer")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


SHOWN_EXAMPLES = 3
"""Answer pairs ``render_result`` prints under the scores: what the persona sounds like."""


def render_result(result: dict[str, Any]) -> str:
    """The weights the run serves, the persona fit of best, search mean and unsteered, and the first
    ``SHOWN_EXAMPLES`` training prompts answered without and with the served weights (greedy)."""
    from persona_steering.rendering import render_examples

    weights = "  ".join(f"{k}={v:+.2f}" for k, v in _served(result).items())
    text = (
        f"{_selected(result)} weights  {weights}\n"
        f"persona fit   best candidate {result['best_score']:.3f}   search mean {result['mean_score']:.3f}   "
        f"unsteered {result['baseline_score']:.3f}"
    )
    examples = result.get("examples") or []
    if examples:
        shown = min(SHOWN_EXAMPLES, len(examples))
        text += (
            f"\n\nwhat it says: {shown} of {len(examples)} training prompts, greedy (all in the result file; "
            "make evaluate compares on held-out prompts)\n\n" + render_examples(examples[:shown]).rstrip()
        )
    return text


def _selected(result: dict[str, Any]) -> str:
    """mean or best: which weights the result serves (best in results from before optimize.select)."""
    return str(result.get("selected", "best"))


def _served(result: dict[str, Any]) -> dict[str, float]:
    return dict(result.get("weights") or result["best_weights"])


def render_personas(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per persona optimised in lockstep."""
    lines = [
        "| persona | best candidate | search mean | unsteered | served | weights served |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for pid, r in results.items():
        weights = " ".join(f"{k}={v:+.2f}" for k, v in _served(r).items())
        scores = " | ".join(f"{r[k]:.3f}" for k in ("best_score", "mean_score", "baseline_score"))
        lines.append(f"| {pid} | {scores} | {_selected(r)} | {weights} |")
    return "\n".join(lines)


def render_layers(summary: dict[str, Any]) -> str:
    """A Markdown table: one row per layer, then the layer whose served weights fit best."""
    lines = ["| layer | best candidate | search mean | unsteered |", "| ---: | ---: | ---: | ---: |"]
    for r in summary["layers"]:
        scores = " | ".join(f"{r[k]:.3f}" for k in ("best_score", "mean_score", "baseline_score"))
        lines.append(f"| {r['layer']} | {scores} |")
    best = f"{summary['best_layer']} (fit {summary['best_score']:.3f})"
    lines.append(f"best layer for {summary['persona_id']}: {best}")
    return "\n".join(lines)
