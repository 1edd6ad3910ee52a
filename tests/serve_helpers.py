"""What the server tests share (test_serve, test_serve_page): scratch personas, the config, and a
served app on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

from persona_steering.config import load_config

TRAITS = ["T1", "T2"]
PERSONAS = {
    "grandpa": {"T1": 1.0, "T2": -0.5},
    "pirate": {"T1": -1.0, "T2": 1.0},
    "calm": {"T1": 0.3, "T2": 0.8},
}


def write_persona(save_dir: Path, persona_id: str, weights: dict[str, float], layer: int = 2) -> Path:
    """A persona record as ``optimize`` writes it (the fields the server reads)."""
    save_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "persona_id": persona_id,
        "traits": TRAITS,
        "selected": "mean",
        "weights": weights,
        "num_evaluations": 8,
        "layer": layer,
        "alpha": 2.0,
        "judge": "embedding",
        "score": 0.42,
        "parts": {"style": 0.5, "relevance": 0.3},
    }
    path = save_dir / f"{persona_id}_optimization.json"
    path.write_text(json.dumps(data))
    return path


class Server:
    """The app of ``build_app`` under uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, cfg, rt, api_key: str | None) -> None:
        from persona_steering.serve import build_app, serving

        self.app = build_app(cfg, rt, api_key)
        self._serving = serving(self.app)

    def __enter__(self) -> Server:
        self.url = self._serving.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._serving.__exit__(*exc)

    @property
    def scheduler(self):
        return self.app.state.scheduler


def serve_config(root: Path, model_dir: Path, *extra: str):
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            "model.accelerator=cpu",
            f"cache_dir={root / 'cache'}",
            "traits=[T1, T2]",
            f"steering.trait_vector_dir={root / 'vectors'}",
            "steering.layer=2",
            "steering.alpha=2.0",
            f"optimize.save_dir={root / 'runs'}",
            "serve.max_tokens=12",
            *extra,
        ],
    )
