"""Judges: the interface, the shared error type, and ``build_judge`` that picks a backend from config.

Backends live in their own modules and are imported only when built, so importing this package does
not pull in torch, transformers or the openai SDK.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from persona_steering.judges.base import Judge, JudgeError, Query, Verdict

if TYPE_CHECKING:
    from persona_steering.config import JudgeConfig
    from persona_steering.runtime import Runtime

__all__ = ["Judge", "JudgeError", "Query", "Verdict", "build_judge", "judge_versions"]


def judge_versions() -> dict[str, int | str]:
    """The versions of every judge's prompts and algorithms: a change invalidates runs that used them.

    Reads constants only; imports no backend (they pull in torch, transformers or the SDK).
    """
    from persona_steering.judges.base import TEMPLATE_VERSION

    return {"templates": TEMPLATE_VERSION, "offline": OFFLINE_VERSION, "embedding": EMBEDDING_VERSION}


OFFLINE_VERSION = 6
"""Bump when the offline judge's algorithm changes (``judges/offline.py``)."""
EMBEDDING_VERSION = 5
"""Bump when the centroid judge's algorithm changes (``judges/embedding.py``)."""


def build_judge(cfg: JudgeConfig, runtime: Runtime | None = None, cache_dir: str | Path = "cache") -> Judge:
    """The judge that ``cfg.backend`` names.

    Args:
        cfg: the judge section of the config.
        runtime: the already loaded policy model. The local judge reuses it when ``cfg.model`` is
            'same' or names the same model, instead of loading a second copy.
        cache_dir: where ``load_runtime`` keeps dequantised models, for a local judge that needs
            its own model.

    Returns:
        A ``Judge`` ready to call.
    """
    if cfg.backend == "offline":
        from persona_steering.judges.offline import OfflineJudge

        if runtime is None:
            raise JudgeError("the offline judge scores fluency with the policy model, but none was loaded")
        return OfflineJudge(runtime)
    if cfg.backend == "embedding":
        from persona_steering.judges.embedding import EmbeddingJudge

        return EmbeddingJudge()
    if cfg.backend == "openai":
        from persona_steering.judges.openai import OpenAIJudge

        return OpenAIJudge(cfg)
    if cfg.backend == "local":
        from persona_steering.judges.local import LocalJudge

        return LocalJudge(_judge_runtime(cfg, runtime, cache_dir))
    raise JudgeError(f"judge.backend must be offline, embedding, openai or local, got {cfg.backend!r}")


def _judge_runtime(cfg: JudgeConfig, runtime: Runtime | None, cache_dir: str | Path) -> Runtime:
    """The given runtime when the judge model is the policy model, else a freshly loaded one."""
    from persona_steering.config import ModelConfig
    from persona_steering.runtime import EMBEDDED, EMBEDDED_ID, load_runtime

    if runtime is not None:
        same = {"same", runtime.model_id}
        if runtime.model_id == EMBEDDED_ID:
            same.add(EMBEDDED)
        if cfg.model in same:
            return runtime
    elif cfg.model == "same":
        raise JudgeError("judge.model=same needs the policy model, but no runtime was given")
    return load_runtime(ModelConfig(name=cfg.model), cache_dir)
