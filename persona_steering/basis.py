"""Trait vectors at one layer as the basis steering combines: delta = alpha * scale * sum_i w_i u_i.

Units: each trait direction u_i is normalised to length 1 at the layer, and ``scale`` is the
mean residual-stream norm of response tokens at that layer (recorded at extraction). So
``alpha * w_i = 1`` adds a vector as long as a typical hidden state: ``alpha`` is a fraction of
the layer's own activation size, which transfers between models and layers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from persona_steering.cache import bytes_digest, digest
from persona_steering.config import BASES, PERSONA_AXIS, ConfigError, SteeringConfig
from persona_steering.layers import normalize_layer
from persona_steering.steering import SteeringSpec
from persona_steering.store import VectorFileError, load_vectors, save_vectors
from persona_steering.vectors import symmetric_orthogonalize, unit


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
    kind: str = "traits"  # steering.basis: 'traits' as extracted, or 'orthogonal' (Löwdin)

    def deltas(self, weights: torch.Tensor, alpha: float) -> torch.Tensor:
        """[batch, hidden] steering vectors for weights [batch, k] (or [k])."""
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape[-1] != len(self.traits):
            raise ValueError(
                f"{w.shape[-1]} weights for {len(self.traits)} traits ({', '.join(self.traits)})"
            )
        return alpha * self.scale * (w.reshape(-1, len(self.traits)) @ self.directions)

    def spec(self, weights: torch.Tensor, alpha: float, positions: str = "response") -> SteeringSpec:
        """How to steer one row per weight vector [batch, k] (or [k]): at this basis's layer."""
        return SteeringSpec(self.layer, self.deltas(weights, alpha), positions)

    def with_axis(self, direction: torch.Tensor) -> TraitBasis:
        """This basis plus the persona axis 'P' (``direction`` [hidden], normalised here), last."""
        if PERSONA_AXIS in self.traits:
            raise ValueError("the basis already has a persona axis")
        directions = torch.cat([self.directions, unit(direction.float().reshape(1, -1))])
        return replace(self, traits=[*self.traits, PERSONA_AXIS], directions=directions)

    def orthogonal(self) -> TraitBasis:
        """The symmetric (Löwdin) orthogonalisation of these directions: orthonormal, closest to them."""
        if PERSONA_AXIS in self.traits:
            raise ValueError("orthogonalise the traits before adding the persona axis")
        try:
            directions = symmetric_orthogonalize(self.directions)
        except ValueError:
            raise VectorFileError(
                f"the vectors of {', '.join(self.traits)} at layer {self.layer} are linearly dependent: "
                "steering.basis=orthogonal cannot separate them (use steering.basis=traits)"
            ) from None
        return TraitBasis(
            traits=list(self.traits),
            layer=self.layer,
            directions=directions,
            scale=self.scale,
            method=self.method,
            summary=self.summary,
            fingerprint=self.fingerprint,
            num_layers=self.num_layers,
            kind="orthogonal",
        )

    def digest(self) -> str:
        data = self.directions.contiguous().numpy().tobytes()
        # The kind joins the key only when it is not the default, so digests of earlier runs stand.
        kind = [] if self.kind == "traits" else [self.kind]
        return digest(
            [self.traits, self.layer, self.method, self.summary, self.scale, bytes_digest(data), *kind], 16
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
    kind: str = "traits",
) -> TraitBasis:
    """Load ``<vector_dir>/<slug>/<trait>.safetensors`` for each trait and take one layer.

    A persona axis 'P' among ``traits`` (it comes last) is read from ``axis_file``, which
    ``optimize`` wrote beside the persona's result (see ``save_axis``). ``kind`` 'orthogonal'
    (steering.basis) replaces the trait directions by their symmetric orthogonalisation; the
    persona axis is appended after, unchanged.
    """
    if kind not in BASES:
        raise ConfigError(f"steering.basis must be one of {', '.join(BASES)}, got {kind!r}")
    folder = Path(vector_dir) / slug
    if PERSONA_AXIS in traits:
        if traits[-1] != PERSONA_AXIS:
            raise VectorFileError(f"the persona axis {PERSONA_AXIS} must come last among {traits}")
        if axis_file is None:
            raise VectorFileError("a persona axis needs the persona's axis file, written by optimize")
        base = load_basis(
            vector_dir, slug, traits[:-1], layer, method, summary, hidden_size, fingerprint, kind=kind
        )
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
    basis = TraitBasis(
        traits=list(traits),
        layer=row,
        directions=unit(dirs),
        scale=scale,
        method=method,
        summary=summary,
        fingerprint=str(files[0].meta["fingerprint"]),
        num_layers=num_layers,
    )
    return basis.orthogonal() if kind == "orthogonal" else basis


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
        kind=steering.basis,
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
