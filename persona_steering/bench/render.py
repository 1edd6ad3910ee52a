"""The bench result drawn: Markdown tables a user can paste into an issue, and one PNG of bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persona_steering.bench.generation import METHODS
from persona_steering.rendering import markdown_table, save_figure, subplots


def bench_markdown(result: dict[str, Any]) -> str:
    """The results as Markdown tables a user can paste into an issue."""
    s, env, j, ex = result["settings"], result["environment"], result["judge"], result["extraction"]
    lock = result["lockstep"]
    methods = [_method_row(name, result["methods"][name], result["identical"].get(name)) for name in METHODS]
    lines = [
        f"**persona-steering bench** {result['created']}: {env['model_id']} ({env['dtype']}) on "
        f"{env['device']}, torch {env['torch']}, {env['threads']} threads",
        f"P={s['population']} candidates x N={s['num_prompts']} prompts x M={s['max_new_tokens']} new "
        f"tokens, greedy, layer {s['layer']}, max_batch {s['max_batch']}{_auto(s)}, "
        f"{s['repeats']} repeat(s), "
        f"no cache; {result['vectors']}",
        *([f"**{result['busy']}**"] if result.get("busy") else []),
        "",
        *_table(
            [
                "method",
                "calls",
                "batches",
                "rows",
                "seconds (median)",
                "spread",
                "x seed-loop",
                "new tokens",
                "tokens/s",
                "peak MB",
                "same tokens",
            ],
            methods,
        ),
    ]
    if (r := result["float32_recheck"]) and r["rows"]:
        lines.append(
            f"\nfloat32 re-run of the {r['rows']} differing row(s): {r['identical_in_float32']} identical"
        )
    memory = "max allocated during the method" if env["device_type"] == "cuda" else "process max RSS so far"
    lines += [
        "",
        f"peak MB: {memory}. Prompt tokens {result['prompt_tokens']}; all-layer extraction forward: "
        f"{ex['rows']} rows, {ex['tokens']} tokens in {ex['seconds']:.2f} s = "
        f"{ex['tokens_per_s']:.0f} tokens/s",
        "",
        f"personas in lockstep ({lock['personas']} personas x P x {lock['prompts']} prompts = "
        f"{lock['rows']} rows): "
        f"one generate per persona {lock['alone_s']:.2f} s, one for all "
        f"{lock['lockstep_s']:.2f} s = {lock['speedup']:.1f}x",
        "",
        *_leave_lines(result.get("leave")),
        *_compute_lines(result.get("compute")),
        *_fluency_lines(result.get("fluency")),
        *_stages_lines(result.get("stages")),
        *_table(
            [
                f"judge fan-out ({j['verdicts']} verdicts, server delay {j['delay_s']} s)",
                "seconds",
                "verdicts ok",
                "x one at a time",
            ],
            [
                [
                    "one at a time (concurrency 1)",
                    f"{j['one_at_a_time_s']:.2f}",
                    j["one_at_a_time_ok"],
                    "1.0x",
                ],
                [
                    f"ours (concurrency {j['concurrency']})",
                    f"{j['ours_s']:.2f}",
                    j["ours_ok"],
                    f"{j['speedup']:.1f}x",
                ],
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """PNG: seconds per generation method and per judge mode, speed-ups written on the bars."""
    methods, j = result["methods"], result["judge"]
    stages = result.get("stages")
    ratios = [3, 2, 3] if stages else [3, 2]
    fig, axes = subplots(
        1, len(ratios), figsize=(5 * len(ratios) - 4, 4), gridspec_kw={"width_ratios": ratios}
    )
    ax1, ax2 = axes[:2]
    panels = (
        (
            ax1,
            list(METHODS),
            [methods[m]["median_s"] for m in METHODS],
            [methods[m]["speedup_vs_seed_loop"] for m in METHODS],
            "one CMA-ES generation (greedy)",
        ),
        (
            ax2,
            ["one at a time", "ours"],
            [j["one_at_a_time_s"], j["ours_s"]],
            [1.0, j["speedup"]],
            f"{j['verdicts']} judge verdicts",
        ),
    )
    for ax, labels, seconds, speedups, title in panels:
        # Grey for the one-at-a-time reference, orange for ours, blue for what lies between.
        colors = ["#999999", *["#6699cc"] * (len(labels) - 2), "#cc6633"]
        bars = ax.bar(labels, seconds, color=colors)
        for bar, ratio in zip(bars, speedups, strict=True):
            ax.annotate(
                f"{ratio:.1f}x",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=9,
            )
        ax.set(ylabel="seconds", title=title)
    if stages:
        _plot_stages(axes[2], stages)
    return save_figure(fig, path)


def _method_row(name: str, m: dict[str, Any], same: dict[str, int] | None) -> list[Any]:
    return [
        f"{name} (ours)" if name == "per-row" else name,
        m["calls"],
        m["batches"],
        m["rows"],
        f"{m['median_s']:.2f}",
        f"{m['spread_s']:.2f}",
        f"{m['speedup_vs_seed_loop']:.1f}x",
        m["generated_tokens"],
        f"{m['tokens_per_s']:.1f}",
        f"{m['peak_memory_mb']:.0f}",
        f"{same['rows']}/{same['of']}" if same else "reference",
    ]


def _stages_lines(stages: dict[str, Any] | None) -> list[str]:
    """Cold, cache-warm and warm stage runs as Markdown lines (none when not measured)."""
    if not stages:
        return []
    st = stages["settings"]
    rows = []
    for name in ("vectors", "optimize"):
        r = stages.get(name)
        if r is None:
            rows.append([name, "skipped", "", "", "", ""])
            continue
        rows.append(
            [
                name,
                f"{r['cold_s']:.2f}",
                f"{r['cache_warm_s']:.2f}",
                f"{r['warm_s']:.3f}",
                f"{r['cold_forwards']} / {r['cache_warm_forwards']} / {r['warm_forwards']}",
                f"{r['cold_over_warm']:.0f}x",
            ]
        )
    return [
        f"stages in a scratch folder ({', '.join(stages['traits'])}; vectors: {st['pairs_per_question']} "
        f"pair per question; optimize {stages['persona']}: {st['max_iterations']} iterations x "
        f"{st['population']} candidates x {st['num_prompts']} prompts, {st['judge']} judge; "
        f"M={st['max_new_tokens']}). cache-warm: outputs deleted, cache kept; warm: the plain re-run",
        "",
        *_table(
            ["stage", "cold s", "cache-warm s", "warm s", "forwards cold / cache-warm / warm", "cold / warm"],
            rows,
        ),
        "",
        *_one_pass_line(stages.get("vectors")),
        *_ahead_lines(stages.get("judge_ahead")),
    ]


def _ahead_lines(ahead: dict[str, Any] | None) -> list[str]:
    """One population steered and judged, the verdicts after against while the next block decodes."""
    if not ahead:
        return []
    rows = [
        [
            name,
            f"{ahead[name]['after_s']:.2f}",
            f"{ahead[name]['while_generating_s']:.2f}",
            f"{ahead[name]['saved_s']:+.2f}",
            f"{ahead[name]['speedup']:.2f}x",
            "yes" if ahead[name]["same_fits"] else "NO",
        ]
        for name in ("embedding", "openai")
        if name in ahead
    ]
    return [
        f"judge while generating (judge.while_generating): one population of {ahead['rows']} rows in "
        f"{ahead['blocks']} blocks, steered and judged cold; openai is the local fake server replying "
        f"after {ahead['delay_s'] * 1000:.0f} ms",
        "",
        *_table(["judge", "judged after s", "while generating s", "saved s", "speedup", "same fits"], rows),
        "",
        *_ahead_evaluate_lines(ahead.get("evaluate")),
    ]


def _ahead_evaluate_lines(ev: dict[str, Any] | None) -> list[str]:
    """A cold evaluate judged by the fake OpenAI server, after against while generating."""
    if not ev:
        return []
    row = [
        f"{ev['after_s']:.2f}",
        f"{ev['while_generating_s']:.2f}",
        f"{ev['saved_s']:+.2f}",
        f"{ev['speedup']:.2f}x",
        "yes" if ev["same_scores"] else "NO",
    ]
    return [
        f"cold evaluate (base, prompt, proposed; {ev['rows']} held-out answers in {ev['sets']} sets of "
        f"{ev['blocks']} blocks), judged by the fake server replying after {ev['delay_s'] * 1000:.0f} ms",
        "",
        *_table(["judged after s", "while generating s", "saved s", "speedup", "same scores"], [row]),
        "",
    ]


def _one_pass_line(vec: dict[str, Any] | None) -> list[str]:
    """Cold vectors recording while generating against a second forward over the answers."""
    if not vec or "cold_one_pass_s" not in vec:
        return []
    return [
        "cold vectors, activations recorded while generating (vectors.one_pass): "
        f"{vec['cold_one_pass_s']:.2f} s "
        f"({vec['cold_one_pass_forwards']} forwards); with a second forward over the answers: "
        f"{vec['cold_s']:.2f} s: one pass is {vec['one_pass_speedup']:.2f}x",
        "",
    ]


def _plot_stages(ax: Any, stages: dict[str, Any]) -> None:
    """Grouped bars, log scale: each stage cold, cache-warm and warm."""
    names = [n for n in ("vectors", "optimize") if stages.get(n)]
    runs = (("cold", "#999999"), ("cache_warm", "#6699cc"), ("warm", "#cc6633"))
    width = 0.27
    for j, (label, color) in enumerate(runs):
        xs = [i + (j - 1) * width for i in range(len(names))]
        ax.bar(
            xs, [stages[n][f"{label}_s"] for n in names], width, color=color, label=label.replace("_", "-")
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set(ylabel="seconds (log)", title="stage re-runs")
    ax.legend(fontsize=8)


def _fluency_lines(f: dict[str, Any] | None) -> list[str]:
    if not f:
        return []
    return [
        f"offline judge fluency log-probs ({f['rows']} rows: the per-row answers and their word shuffles, "
        f"batches of {f['batch']}): every row whole {f['whole_rows_s']:.2f} s, prompt shared per question "
        f"{f['shared_prompt_s']:.2f} s = {f['speedup']:.2f}x; largest difference "
        f"{f['max_abs_diff']:.1e} nats/token",
        "",
    ]


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table as lines: the first column (names) left-aligned, the numbers right-aligned."""
    return markdown_table(headers, rows, align="l" + "r" * (len(headers) - 1)).splitlines()


