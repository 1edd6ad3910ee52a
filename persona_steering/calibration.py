"""The ``judge-check`` stage: does a judge rank in-voice > assistant > degenerate answers?

The calibration set (``judge.calibration_dir``, one ``<persona>.json`` per persona) was written by
hand before the offline judge was tuned and is never edited to make a judge pass. Each item holds
one held-out question and three answers: in the persona's voice, a plain assistant's, and a
degenerate one of the kinds steering produces (loop, word salad, off-topic, fragment). Every answer
is judged against the model's own unsteered (greedy, cached) answer to the same question, which is
also judged, so the check shows whether degenerate answers score below what steering starts from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from persona_steering.cache import Cache, atomic_write_json
from persona_steering.config import Config, ConfigError
from persona_steering.contrast import fit_context
from persona_steering.generation import Request, generate
from persona_steering.judges import Judge, build_judge
from persona_steering.judges.base import PARTS
from persona_steering.runtime import Runtime, load_runtime
from persona_steering.traits import DefinitionError, load_persona

CLASSES = ("in_voice", "assistant", "degenerate")
"""Best to worst: a judge should score every answer of a class above every answer of a later one."""


def run_judge_check(
    cfg: Config, rt: Runtime | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Judge the calibration set with ``cfg.judge`` and write ``<judge.check_dir>/<backend>.json``.

    Returns:
        {"judge", "personas": {id: {pairwise_accuracy, degenerate_below_unsteered, means, items}},
        "markdown", "file"}
    """
    sets = load_calibration(cfg.judge.calibration_dir)
    rt = rt or load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
    out: dict[str, Any] = {"judge": cfg.judge.backend, "personas": {}}
    with Cache(cfg.cache_dir) as cache:
        judge = build_judge(cfg.judge, rt, cfg.cache_dir)
        for persona_id, items in sets.items():
            out["personas"][persona_id] = check_persona(judge, rt, cfg, persona_id, items, cache)
    out["markdown"] = render_check(out)
    path = Path(cfg.judge.check_dir) / f"{cfg.judge.backend}.json"
    atomic_write_json(path, out)
    out["file"] = str(path)
    log(out["markdown"])
    return out


def load_calibration(folder: str | Path) -> dict[str, list[dict[str, str]]]:
    """persona id -> items, from every ``<id>.json`` in ``folder``; DefinitionError when malformed."""
    folder = Path(folder)
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise ConfigError(f"judge.calibration_dir {folder}: no <persona>.json calibration files there")
    sets = {}
    for path in files:
        try:
            items = json.loads(path.read_text())["items"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DefinitionError(f"{path}: not a calibration file ({exc})") from None
        for i, item in enumerate(items):
            missing = [k for k in ("question", *CLASSES) if not isinstance(item.get(k), str)]
            if missing:
                raise DefinitionError(f"{path}: item {i} lacks {', '.join(missing)}")
        sets[path.stem] = items
    return sets


def check_persona(
    judge: Judge, rt: Runtime, cfg: Config, persona_id: str, items: list[dict[str, str]], cache: Cache
) -> dict[str, Any]:
    """Scores of one persona's calibration items, their pairwise ranking accuracy and the baseline test."""
    persona = load_persona(cfg.optimize.persona_dir, persona_id)
    fit = fit_context(rt, cfg, persona, cache)
    questions = [it["question"] for it in items]
    unsteered = [a.text for a in generate(rt, [Request(q) for q in questions], cfg.generation, cache=cache)]
    kinds = (*CLASSES, "unsteered")
    queries = [
        fit.query(q, it[k] if k != "unsteered" else base, base)
        for q, it, base in zip(questions, items, unsteered, strict=True)
        for k in kinds
    ]
    verdicts = judge.judge(queries, cache)
    rows = []
    for n, (it, base) in enumerate(zip(items, unsteered, strict=True)):
        row: dict[str, Any] = {"question": it["question"], "unsteered_answer": base}
        row["degenerate_kind"] = it.get("degenerate_kind", "")
        for j, k in enumerate(kinds):
            v = verdicts[n * len(kinds) + j]
            row[k] = {"score": v.score, "parts": v.meta.get("parts", {})}
        rows.append(row)
    scores = {k: [r[k]["score"] for r in rows] for k in kinds}
    below = [
        d is not None and u is not None and d < u
        for d, u in zip(scores["degenerate"], scores["unsteered"], strict=True)
    ]
    return {
        "pairwise_accuracy": pairwise_accuracy([scores[k] for k in CLASSES]),
        "degenerate_below_unsteered": sum(below),
        "items": len(rows),
        "missing": sum(s is None for k in kinds for s in scores[k]),
        "means": {k: _mean(scores[k]) for k in kinds},
        "part_means": {k: {p: _mean([r[k]["parts"].get(p) for r in rows]) for p in PARTS} for k in kinds},
        "style_classifier": judge.style_report(fit.samples, fit.contrast)
        if hasattr(judge, "style_report")
        else None,
        "rows": rows,
    }


def pairwise_accuracy(classes: list[list[float | None]]) -> float | None:
    """Share of (better-class, worse-class) answer pairs the scores order correctly; ties count half.

    Args:
        classes: scores per class, best class first; a None (no verdict) counts as a wrong pair.
    """
    right = total = 0.0
    for i, better in enumerate(classes):
        for worse in classes[i + 1 :]:
            for a in better:
                for b in worse:
                    total += 1
                    if a is not None and b is not None:
                        right += 1.0 if a > b else 0.5 if a == b else 0.0
    return right / total if total else None


def render_check(out: dict[str, Any]) -> str:
    """The Markdown table: per persona, accuracy, the baseline test and mean score per class."""
    lines = [
        f"judge-check with the {out['judge']} judge (scores 1-5; pairwise accuracy should be >= 0.9)",
        "",
        "| persona | pairwise acc. | degenerate < unsteered | in_voice | assistant | degenerate | unsteered "
        "| style AUC |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for pid, r in out["personas"].items():
        m = r["means"]
        auc = (r.get("style_classifier") or {}).get("auc")
        acc = r["pairwise_accuracy"]
        lines.append(
            f"| {pid} | {acc:.3f} | {r['degenerate_below_unsteered']}/{r['items']} | "
            + " | ".join(_fmt(m[k]) for k in (*CLASSES, "unsteered"))
            + f" | {_fmt(auc)} |"
        )
    return "\n".join(lines)


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
