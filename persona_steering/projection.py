"""The ``project`` stage: given answers projected onto trait vectors, optionally under a second model.

Input: a CSV file (header row) or a JSONL file (one object per line) with the columns/keys
``prompt`` (or ``question``) and ``answer``, and optionally ``system``. Each row is read back
through the model exactly as extraction reads an answer: the chat-templated prompt
(``generation.chat_text``) followed by the answer's own token ids, one forward per batch
(``extraction.record_activations``). At every requested layer the row's three activation summaries
are projected onto the trait's unit vector there (the ``steering.vector_method`` /
``steering.summary`` vector of ``<trait_vector_dir>/<model-slug>/<trait>.safetensors``):

- ``<trait>_L<layer>_proj``: the response-averaged activation (the persona-vectors "projection"),
- ``<trait>_L<layer>_prompt_last_proj``: the last prompt token (before any answer token is seen),
- ``<trait>_L<layer>_prompt_avg_proj``: the prompt tokens, the first one left out (see extraction).

With ``--compare-model`` the same rows are read by a second model (e.g. a fine-tuned checkpoint of
the first) and projected onto the *first* model's vectors, which is how a fine-tune's shift along a
trait is measured (each model reads the rows through its own tokenizer and chat template);
``compare_<column>`` and ``shift_<column>`` (second minus first) are added and a
Markdown table summarises the shifts. Output: ``<input stem>_projections.csv`` next to the input (or
``--out``), with ``.md`` (the table) and ``.json`` (settings, config digest) beside it.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from persona_steering import __version__
from persona_steering.cache import atomic_write_json, atomic_write_text
from persona_steering.config import Config, ConfigError
from persona_steering.extraction import Pair, record_activations
from persona_steering.generation import Request, chat_text
from persona_steering.layers import normalize_layer
from persona_steering.rendering import fmt_number, markdown_table
from persona_steering.runtime import Runtime, identify, load_runtime
from persona_steering.store import VectorFileError, load_vectors
from persona_steering.traits import DefinitionError
from persona_steering.vectors import unit

SUMMARY_COLUMNS = {"response_avg": "proj", "prompt_last": "prompt_last_proj", "prompt_avg": "prompt_avg_proj"}
CHUNK_ROWS = 256
"""Rows per record_activations call: it returns every layer of every row (1.6 MB a row on an 8B model)."""


@dataclass(frozen=True)
class AnswerRow:
    """One row of the input: what was asked, under which system prompt, the answer, and all its fields."""

    prompt: str
    answer: str
    system: str | None
    fields: dict[str, str]


@dataclass(frozen=True)
class ProjectSettings:
    """Per-invocation options of ``project`` (the rest comes from the config)."""

    input: Path
    layers: list[int] | None = None  # hidden_states rows; None = [steering.layer]
    out: Path | None = None
    compare_model: str | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> ProjectSettings:
        """``cfg.project``; ConfigError without an input file."""
        p = cfg.project
        if not p.input:
            raise ConfigError("project needs the answers file (project.input)")
        return cls(Path(p.input), p.layers or None, Path(p.out) if p.out else None, p.compare_model)


def run_project(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Project every answer of ``project.input`` onto ``cfg.traits`` at the requested layers.

    Args:
        cfg: traits, vector folder and method, model, batch size; ``project``: input file, layers,
            output path, optional second model.
        log: where progress lines go.

    Returns:
        ``{"columns": {name: [value or None per row]}, "markdown": str, "files": {...}}``.
    """
    settings = ProjectSettings.from_config(cfg)
    rows, fields = read_answers(settings.input)
    out = settings.out or settings.input.with_name(f"{settings.input.stem}_projections.csv")
    if out.suffix.lower() != ".csv":
        raise ConfigError(f"--out {out} must be a .csv file (its .md and .json are written beside it)")
    if out.resolve() == settings.input.resolve():
        raise ConfigError(f"--out {out} would overwrite the input file")
    ident = identify(cfg.model)
    directions, num_layers, hidden = load_directions(cfg, ident.slug, ident.fingerprint, settings.layers)
    compare_ident = (
        identify(replace(cfg.model, name=settings.compare_model)) if settings.compare_model else None
    )
    rt = load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
    columns = project_rows(rt, rows, directions, cfg.generation.max_batch)
    model_id = rt.model_id
    compare: dict[str, list[float | None]] | None = None
    if compare_ident is not None:
        del rt
        gc.collect()  # one model in memory at a time: the second may be as large as the first
        rt2 = load_runtime(replace(cfg.model, name=str(settings.compare_model)), cfg.cache_dir, cfg.seed)
        if rt2.hidden_size != hidden or rt2.num_layers != num_layers:
            raise VectorFileError(
                f"--compare-model {settings.compare_model} has hidden size {rt2.hidden_size} and "
                f"{rt2.num_layers} layers, the vectors' model {hidden} and {num_layers}: "
                "compare a fine-tune of the same architecture"
            )
        compare = project_rows(rt2, rows, directions, cfg.generation.max_batch)
    table = summary_table(columns, compare, model_id, compare_ident.model_id if compare_ident else None)
    meta = {
        "input": str(settings.input),
        "rows": len(rows),
        "model_id": model_id,
        "fingerprint": ident.fingerprint,
        "compare_model": compare_ident.model_id if compare_ident else None,
        "compare_fingerprint": compare_ident.fingerprint if compare_ident else None,
        "traits": cfg.traits,
        "layers": sorted({row for _, row in directions}),
        "vector_method": cfg.steering.vector_method,
        "vector_summary": cfg.steering.summary,
        "config_digest": cfg.digest("model", "steering", "traits"),
        "version": __version__,
    }
    files = _write(out, rows, fields, columns, compare, table, meta)
    log(f"wrote {files['csv']} ({len(rows)} rows, {len(columns)} projection columns)")
    return {"columns": columns, "compare": compare, "markdown": table, "files": files}