def _leave_lines(leave: dict[str, Any] | None) -> list[str]:
    """Finished rows leaving the batch: row-steps and seconds saved (absent from older results)."""
    if not leave:
        return []
    return [
        f"finished rows leave the batch ({leave['rows']} rows, up to {leave['max_new_tokens']} tokens, "
        f"{leave['ended_early']} ended early, mean {leave['mean_length']:.0f} tokens): decode row-steps "
        f"{leave['row_steps_keep']} kept -> {leave['row_steps_leave']} "
        f"({100 * leave['row_steps_saved']:.0f}% saved), {leave['keep_s']:.2f} s -> {leave['leave_s']:.2f} s "
        f"= {leave['speedup']:.2f}x, {leave['identical_rows']}/{leave['rows']} rows identical",
        "",
    ]


def _compute_lines(c: dict[str, Any] | None) -> list[str]:
    """Per-row decoding against the compute limit (absent from older results)."""
    if not c:
        return []
    achieved, per_token = c["achieved_gflops"], c["gflop_per_token"]
    peak, size = c["peak_gflops"], c["matmul_size"]
    return [
        f"compute: per-row decoding does {achieved:.1f} GFLOP/s ({per_token:.2f} GFLOP per token, weights "
        f"only) against {peak:.1f} GFLOP/s for a {size}^2 matmul: {100 * c['fraction_of_peak']:.0f}% of peak",
        "",
    ]


def _auto(settings: dict[str, Any]) -> str:
    return " (from memory)" if settings.get("max_batch_from_memory") else ""
