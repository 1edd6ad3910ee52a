"""What one ``persona-steering bench`` run measures: sizes, repeats, threads, output folder."""

from __future__ import annotations

from dataclasses import dataclass

from persona_steering.config import Config, ConfigError

DEFAULTS = {"population": 8, "num_prompts": 10, "max_new_tokens": 48}
"""P, N and M of a run where ``bench.*`` leaves them None."""
QUICK = {"population": 4, "num_prompts": 4, "max_new_tokens": 16}
"""P, N and M under ``bench.quick`` (--quick) where not given: about 2 minutes on a CPU."""


@dataclass
class BenchSettings:
    """What one benchmark run measures: ``cfg.bench`` with the (quick) sizes resolved."""

    population: int = 8
    """P: candidate weight vectors (one CMA-ES generation)."""
    num_prompts: int = 10
    """N: first training prompts answered by every candidate."""
    max_new_tokens: int = 48
    """M: new tokens per answer (greedy)."""
    repeats: int = 1
    """Timed runs per method (median and spread); the seed-loop dominates the run time."""
    max_batch: int | None = None
    """Rows per forward pass; None = generation.max_batch of the config."""
    out_dir: str = "runs/bench"
    """Where bench.json, bench.md and bench.png go."""
    personas: int = 4
    """Personas for the lockstep measurement (one generate per persona vs one for all)."""
    verdicts: int = 100
    """Judge calls in the fan-out measurement."""
    judge_delay: float = 0.2
    """Seconds the local OpenAI-compatible server waits before each reply."""
    threads: int | None = None
    """torch CPU threads during the run; None = torch's default (one per core)."""
    stages: bool = True
    """Also time the vectors and optimize stages cold, with a warm cache, and fully warm."""

    def __post_init__(self) -> None:
        for name in ("population", "num_prompts", "max_new_tokens", "repeats", "verdicts", "personas"):
            if getattr(self, name) < 1:
                raise ConfigError(f"bench --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_batch", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"bench --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.judge_delay <= 10:
            raise ConfigError(f"bench --judge-delay must be within 0..10 seconds, got {self.judge_delay}")

    @classmethod
    def from_config(cls, cfg: Config) -> BenchSettings:
        """``cfg.bench``: the defaults (or the quick ones) where P, N or M is None."""
        b = cfg.bench
        base = QUICK if b.quick else DEFAULTS
        return cls(
            population=b.population or base["population"],
            num_prompts=b.num_prompts or base["num_prompts"],
            max_new_tokens=b.max_new_tokens or base["max_new_tokens"],
            repeats=b.repeats,
            out_dir=b.out_dir,
            personas=b.personas,
            verdicts=b.verdicts,
            judge_delay=b.judge_delay,
            threads=b.threads,
            stages=b.stages,
        )
