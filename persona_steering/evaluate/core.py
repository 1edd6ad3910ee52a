"""The interface every evaluation method implements, the context it receives, and the registry.

A method turns held-out prompts into a ``Plan``: one request and one steering vector per prompt.
The evaluation stage concatenates the plans of all methods into one batched generate call per
answer setting (greedy, then each sample seed), so a method never generates its own held-out
answers (it may generate elsewhere, as random search and grid do on the training prompts). To add
a method, add a module to ``persona_steering/evaluate/methods/`` that defines
``METHODS = [Method(...)]``; it is found by
``registry()`` without touching any other file.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from persona_steering.basis import TraitBasis
from persona_steering.cache import Cache
from persona_steering.config import Config
from persona_steering.generation import Request
from persona_steering.judges import Judge
from persona_steering.record import PersonaRecord
from persona_steering.runtime import Runtime
from persona_steering.traits import Persona


class MethodSkipped(Exception):
    """A method cannot run in this setting (e.g. no optimisation result); the message says why.

    The evaluation records it as a note and goes on with the other methods.
    """


@dataclass(frozen=True)
class Plan:
    """What a method asks the model for: ``requests[i]`` steered by ``deltas[i]`` at the basis layer."""

    requests: list[Request]
    deltas: torch.Tensor  # [len(requests), hidden]; a zero row is unsteered
    info: dict[str, Any] = field(default_factory=dict)  # JSON-safe details for the report

    def __post_init__(self) -> None:
        if self.deltas.ndim != 2 or self.deltas.shape[0] != len(self.requests):
            raise ValueError(
                f"plan has {len(self.requests)} requests but deltas of shape {tuple(self.deltas.shape)}"
            )


@dataclass
class Context:
    """Everything a method may use. Built once per evaluation; methods must not mutate it.

    ``cfg`` is the effective configuration: steering layer, alpha, traits and search settings
    come from the optimisation result when there is one, so every method steers where the
    proposed weights were found.
    """

    cfg: Config
    rt: Runtime
    cache: Cache
    basis: TraitBasis
    persona: Persona
    judge: Judge  # the first configured judge: random_search and grid optimise what the optimiser did
    train_prompts: list[str]  # the optimiser's training prompts (first optimize.num_prompts)
    result: PersonaRecord | None  # the optimisation result, None when absent
    log: Callable[[str], None] = print
    memo: dict[str, Any] = field(default_factory=dict)  # shared work between methods (persona contrast)

    def zeros(self, n: int) -> torch.Tensor:
        """[n, hidden] zeros: n unsteered rows."""
        return torch.zeros(n, self.rt.hidden_size)

    def proposed_weights(self) -> torch.Tensor | None:
        """The CMA-ES best weights in basis order, [k]; None without an optimisation result."""
        if self.result is None:
            return None
        return self.result.weights(self.basis.traits)

    def weight_deltas(self, weights: torch.Tensor, n: int) -> torch.Tensor:
        """The steering vector of trait weights [k], repeated for n rows: [n, hidden]."""
        return self.basis.deltas(weights, self.cfg.steering.alpha).repeat(n, 1)


@dataclass(frozen=True)
class Method:
    """A named way of answering the held-out prompts."""

    name: str
    description: str
    plan: Callable[[Context, list[str]], Plan]
    needs_optimization: bool = False  # needs <persona>_optimization.json (skipped without it)
    order: int = 100  # position in tables; registered methods without one come last, by name


def registry() -> dict[str, Method]:
    """Every method defined by a module in ``evaluate/methods``, in table order."""
    from persona_steering.evaluate import methods as package

    found: dict[str, Method] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for method in getattr(module, "METHODS", ()):
            if method.name in found:
                raise ValueError(f"evaluation method {method.name!r} is defined twice (in {info.name})")
            found[method.name] = method
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinity replaced by None: JSON has no NaN, and none is made up."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