def read_answers(path: Path) -> tuple[list[AnswerRow], list[str]]:
    """Rows of a CSV or JSONL answers file and its field names in order; DefinitionError when malformed."""
    if not path.is_file():
        raise DefinitionError(f"{path}: file not found")
    suffix = path.suffix.lower()
    records: list[tuple[int, dict[str, Any]]] = []  # (line number, record)
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            for record in reader:
                if None in record:  # DictReader files surplus cells under the key None
                    raise DefinitionError(f"{path}: line {reader.line_num} has more cells than the header")
                records.append((reader.line_num, dict(record)))
    elif suffix in (".jsonl", ".ndjson"):
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if text.strip():
                records.append((number, _json_record(path, number, text)))
    else:
        raise DefinitionError(f"{path}: unknown format {suffix or '(no suffix)'}; use a .csv or .jsonl file")
    if not records:
        raise DefinitionError(f"{path}: no rows")
    fields = list(dict.fromkeys(k for _, r in records for k in r))
    return [_row(path, line, record) for line, record in records], fields


def load_directions(
    cfg: Config, slug: str, fingerprint: str, layers: list[int] | None
) -> tuple[dict[tuple[str, int], torch.Tensor], int, int]:
    """Unit trait directions {(trait, row): [hidden]}, the vectors' layer count and hidden size.

    Checked before any model loads: missing files, another model's vectors, bad layers.
    """
    directions: dict[tuple[str, int], torch.Tensor] = {}
    num_layers = hidden = 0
    for trait in cfg.traits:
        vf = load_vectors(
            Path(cfg.steering.trait_vector_dir) / slug / f"{trait}.safetensors", fingerprint=fingerprint
        )
        num_layers, hidden = int(vf.meta["num_layers"]), int(vf.meta["hidden_size"])
        for layer in layers or [cfg.steering.layer]:
            row = normalize_layer(layer, num_layers)
            vector = vf.vector(cfg.steering.vector_method, cfg.steering.summary, row).float()
            if not bool(torch.isfinite(vector).all()) or float(vector.norm()) == 0:
                raise VectorFileError(f"{vf.path}: the vector at layer {row} is zero or not finite")
            directions[(trait, row)] = unit(vector)
    return directions, num_layers, hidden


def project_rows(
    rt: Runtime, rows: list[AnswerRow], directions: dict[tuple[str, int], torch.Tensor], max_batch: int | None
) -> dict[str, list[float | None]]:
    """{column: one value per row}; None where a summary has no tokens (an empty answer, a 1-token prompt)."""
    tok = rt.tokenizer
    pairs = [
        Pair(
            r.prompt,
            r.system or "",
            r.answer,
            chat_text(tok, Request(r.prompt, r.system)),
            tuple(tok(r.answer, add_special_tokens=False)["input_ids"]),
        )
        for r in rows
    ]
    columns: dict[str, list[float | None]] = {
        column_name(t, row, s): [] for (t, row) in directions for s in SUMMARY_COLUMNS
    }
    for start in range(0, len(pairs), CHUNK_ROWS):
        chunk = pairs[start : start + CHUNK_ROWS]
        acts, _ = record_activations(rt, chunk, max_batch)  # {summary: [rows, L+1, hidden]}
        prompt_lens = [len(tok(p.prompt_text, add_special_tokens=False)["input_ids"]) for p in chunk]
        present = {
            "response_avg": [bool(p.answer_ids) for p in chunk],
            "prompt_last": [n >= 1 for n in prompt_lens],
            "prompt_avg": [n >= 2 for n in prompt_lens],  # the first token is left out of the average
        }
        for (trait, row), u in directions.items():
            for summary in SUMMARY_COLUMNS:
                values = (acts[summary][:, row] @ u).tolist()  # [rows]
                columns[column_name(trait, row, summary)] += [
                    v if ok else None for v, ok in zip(values, present[summary], strict=True)
                ]
    return columns


