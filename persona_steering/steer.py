"""The ``steer`` command: unsteered and steered answers for one weight setting, side by side."""

from __future__ import annotations

import torch

from persona_steering.basis import configured_basis, parse_weights
from persona_steering.cache import Cache
from persona_steering.config import Config
from persona_steering.generation import Request, generate
from persona_steering.rendering import render_examples
from persona_steering.runtime import Runtime, identify, load_runtime
from persona_steering.traits import load_prompts


def steered_examples(
    cfg: Config, weights: dict[str, float], prompts: list[str] | None = None, rt: Runtime | None = None
) -> list[dict[str, str]]:
    """Unsteered and steered answers for one weight setting (the ``steer`` command)."""
    parse_weights(",".join(f"{k}={v}" for k, v in weights.items()), cfg.traits)  # unknown names
    prompts = prompts or load_prompts(cfg.optimize.prompts_file, "train")[:3]
    ident = identify(cfg.model)
    basis = configured_basis(cfg.steering, cfg.traits, ident.slug, ident.fingerprint)
    rt = rt or load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
    w = torch.tensor([[weights.get(t, 0.0) for t in cfg.traits]])
    with Cache(cfg.cache_dir) as cache:
        base = generate(rt, [Request(p) for p in prompts], cfg.generation, cache=cache, seed=cfg.seed)
        steered = generate(
            rt,
            [Request(p) for p in prompts],
            cfg.generation,
            steering=basis.spec(w, cfg.steering.alpha, cfg.steering.positions).repeat(len(prompts)),
            cache=cache,
            seed=cfg.seed,
        )
    return [
        {"prompt": p, "baseline": b.text, "steered": s.text}
        for p, b, s in zip(prompts, base, steered, strict=True)
    ]


def run_steer(cfg: Config) -> str:
    """The ``steer`` command: the examples of ``steer.weights`` on ``steer.prompt``, rendered."""
    weights = parse_weights(cfg.steer.weights, cfg.traits)
    prompts = [cfg.steer.prompt] if cfg.steer.prompt else None
    return render_examples(steered_examples(cfg, weights, prompts))
