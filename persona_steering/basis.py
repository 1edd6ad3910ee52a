"""Trait vectors at one layer as the basis steering combines: delta = alpha * scale * sum_i w_i u_i.

Units: each trait direction u_i is normalised to length 1 at the layer, and ``scale`` is the
mean residual-stream norm of response tokens at that layer (recorded at extraction). So
``alpha * w_i = 1`` adds a vector as long as a typical hidden state: ``alpha`` is a fraction of
the layer's own activation size, which transfers between models and layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from persona_steering.cache import bytes_digest, digest
from persona_steering.config import PERSONA_AXIS, ConfigError, SteeringConfig
from persona_steering.layers import normalize_layer
from persona_steering.store import VectorFileError, load_vectors, save_vectors
from persona_steering.vectors import unit


@dataclass
class TraitBasis:
    traits: list[str]
    layer: int  # hidden_states row
    directions: torch.Tensor  # [k, hidden], unit norm
    scale: float  # mean residual norm at the layer
    method: str
    summary: str
    fingerprint: str
    num_layers: int

    def deltas(self, weights: torch.Tensor, alpha: float) -> torch.Tensor:
        """[batch, hidden] steering vectors for weights [batch, k] (or [k])."""
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape[-1] != len(self.traits):
            raise ValueError(
                f"{w.shape[-1]} weights for {len(self.traits)} traits ({', '.join(self.traits)})"
            )
        return alpha * self.scale * (w.reshape(-1, len(self.traits)) @ self.directions)

    def with_axis(self, direction: torch.Tensor) -> TraitBasis:
        """This basis plus the persona axis 'P' (``direction`` [hidden], normalised here), last."""
        if PERSONA_AXIS in self.traits:
            raise ValueError("the basis already has a persona axis")
        row = unit(direction.float().reshape(1, -1))
        return TraitBasis(
            traits=[*self.traits, PERSONA_AXIS],
            layer=self.layer,
            directions=torch.cat([self.directions, row]),
            scale=self.scale,
            method=self.method,
            summary=self.summary,
            fingerprint=self.fingerprint,
            num_layers=self.num_layers,
        )

    def digest(self) -> str:
        data = self.directions.contiguous().numpy().tobytes()
        return digest(
            [self.traits, self.layer, self.method, self.summary, self.scale, bytes_digest(data)], 16
        )


def load_basis(
    vector_dir: str | Path,
    slug: str,
    traits: list[str],
    layer: int,
    method: str = "mean_diff",
    summary: str = "response_avg",
    hidden_size: int | None = None,
    fingerprint: str | None = None,
    axis_file: str | Path | None = None,
) -> TraitBasis:
    """Load ``<vector_dir>/<slug>/<trait>.safetensors`` for each trait and take one layer.

    A persona axis 'P' among ``traits`` (it comes last) is read from ``axis_file``, which
    ``optimize`` wrote beside the persona's result (see ``save_axis``).
    """
    folder = Path(vector_dir) / slug
    if PERSONA_AXIS in traits:
        if traits[-1] != PERSONA_AXIS:
            raise VectorFileError(f"the persona axis {PERSONA_AXIS} must come last among {traits}")
        if axis_file is None:
            raise VectorFileError("a persona axis needs the persona's axis file, written by optimize")
        base = load_basis(vector_dir, slug, traits[:-1], layer, method, summary, hidden_size, fingerprint)
        return base.with_axis(load_axis(axis_file, base))
    files = []
    for trait in traits:
        path = folder / f"{trait}.safetensors"
        if not path.is_file():
            others = sorted(p.name for p in Path(vector_dir).iterdir()) if Path(vector_dir).is_dir() else []
            hint = f" (vectors exist for: {', '.join(others)})" if others else ""
            raise VectorFileError(
                f"no vectors for trait {trait} of this model at {path}{hint}: run `persona-steering vectors` "
                f"(make vectors) with the same --model first"
            )
        files.append(load_vectors(path, hidden_size=hidden_size, fingerprint=fingerprint))
    num_layers = int(files[0].meta["num_layers"])
    row = normalize_layer(layer, num_layers)
    dirs = torch.stack([f.vector(method, summary, row) for f in files]).float()
    if not torch.isfinite(dirs).all() or bool((dirs.norm(dim=-1) == 0).any()):
        raise VectorFileError(f"vectors at layer {row} are zero or not finite in {folder}")
    scale = float(torch.tensor([f.norm(summary, row) for f in files]).mean())
    return TraitBasis(
        traits=list(traits),
        layer=row,
        directions=unit(dirs),
        scale=scale,
        method=method,
        summary=summary,
        fingerprint=str(files[0].meta["fingerprint"]),
        num_layers=num_layers,
    )


def save_axis(path: str | Path, direction: torch.Tensor, basis: TraitBasis, **meta: object) -> Path:
    """Write a persona axis ([hidden], at ``basis.layer``) for readers of an optimised persona."""
    info = {"fingerprint": basis.fingerprint, "layer": basis.layer, "hidden_size": direction.numel(), **meta}
    return save_vectors(path, {"axis": direction.reshape(1, -1)}, info)


def load_axis(path: str | Path, basis: TraitBasis) -> torch.Tensor:
    """The persona axis [hidden] in ``path``; refused when written for another model or layer."""
    file = load_vectors(path, hidden_size=basis.directions.shape[-1], fingerprint=basis.fingerprint)
    if int(file.meta.get("layer", -1)) != basis.layer or "axis" not in file.tensors:
        raise VectorFileError(
            f"{path} holds no persona axis for layer {basis.layer}: re-run make optimize for this persona"
        )
    direction = file.tensors["axis"].reshape(-1).float()
    if not torch.isfinite(direction).all() or float(direction.norm()) == 0:
        raise VectorFileError(f"the persona axis in {path} is zero or not finite")
    return direction


def configured_basis(steering: SteeringConfig, traits: list[str], slug: str, fingerprint: str) -> TraitBasis:
    """The basis a stage's steering section names, for the model with this slug and fingerprint."""
    return load_basis(
        steering.trait_vector_dir,
        slug,
        traits,
        steering.layer,
        steering.vector_method,
        steering.summary,
        fingerprint=fingerprint,
    )


def parse_weights(text: str | None, traits: list[str] | None = None) -> dict[str, float]:
    """'R2=1,R5=-0.5' -> {'R2': 1.0, 'R5': -0.5}; ConfigError naming a bad item or unknown trait."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--weights item {item!r} must look like R2=1.0") from None
    unknown = sorted(set(weights) - set(traits)) if traits is not None else []
    if unknown:
        known = ", ".join(traits or [])
        raise ConfigError(f"--weights names {', '.join(unknown)}, not among the traits {known}")
    return weights
