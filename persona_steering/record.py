"""An optimised persona: its files, its typed record, and the checks every reader shares.

``optimize`` writes the record (``save``); evaluate, export and the report start from ``load``.
File names built from a persona id live here alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from persona_steering.basis import TraitBasis
from persona_steering.cache import atomic_write_json
from persona_steering.config import SELECTIONS, ConfigError, check_persona_id
from persona_steering.store import VectorFileError

REQUIRED = ("persona_id", "num_evaluations", "layer", "alpha", "traits")
BEST_WEIGHTS_KEYS = (
    "persona_id",
    "layer",
    "alpha",
    "selected",
    "weights",
    "score",
    "best_weights",
    "best_score",
    "mean_weights",
    "mean_score",
    "config_digest",
)
"""What ``<id>_best_weights.json`` holds: the weights the run serves (``selected``: mean or best) with
their training fit, and both candidates it chose between."""
SCALE_RTOL = 1e-5
"""Relative difference of the residual scale above which the vectors count as changed."""


@dataclass(frozen=True)
class PersonaFiles:
    """Where a persona's results live under a save folder; the id is checked once, here."""

    save_dir: Path
    persona_id: str

    def __post_init__(self) -> None:
        check_persona_id(self.persona_id)
        object.__setattr__(self, "save_dir", Path(self.save_dir))

    def _file(self, suffix: str) -> Path:
        return self.save_dir / f"{self.persona_id}{suffix}"

    @property
    def result(self) -> Path:
        return self._file("_optimization.json")

    @property
    def best_weights(self) -> Path:
        return self._file("_best_weights.json")

    @property
    def axis(self) -> Path:
        """The persona axis 'P' of an optimisation with ``steering.persona_axis`` (safetensors)."""
        return self._file("_axis.safetensors")

    @property
    def checkpoint(self) -> Path:
        """The optimiser's JSON checkpoint (see ``checkpoint``)."""
        return self._file("_checkpoint.json")

    @property
    def legacy_checkpoint(self) -> Path:
        """The pickled checkpoint older versions wrote: recognised, never loaded."""
        return self._file("_checkpoint.pkl")

    @property
    def lock(self) -> Path:
        """Held by the ``optimize`` run writing this persona's files (``cache.exclusive_lock``)."""
        return self._file(".lock")

    @property
    def convergence(self) -> Path:
        return self._file("_convergence.png")

    def evaluation(self, ext: str) -> Path:
        """``<id>_evaluation.<ext>``: json, md or png."""
        return self._file(f"_evaluation.{ext}")

    def layers(self, ext: str) -> Path:
        """``<id>_layers.<ext>``: the per-layer summary of ``optimize --layers``."""
        return self._file(f"_layers.{ext}")

    def page(self, out_dir: str | Path) -> Path:
        """The HTML report's path in ``out_dir``."""
        return Path(out_dir) / f"{self.persona_id}.html"