def column_name(trait: str, row: int, summary: str) -> str:
    """``<trait>_L<row>_proj`` and its prompt_last / prompt_avg siblings."""
    return f"{trait}_L{row}_{SUMMARY_COLUMNS[summary]}"


def summary_table(
    columns: dict[str, list[float | None]],
    compare: dict[str, list[float | None]] | None,
    model_id: str,
    compare_id: str | None,
) -> str:
    """Markdown: per column the mean (and sd); with a second model its mean and the shift's mean and sd."""
    if compare is None:
        rows = [[name, *_stats(values)] for name, values in columns.items()]
        return markdown_table(["column", "rows", f"mean ({_short(model_id)})", "sd"], rows)
    rows = []
    for name, values in columns.items():
        shift = _shift(values, compare[name])
        n, mean_shift, sd_shift = _stats(shift)
        rows.append([name, n, _stats(values)[1], _stats(compare[name])[1], mean_shift, sd_shift])
    headers = ["column", "rows", _short(model_id), _short(str(compare_id)), "shift mean", "shift sd"]
    return markdown_table(headers, rows)


def _stats(values: list[float | None]) -> tuple[int, str, str]:
    present = [v for v in values if v is not None]
    if not present:
        return 0, fmt_number(None), fmt_number(None)
    mean = sum(present) / len(present)
    sd = math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1)) if len(present) > 1 else None
    return len(present), fmt_number(mean, 3), fmt_number(sd, 3)


def _shift(first: list[float | None], second: list[float | None]) -> list[float | None]:
    return [None if a is None or b is None else b - a for a, b in zip(first, second, strict=True)]


def _short(model_id: str) -> str:
    return model_id.rstrip("/").split("/")[-1]


def _json_record(path: Path, line: int, text: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DefinitionError(f"{path}: line {line} is not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DefinitionError(f"{path}: line {line} must be a JSON object")
    return record


def _row(path: Path, line: int, record: dict[str, Any]) -> AnswerRow:
    """An input record checked: a prompt (or question) and an answer, both strings."""
    prompt = record.get("prompt", record.get("question"))
    answer = record.get("answer")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DefinitionError(f"{path}: line {line} needs a non-empty 'prompt' (or 'question')")
    if not isinstance(answer, str):
        raise DefinitionError(f"{path}: line {line} needs an 'answer' string")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DefinitionError(f"{path}: line {line}: 'system' must be a string")
    fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items() if v is not None}
    return AnswerRow(prompt.strip(), answer.strip(), (system.strip() or None) if system else None, fields)


def _write(
    out: Path,
    rows: list[AnswerRow],
    fields: list[str],
    columns: dict[str, list[float | None]],
    compare: dict[str, list[float | None]] | None,
    table: str,
    meta: dict[str, Any],
) -> dict[str, str]:
    """The CSV (input fields, then projections), the Markdown table and the settings JSON."""
    data = dict(columns)
    if compare is not None:
        data |= {f"compare_{k}": v for k, v in compare.items()}
        data |= {f"shift_{k}": _shift(v, compare[k]) for k, v in columns.items()}
    fields = [f for f in fields if f not in data]  # re-projecting an output file replaces its columns
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*fields, *data])
    for i, row in enumerate(rows):
        values = ["" if (v := data[k][i]) is None else f"{v:.6g}" for k in data]
        writer.writerow([row.fields.get(f, "") for f in fields] + values)
    files = {"csv": out, "md": out.with_suffix(".md"), "json": out.with_suffix(".json")}
    atomic_write_text(files["csv"], buf.getvalue())
    atomic_write_text(files["md"], table)
    atomic_write_json(files["json"], {**meta, "columns": list(data)})
    return {k: str(v) for k, v in files.items()}
