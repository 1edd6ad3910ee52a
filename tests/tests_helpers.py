"""Small helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def perturbed_copy(src: Path, dst: Path) -> Path:
    """A copy of a saved model folder whose weights differ slightly (so its fingerprint differs)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache"))
    weights = dst / "model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1e-3 * torch.ones_like(tensors[first])
    save_file(tensors, weights, metadata={"format": "pt"})
    return dst


def private_copy(root: Path, overrides: list[str], dst: Path) -> tuple[Path, list[str]]:
    """A copy of a built tiny project (cache included) and its overrides pointing into the copy,
    so tests sharing one module-scoped build cannot disturb each other."""
    shutil.copytree(root, dst)
    return dst, [o.replace(str(root), str(dst)) for o in overrides]
