"""Rendering of results into Markdown tables, plain text and PNG plots, written atomically.

Pure presentation: functions take numbers and labels, never models or configs, so every stage
(evaluation, sweeps, similarity) draws the same way and a plot can be redrawn from saved JSON.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from persona_steering.cache import atomic_write_bytes

NA = "n/a"


def render_examples(examples: Sequence[dict[str, str]]) -> str:
    """Each prompt with its unsteered and steered answer, a blank line between prompts."""
    return "\n".join(
        f"user:      {ex['prompt']}\nunsteered: {ex['baseline']}\nsteered:   {ex['steered']}\n"
        for ex in examples
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A GitHub-flavoured Markdown table; cells are str()-ed and pipes escaped.

    Args:
        headers: column titles.
        rows: one sequence of cells per row.
        align: one letter per column, "l" (left) or "r" (right, for numbers); columns past its end
            are left-aligned.
    """

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    rule = "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(headers), "l"))
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + rule]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt_number(value: float | None, digits: int = 2) -> str:
    """A number with fixed decimals, or n/a for None and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    return f"{value:.{digits}f}"


def fmt_interval(mean: float | None, low: float | None, high: float | None, digits: int = 2) -> str:
    """'3.41 [3.10, 3.72]', or n/a when there is no mean."""
    if mean is None:
        return NA
    return f"{mean:.{digits}f} [{fmt_number(low, digits)}, {fmt_number(high, digits)}]"


def fmt_p(p: float | None) -> str:
    """A p-value readable at a glance: three decimals, or '<0.001'."""
    if p is None:
        return NA
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_test(test: dict[str, Any] | None) -> str:
    """A paired test against a reference: '+0.31, p=0.041 (raw 0.005)' (Holm-corrected, then raw)."""
    if not test:
        return "-"
    if "p_holm" not in test:
        return f"{test['diff']:+.2f}, p={fmt_p(test.get('p'))}"
    return f"{test['diff']:+.2f}, p={fmt_p(test['p_holm'])} (raw {fmt_p(test.get('p'))})"


def plot_intervals(
    path: str | Path,
    panels: Sequence[
        tuple[str, Sequence[str], Sequence[float | None], Sequence[float | None], Sequence[float | None]]
    ],
    title: str,
) -> Path:
    """One bar panel per metric: bars at the means, error bars from low to high.

    Args:
        path: PNG to write.
        panels: (y label, bar labels, means, lows, highs); a None mean draws no bar and says n/a.
        title: figure title.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 4.2), squeeze=False)
    for ax, (ylabel, labels, means, lows, highs) in zip(axes[0], panels, strict=True):
        xs = list(range(len(labels)))
        for x, m, lo, hi in zip(xs, means, lows, highs, strict=True):
            if m is None:
                ax.text(x, 0, NA, ha="center", va="bottom", fontsize=8, color="grey")
                continue
            ax.bar(x, m, color="tab:blue", alpha=0.75)
            if lo is not None and hi is not None:
                ax.errorbar(x, m, yerr=[[m - lo], [hi - m]], color="black", capsize=4, lw=1)
        ax.set_xticks(xs, labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_heatmaps(
    path: str | Path,
    panels: Sequence[tuple[str, Sequence[Sequence[float | None]], Sequence[str], Sequence[str]]],
    title: str,
    xlabel: str = "",
    ylabel: str = "",
    symmetric: bool = False,
) -> Path:
    """Annotated heatmaps side by side; a None cell is left blank and marked n/a.

    Args:
        path: PNG to write.
        panels: (panel title, matrix [rows][cols], row labels, column labels).
        title: figure title.
        xlabel: label of the columns' axis.
        ylabel: label of the rows' axis.
        symmetric: centre the colour scale on 0 (for signed quantities such as cosines).
    """
    import numpy as np

    plt = _pyplot()
    width = max(len(p[3]) for p in panels)
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(1.1 * width * len(panels) + 2.5, 0.6 * max(len(p[2]) for p in panels) + 2.2),
        squeeze=False,
    )
    for ax, (panel_title, matrix, rows, cols) in zip(axes[0], panels, strict=True):
        data = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
        finite = data[np.isfinite(data)]
        vmin = vmax = None
        if symmetric and finite.size:
            vmax = float(np.abs(finite).max()) or 1.0
            vmin = -vmax
        image = ax.imshow(
            data, cmap="coolwarm" if symmetric else "viridis", vmin=vmin, vmax=vmax, aspect="auto"
        )
        for (r, c), v in np.ndenumerate(data):
            ax.text(c, r, NA if np.isnan(v) else f"{v:.2g}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(cols)), cols, fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set(title=panel_title, xlabel=xlabel, ylabel=ylabel)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_lines(
    path: str | Path,
    x: Sequence[float],
    series: dict[str, Sequence[float | None]],
    title: str,
    xlabel: str,
    ylabel: str,
) -> Path:
    """One line per series over a shared x axis (a None point breaks the line)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, ys in series.items():
        ax.plot(list(x), [math.nan if y is None else y for y in ys], marker=".", label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def subplots(*args: Any, **kwargs: Any) -> Any:
    """``pyplot.subplots`` on the headless backend."""
    return _pyplot().subplots(*args, **kwargs)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Render a matplotlib figure to PNG bytes, write them atomically, close the figure."""
    plt = _pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _pyplot() -> Any:
    """pyplot on the Agg backend: stages run headless, and importing it lazily keeps the CLI fast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