@dataclass
class PersonaRecord:
    """The result of one optimisation: what was steered where, with which weights, and how it scored.

    ``data`` is the whole JSON as written (history, examples, parts, the full config); the typed
    fields are the ones readers act on, checked when loaded.
    """

    persona_id: str
    traits: list[str]
    selected_weights: dict[str, float]
    """The weights the run reports and serves (``optimize.select``); ``weights()`` orders them."""
    layer: int  # hidden_states row
    alpha: float
    num_evaluations: int
    vector_method: str | None = None
    positions: str | None = None
    summary: str | None = None
    basis: str | None = None  # steering.basis; None in results written before the option
    residual_scale: float | None = None
    fingerprint: str | None = None
    judge: str | None = None
    score: float | None = None
    """The training fit of ``selected_weights``."""
    selected: str = "best"
    """Which weights ``selected_weights`` are: mean or best (results written before the option: best)."""
    config_digest: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None  # the file it was read from
    files: PersonaFiles | None = None  # the persona's files, when loaded from a save folder

    @classmethod
    def from_dict(cls, data: Any, source: Path | None = None) -> PersonaRecord:
        """A checked record; ConfigError naming ``source`` and the field when ``data`` is not one."""
        where = str(source) if source is not None else "optimisation result"
        if not isinstance(data, dict):
            raise ConfigError(f"{where} is not an optimisation result: not a JSON object")
        missing = [k for k in REQUIRED if k not in data]
        # Results written before optimize.select hold only the best candidate, which they served.
        key = "weights" if "weights" in data else "best_weights"
        missing += [] if key in data else ["weights"]
        if missing:
            raise ConfigError(
                f"{where} is not an optimisation result: missing field {missing[0]!r} "
                "(was it written by `persona-steering optimize`?)"
            )
        traits, chosen = data["traits"], data[key]
        if not isinstance(traits, list) or not isinstance(chosen, dict):
            raise ConfigError(f"{where}: traits must be a list and {key} a mapping")
        absent = [t for t in traits if t not in chosen]
        if absent:
            raise ConfigError(f"{where}: {key} has no weight for trait {absent[0]}")
        extra = [t for t in chosen if t not in traits]
        if extra:
            raise ConfigError(f"{where}: {key} names {extra[0]}, which is not among traits {traits}")
        numbers = [data["layer"], data["alpha"], data["num_evaluations"], *chosen.values()]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            raise ConfigError(f"{where}: layer, alpha, num_evaluations and {key} must be numbers")
        selected = str(data.get("selected", "best"))
        if selected not in SELECTIONS:
            raise ConfigError(f"{where}: selected must be one of {', '.join(SELECTIONS)}, got {selected!r}")
        steering = (data.get("config") or {}).get("steering") or {}
        return cls(
            persona_id=check_persona_id(str(data["persona_id"]), f"{where}: persona_id"),
            traits=[str(t) for t in traits],
            selected_weights={str(k): float(v) for k, v in chosen.items()},
            layer=int(data["layer"]),
            alpha=float(data["alpha"]),
            num_evaluations=int(data["num_evaluations"]),
            vector_method=_str(data.get("vector_method", steering.get("vector_method"))),
            positions=_str(steering.get("positions")),
            summary=_str(steering.get("summary")),
            basis=_str(steering.get("basis")),
            residual_scale=_float(data.get("residual_scale")),
            fingerprint=_str(data.get("fingerprint")),
            judge=_str(data.get("judge")),
            score=_float(data.get("score" if key == "weights" else "best_score")),
            selected=selected,
            config_digest=_str(data.get("config_digest")),
            data=data,
            source=source,
        )

    @classmethod
    def load(cls, files: PersonaFiles) -> PersonaRecord | None:
        """The persona's record, None when there is none; ConfigError when the file is not one."""
        path = files.result
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); rerun make optimize or delete it") from None
        record = cls.from_dict(data, path)
        if record.persona_id != files.persona_id:
            raise ConfigError(f"{path} holds persona {record.persona_id!r}, not {files.persona_id!r}")
        record.files = files
        return record

    @classmethod
    def require(cls, files: PersonaFiles) -> PersonaRecord:
        """``load``, with a missing result as a user error that says what to run."""
        record = cls.load(files)
        if record is None:
            raise ConfigError(
                f"no optimisation result at {files.result}: run `make optimize PERSONA={files.persona_id}` "
                "first (or pass --save-dir where it was written)"
            )
        return record

    def save(self, files: PersonaFiles) -> Path:
        """Write the result JSON and the short best-weights file; returns the result's path."""
        atomic_write_json(files.best_weights, {k: self.data[k] for k in BEST_WEIGHTS_KEYS if k in self.data})
        return atomic_write_json(files.result, self.data)

    def weights(self, traits: list[str]) -> torch.Tensor:
        """The served weights (``selected_weights``) in the order of ``traits``: [k]."""
        return torch.tensor([self.selected_weights[t] for t in traits])

    def check_basis(self, basis: TraitBasis) -> None:
        """Refuse a basis whose vectors or model differ from those this record was optimised with."""
        changed = []
        if self.fingerprint is not None and basis.fingerprint != self.fingerprint:
            changed.append(f"model fingerprint {basis.fingerprint[:12]}, was {self.fingerprint[:12]}")
        if self.residual_scale is not None and not math.isclose(
            basis.scale, self.residual_scale, rel_tol=SCALE_RTOL
        ):
            changed.append(f"residual scale {basis.scale:.6g}, was {self.residual_scale:.6g}")
        if changed:
            raise VectorFileError(
                f"the trait vectors or the model changed since {self.source or 'the optimisation'} was "
                f"written ({'; '.join(changed)}): re-run make optimize PERSONA={self.persona_id}"
            )


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
