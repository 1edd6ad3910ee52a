"""What the server can answer as: ``base``, every optimised persona in the save folder, ad-hoc weights.

Personas are read through ``PersonaRecord`` (the one loader) and re-read when their file changes,
so a persona optimised while the server runs appears without a restart.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from persona_steering.basis import TraitBasis, load_basis
from persona_steering.config import PERSONA_AXIS, PERSONA_ID, POSITIONS, Config, ConfigError
from persona_steering.record import PersonaFiles, PersonaRecord
from persona_steering.scheduler import Steering
from persona_steering.store import VectorFileError

log = logging.getLogger(__name__)
BASE = "base"
RESULT_SUFFIX = "_optimization.json"


class UnknownPersona(LookupError):
    """No persona of that id can be served (none saved, or its vectors no longer match)."""


@dataclass
class Persona:
    """A servable model id: its steering and what /v1/models shows about it."""

    id: str
    steering: Steering
    meta: dict[str, Any] = field(default_factory=dict)
    created: int = 0


class Catalog:
    """The personas of one save folder for one loaded model (its slug and fingerprint)."""

    def __init__(self, cfg: Config, slug: str, fingerprint: str) -> None:
        self.cfg = cfg
        self.save_dir = Path(cfg.optimize.save_dir)
        self.slug = slug
        self.fingerprint = fingerprint
        self._seen: dict[Path, tuple[float, Persona | str]] = {}  # file -> (mtime, persona or why not)
        self._bases: dict[tuple[Any, ...], TraitBasis] = {}

    def personas(self) -> list[Persona]:
        """``base`` and every servable persona, re-read where the file changed since last time."""
        found = [Persona(BASE, Steering(), {"steering": None, "description": "the unsteered model"})]
        files = sorted(self.save_dir.glob(f"*{RESULT_SUFFIX}")) if self.save_dir.is_dir() else []
        for path in files:
            entry = self._read(path)
            if isinstance(entry, Persona):
                found.append(entry)
        return found

    def get(self, persona_id: str) -> Persona:
        """The persona of that id; UnknownPersona with what to do when there is none."""
        if persona_id == BASE:
            return self.personas()[0]
        if not PERSONA_ID.fullmatch(persona_id):  # never a path
            raise UnknownPersona(
                f"{persona_id!r} is not a persona id (models: {', '.join(p.id for p in self.personas())})"
            )
        path = self.save_dir / f"{persona_id}{RESULT_SUFFIX}"
        entry = self._read(path) if path.is_file() else None
        if isinstance(entry, Persona):
            return entry
        known = ", ".join(p.id for p in self.personas())
        why = entry if isinstance(entry, str) else f"no optimised persona {persona_id!r} in {self.save_dir}"
        raise UnknownPersona(f"{why} (models: {known})")

    def adhoc(self, spec: Any) -> Steering:
        """Steering from a request's ``{"weights": {...}, "alpha": .., "layer": ..}``; ConfigError
        naming the bad field."""
        if not isinstance(spec, dict):
            raise ConfigError("steering must be an object like {'weights': {'R2': 1.0}, 'alpha': 0.1}")
        unknown = sorted(set(spec) - {"weights", "alpha", "layer", "positions"})
        if unknown:
            raise ConfigError(
                f"steering.{unknown[0]} is not a steering field (weights, alpha, layer, positions)"
            )
        weights = spec.get("weights") or {}
        if not isinstance(weights, dict) or not all(_number(v) for v in weights.values()):
            raise ConfigError("steering.weights must map trait names to numbers, e.g. {'R2': -1}")
        traits = self.cfg.traits
        extra = sorted(set(weights) - set(traits))
        if extra:
            raise ConfigError(f"steering.weights names {extra[0]}, not among the traits {', '.join(traits)}")
        alpha = spec.get("alpha", self.cfg.steering.alpha)
        layer = spec.get("layer", self.cfg.steering.layer)
        positions = spec.get("positions", self.cfg.steering.positions)
        if not _number(alpha) or isinstance(layer, bool) or not isinstance(layer, int):
            raise ConfigError("steering.alpha must be a number and steering.layer an integer")
        if positions not in POSITIONS:
            raise ConfigError(f"steering.positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
        s = self.cfg.steering
        try:
            basis = self._basis(tuple(traits), layer, s.vector_method, s.summary)
        except VectorFileError as exc:
            raise ConfigError(str(exc)) from None
        w = torch.tensor([float(weights.get(t, 0.0)) for t in traits])
        return Steering(basis.deltas(w, float(alpha))[0], basis.layer, positions)

    def _read(self, path: Path) -> Persona | str:
        mtime = path.stat().st_mtime if path.is_file() else -1.0
        seen = self._seen.get(path)
        if seen is not None and seen[0] == mtime:
            return seen[1]
        entry: Persona | str
        try:
            entry = self._load(path, mtime)
        except (ConfigError, VectorFileError, ValueError, OSError) as exc:
            entry = f"persona file {path.name} cannot be served: {exc}"
            log.warning(entry)
        self._seen[path] = (mtime, entry)
        return entry

    def _load(self, path: Path, mtime: float) -> Persona:
        files = PersonaFiles(path.parent, path.name[: -len(RESULT_SUFFIX)])
        record = PersonaRecord.require(files)
        s = self.cfg.steering
        basis = self._basis(
            tuple(record.traits),
            record.layer,
            record.vector_method or s.vector_method,
            record.summary or s.summary,
            files.axis if PERSONA_AXIS in record.traits else None,
        )
        record.check_basis(basis)
        delta = basis.deltas(record.weights(record.traits), record.alpha)[0]  # [hidden]
        positions = record.positions or s.positions
        meta = {
            "layer": record.layer,
            "alpha": record.alpha,
            "positions": positions,
            "weights": record.selected_weights,
            "selected": record.selected,
            "judge": record.judge,
            "score": record.score,
            "scores": record.data.get("parts") or record.data.get("best_parts") or {},
            "evaluations": record.num_evaluations,
        }
        return Persona(files.persona_id, Steering(delta, basis.layer, positions), meta, int(mtime))

    def _basis(
        self, traits: tuple[str, ...], layer: int, method: str, summary: str, axis: Path | None = None
    ) -> TraitBasis:
        """The basis (cached); ``axis`` is the persona's own axis file when 'P' is among ``traits``."""
        stamp = axis.stat().st_mtime if axis is not None and axis.is_file() else None
        key = (traits, layer, method, summary, str(axis), stamp)
        if key not in self._bases:
            self._bases[key] = load_basis(
                self.cfg.steering.trait_vector_dir,
                self.slug,
                list(traits),
                layer,
                method,
                summary,
                fingerprint=self.fingerprint,
                axis_file=axis,
            )
        return self._bases[key]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
