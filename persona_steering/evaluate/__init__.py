"""Evaluation against baselines (``run_evaluate``), grid sweeps of one trait vector (``run_sweep``)
and cosine similarity between vectors (``run_similarity``).

Methods live in ``evaluate/methods/`` behind one interface (``core.Method``); statistics in
``evaluate/stats.py``. Stage modules are imported lazily by the CLI, so importing this package
stays cheap.
"""

from persona_steering.evaluate.core import Context, Method, MethodSkipped, Plan, registry

__all__ = ["Context", "Method", "MethodSkipped", "Plan", "registry"]
