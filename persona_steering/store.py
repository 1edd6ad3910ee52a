"""safetensors files of per-layer trait vectors with their metadata.

A file holds tensors ``<method>.<summary>`` of shape [num_layers + 1, hidden] (row i = HF
hidden_states[i]) and ``norm.<summary>`` [num_layers + 1], the mean residual norm of the
activations behind them, which gives steering strength a model-independent unit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from persona_steering.cache import atomic_write_bytes


class VectorFileError(ValueError):
    """A vector file is missing, unreadable, or belongs to another model."""


@dataclass
class VectorFile:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: str = ""

    def vector(self, method: str, summary: str, layer: int) -> torch.Tensor:
        """The [hidden] vector of one method and summary at a hidden_states row."""
        name = f"{method}.{summary}"
        if name not in self.tensors:
            raise VectorFileError(f"{self.path}: no tensor {name!r} (has {', '.join(sorted(self.tensors))})")
        return self.tensors[name][layer]

    def norm(self, summary: str, layer: int) -> float:
        return float(self.tensors[f"norm.{summary}"][layer])


def save_vectors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write tensors (float32, contiguous) and JSON metadata atomically."""
    data = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    blob = save(data, metadata={"persona_steering": json.dumps(meta, sort_keys=True)})
    return atomic_write_bytes(path, blob)


def load_vectors(
    path: str | Path, hidden_size: int | None = None, fingerprint: str | None = None
) -> VectorFile:
    """Read a vector file; refuse one made for another hidden size or model fingerprint."""
    path = Path(path)
    if not path.is_file():
        raise VectorFileError(f"vector file {path} not found: run `persona-steering vectors` first")
    try:
        blob = path.read_bytes()
        tensors = load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("persona_steering", "{}"))
    except (SafetensorError, ValueError, OSError) as exc:
        raise VectorFileError(f"vector file {path} is unreadable: {exc}") from None
    if hidden_size is not None and int(meta.get("hidden_size", -1)) != hidden_size:
        raise VectorFileError(
            f"vector file {path} has hidden size {meta.get('hidden_size')}, but the model has {hidden_size}: "
            "it was extracted from another model"
        )
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise VectorFileError(
            f"vector file {path} was extracted from model {meta.get('model_id')} "
            f"(fingerprint {str(meta.get('fingerprint'))[:12]}), not the loaded one ({fingerprint[:12]})"
        )
    return VectorFile(tensors=tensors, meta=meta, path=str(path))
