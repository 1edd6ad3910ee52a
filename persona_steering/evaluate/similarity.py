"""The ``similarity`` stage: how alike the trait vectors are, read from vector files alone.

Three views: trait x trait cosine at one layer (are the traits distinct directions?); per trait,
the cosine between its mean_diff, svd and pca vectors at that layer (do the extraction methods
agree?); and each trait pair's cosine across all layers. No model is loaded; the model config is
only used to find ``<trait_vector_dir>/<model-slug>/``. Outputs go to
``<similarity.out_dir>/<model-slug>/``: similarity.json, similarity.md, layer<L>.png, layers.png.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from persona_steering import __version__
from persona_steering.cache import atomic_write_json, atomic_write_text
from persona_steering.config import Config, ConfigError
from persona_steering.evaluate.core import json_safe
from persona_steering.layers import normalize_layer
from persona_steering.rendering import fmt_number, markdown_table, plot_heatmaps, plot_lines
from persona_steering.runtime import identify
from persona_steering.store import VectorFile, VectorFileError, load_vectors
from persona_steering.vectors import METHODS, cosine_matrix


def run_similarity(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compute the three similarity views for ``cfg.traits`` and write JSON, Markdown and PNGs.

    Args:
        cfg: traits, steering.layer / vector_method / summary / trait_vector_dir, similarity.out_dir.
        log: where progress lines go.

    Returns:
        The data written to ``similarity.json``, plus the Markdown under ``markdown``.
    """
    if len(cfg.traits) < 2:
        raise ConfigError(f"similarity needs at least two traits, got {', '.join(cfg.traits)}")
    ident = identify(cfg.model)
    files = load_trait_files(Path(cfg.steering.trait_vector_dir) / ident.slug, cfg.traits, ident.fingerprint)
    num_layers = int(files[cfg.traits[0]].meta["num_layers"])
    layer = normalize_layer(cfg.steering.layer, num_layers)
    method, summary = cfg.steering.vector_method, cfg.steering.summary
    traits = list(cfg.traits)

    def stack(m: str, row: int) -> torch.Tensor:
        return torch.stack([files[t].vector(m, summary, row) for t in traits])  # [traits, hidden]

    at_layer = cosine_matrix(stack(method, layer))  # [traits, traits]
    method_pairs = list(itertools.combinations(METHODS, 2))
    per_method = {}
    for t in traits:
        cos = cosine_matrix(torch.stack([files[t].vector(m, summary, layer) for m in METHODS]))
        per_method[t] = {f"{a}~{b}": float(cos[METHODS.index(a), METHODS.index(b)]) for a, b in method_pairs}
    rows = list(range(1, num_layers + 1))  # row 0 (embeddings) carries no trait signal
    by_layer = [cosine_matrix(stack(method, r)) for r in rows]
    pairs = {
        f"{a}~{b}": [float(c[i, j]) for c in by_layer]
        for (i, a), (j, b) in itertools.combinations(enumerate(traits), 2)
    }
    data = json_safe(
        {
            "model_id": files[traits[0]].meta.get("model_id"),
            "fingerprint": ident.fingerprint,
            "layer": layer,
            "vector_method": method,
            "summary": summary,
            "traits": traits,
            "cosine": at_layer.tolist(),
            "methods": per_method,
            "layers": rows,
            "pairs_by_layer": pairs,
            "version": __version__,
        }
    )
    return _write(Path(cfg.similarity.out_dir) / ident.slug, data, log)


def load_trait_files(folder: Path, traits: list[str], fingerprint: str) -> dict[str, VectorFile]:
    """Each trait's vector file from ``folder``; a missing one names what exists instead."""
    out = {}
    for trait in traits:
        path = folder / f"{trait}.safetensors"
        if not path.is_file():
            have = sorted(p.stem for p in folder.glob("*.safetensors")) if folder.is_dir() else []
            hint = f"vectors exist for {', '.join(have)}" if have else f"no vectors in {folder}"
            raise VectorFileError(
                f"no vectors for trait {trait} of this model at {path} ({hint}): run make vectors first"
            )
        out[trait] = load_vectors(path, fingerprint=fingerprint)
    sizes = {int(f.meta["num_layers"]) for f in out.values()}
    if len(sizes) != 1:
        raise VectorFileError(f"vector files in {folder} disagree on the number of layers: {sorted(sizes)}")
    return out


def render_similarity(data: dict[str, Any]) -> str:
    """Markdown: the trait x trait table at the layer, then the method-agreement table."""
    traits = data["traits"]
    parts = [
        f"# Trait vector similarity: {data['model_id']}\n",
        f"Cosine of {data['vector_method']} vectors ({data['summary']}) at layer {data['layer']}.\n",
        markdown_table(
            ["", *traits],
            [[t, *(fmt_number(v) for v in row)] for t, row in zip(traits, data["cosine"], strict=True)],
        ),
        f"\n## Extraction methods per trait, layer {data['layer']}\n",
    ]
    method_pairs = list(next(iter(data["methods"].values())))
    rows = [[t, *(fmt_number(data["methods"][t][p]) for p in method_pairs)] for t in traits]
    parts.append(markdown_table(["trait", *method_pairs], rows))
    extremes = []
    for pair, values in data["pairs_by_layer"].items():
        strongest = max(range(len(values)), key=lambda i: abs(values[i]))
        extremes.append([pair, fmt_number(values[strongest]), data["layers"][strongest]])
    parts.append("\n## Across layers: each pair's largest |cosine|\n")
    parts.append(markdown_table(["pair", "cosine", "at layer"], extremes))
    return "\n".join(parts)


def _write(folder: Path, data: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    traits = data["traits"]
    markdown = render_similarity(data)
    atomic_write_json(folder / "similarity.json", data)
    atomic_write_text(folder / "similarity.md", markdown)
    method_pairs = list(next(iter(data["methods"].values())))
    methods_matrix = [[data["methods"][t][p] for p in method_pairs] for t in traits]
    short = [p.replace("mean_diff", "md") for p in method_pairs]
    plot_heatmaps(
        folder / f"layer{data['layer']}.png",
        [
            ("trait x trait", data["cosine"], traits, traits),
            ("extraction methods", methods_matrix, traits, short),
        ],
        f"cosine similarity at layer {data['layer']} ({data['vector_method']})",
        symmetric=True,
    )
    plot_lines(
        folder / "layers.png",
        data["layers"],
        data["pairs_by_layer"],
        f"trait-pair cosine by layer ({data['vector_method']})",
        "layer (hidden_states row)",
        "cosine",
    )
    log(f"wrote {folder / 'similarity.json'}, similarity.md, layer{data['layer']}.png, layers.png")
    return {**data, "markdown": markdown, "folder": str(folder)}
