"""What one ``persona-steering bench`` run measures: sizes, repeats, threads, output folder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from persona_steering.config import BenchConfig, Config

DEFAULTS = {"population": 8, "num_prompts": 10, "max_new_tokens": 48}
"""P, N and M of a run where ``bench.*`` leaves them None."""
QUICK = {"population": 4, "num_prompts": 4, "max_new_tokens": 16}
"""P, N and M under ``bench.quick`` (--quick) where not given: about 2 minutes on a CPU."""


@dataclass(frozen=True)
class BenchSettings:
    """What one benchmark run measures: ``cfg.bench`` with P, N and M resolved (quick or default).

    Every other option (repeats, out_dir, personas, verdicts, judge_delay, threads, stages) is read
    from ``settings.bench`` as it is: one owner, ``config.BenchConfig``.
    """

    population: int
    """P: candidate weight vectors (one CMA-ES generation)."""
    num_prompts: int
    """N: first training prompts answered by every candidate."""
    max_new_tokens: int
    """M: new tokens per answer (greedy)."""
    bench: BenchConfig

    def as_dict(self) -> dict[str, Any]:
        """Every option, flat, with P, N and M resolved (what the result records)."""
        sizes = {"population": self.population, "num_prompts": self.num_prompts}
        return dataclasses.asdict(self.bench) | sizes | {"max_new_tokens": self.max_new_tokens}

    @classmethod
    def from_config(cls, cfg: Config) -> BenchSettings:
        """``cfg.bench``: the defaults (or the quick ones) where P, N or M is None."""
        b = cfg.bench
        base = QUICK if b.quick else DEFAULTS
        return cls(
            population=b.population or base["population"],
            num_prompts=b.num_prompts or base["num_prompts"],
            max_new_tokens=b.max_new_tokens or base["max_new_tokens"],
            bench=b,
        )
