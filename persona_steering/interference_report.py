"""Tables and PNG plots of an ``interference.json``: leakage heatmaps, leakage vs cosine, additivity."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from persona_steering.rendering import fmt_number, markdown_table, plot_heatmaps, save_figure, subplots


def render_interference(data: dict[str, Any]) -> str:
    """Markdown: the scorers, then per basis and scorer the leakage, linearity and additivity tables."""
    traits = data["traits"]
    acc = ", ".join(
        f"{t} {fmt_number(r.get('accuracy'))} (AUC {fmt_number(r.get('auc'))})"
        for t, r in data["classifier_report"].items()
    )
    lines = [
        f"# Trait interference: {data['model_id']}, steered at layer {data['layer']}",
        "",
        f"{len(data['prompts'])} prompts, {data['max_new_tokens']} tokens per answer; single strengths "
        f"{', '.join(f'{s:g}' for s in data['strengths'])}, pairs at +-{data['pair_strength']:g} "
        f"({data['strength_unit']}). Unsteered loop rate {fmt_number(data['unsteered_loop_rate'])}.",
        "",
        "Scorers (every number below names the one that produced it):",
        *[f"- **{name}**: {text}" for name, text in data["scorers"].items()],
        "",
        f"Classifier held-out (out-of-fold, balanced) accuracy: {acc}.",
    ]
    for kind, basis in data["bases"].items():
        for name, s in basis["scorers"].items():
            lines += [
                "",
                f"## Basis {kind}, scorer {name}",
                "",
                "Leakage (row: steered axis, column: trait whose score moves; slope / on-target slope):",
                "",
            ]
            rows = [[t, *[fmt_number(v) for v in row]] for t, row in zip(traits, s["leakage"], strict=True)]
            lines.append(markdown_table(["steered \\ scored", *traits], rows))
            lines += ["", "Linearity of the on-target effect:", ""]
            lin = [
                [t, fmt_number(e["r2"]), _signs(e["saturates_at"]), _signs(e["breaks_at"])]
                for t, e in zip(traits, s["linearity"], strict=True)
            ]
            lines.append(markdown_table(["trait", "R^2", "saturates at (+/-)", "loops at (+/-)"], lin))
            lines += ["", "Additivity (measured against the sum of single effects):", ""]
            add = [
                [
                    f"{traits[a['pair'][0]]}+{traits[a['pair'][1]]}",
                    fmt_number(a["r2"]),
                    fmt_number(a["interaction"]),
                    fmt_number(a["residual_rms"]),
                ]
                for a in s["additivity"]
            ]
            lines.append(markdown_table(["pair", "R^2", "interaction", "residual rms"], add))
            pooled = s.get("additivity_overall", {})
            lines.append(
                f"\nMean off-diagonal |leakage| {fmt_number(mean_leakage(s['leakage']))}, "
                f"mean additivity R^2 per pair {fmt_number(mean_additivity(s['additivity']))}; all pairs "
                f"pooled: R^2 {fmt_number(pooled.get('r2'))}, slope of measured on summed "
                f"{fmt_number(pooled.get('slope'))} (1 = additive)."
            )
    return "\n".join(lines) + "\n"


def mean_leakage(leakage: list[list[float | None]]) -> float | None:
    """Mean |L_ij| over i != j, skipping missing entries."""
    values = [
        abs(v)
        for i, row in enumerate(leakage)
        for j, v in enumerate(row)
        if i != j and v is not None and _ok(v)
    ]
    return sum(values) / len(values) if values else None


def mean_additivity(additivity: list[dict[str, Any]]) -> float | None:
    values = [a["r2"] for a in additivity if _ok(a["r2"])]
    return sum(values) / len(values) if values else None


def write_plots(folder: Path, data: dict[str, Any]) -> None:
    """leakage.png (heatmaps), leakage_cosine.png (scatter) and additivity.png (scatter)."""
    traits = data["traits"]
    panels = [
        (f"{kind} basis, {name}", s["leakage"], traits, traits)
        for kind, basis in data["bases"].items()
        for name, s in basis["scorers"].items()
    ]
    plot_heatmaps(
        folder / "leakage.png",
        panels,
        "Leakage: slope of trait j per unit of axis i / on-target slope",
        "scored trait j",
        "steered axis i",
        symmetric=True,
    )
    scorers = list(next(iter(data["bases"].values()))["scorers"])
    fig, axes = subplots(1, len(scorers), figsize=(4.5 * len(scorers), 4), squeeze=False)
    for ax, name in zip(axes[0], scorers, strict=True):
        for kind, basis in data["bases"].items():
            pts = [
                (basis["cosines"][i][j], v)
                for i, row in enumerate(basis["scorers"][name]["leakage"])
                for j, v in enumerate(row)
                if i != j and _ok(v)
            ]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, label=f"{kind} basis")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(title=f"scorer {name}", xlabel="cosine(steered axis i, trait j vector)", ylabel="leakage L_ij")
        ax.legend(fontsize=7)
    fig.suptitle("Off-diagonal leakage against the cosine of the vectors")
    save_figure(fig, folder / "leakage_cosine.png")
    fig, axes = subplots(1, len(data["bases"]), figsize=(4.5 * len(data["bases"]), 4), squeeze=False)
    for ax, (kind, basis) in zip(axes[0], data["bases"].items(), strict=True):
        adds = basis["scorers"][scorers[0]]["additivity"]
        xs = [v for a in adds for row in a["summed"] for v in row]
        ys = [v for a in adds for row in a["measured"] for v in row]
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if _ok(x) and _ok(y)]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10)
        if pts:
            lo, hi = min(min(p) for p in pts), max(max(p) for p in pts)
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set(
            title=f"{kind} basis ({scorers[0]})",
            xlabel="sum of single effects",
            ylabel="measured pair effect",
        )
    fig.suptitle("Additivity: every pair, sign combination and scored trait")
    save_figure(fig, folder / "additivity.png")


def _signs(entry: dict[str, float | None]) -> str:
    return " / ".join("-" if entry.get(k) is None else f"{entry[k]:g}" for k in ("positive", "negative"))


def _ok(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
