"""Helpers shared by tests (importable because pytest puts tests/ on sys.path); fixtures live in conftest.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from persona_steering.config import load_config
from persona_steering.extraction import run_vectors
from persona_steering.fake_openai import FakeOpenAI
from persona_steering.store import save_vectors

JUDGE_KEY_ENV = "PS_TEST_JUDGE_KEY"
JUDGE_KEY = "sk-test-DO-NOT-LEAK-2b9e41c7d05a3f68"


def judge_score(request: dict) -> str:
    """A test server's judge that always says the same digit (1-5) for the same prompt."""
    prompt = request["messages"][0]["content"]
    return str(1 + hashlib.sha256(prompt.encode()).digest()[0] % 5)


HELDOUT = ["how are you today ?", "what should we eat for dinner ?", "tell me about your family"]
SAMPLES = ["i love my weekend with family", "i remember a trip once", "the food was good", "thanks friend"]


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


def write_trait(folder: Path, name: str, pos: str, neg: str, questions: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "name": name,
        "title": name,
        "description": "test trait",
        "pos_label": "p",
        "neg_label": "n",
        "instruction": [{"pos": pos, "neg": neg}, {"pos": pos + " !", "neg": neg + " ."}],
        "questions": {"extract": questions, "eval": questions[:1]},
        "eval_prompt": "score {question} {answer} 0 to 100",
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def write_fake_vectors(
    folder: Path, fingerprint: str, model_id: str, traits: list[str], seed: int = 3
) -> None:
    """Random vector files for the tiny model (3 layers, hidden 32), as ``run_vectors`` would lay them out."""
    g = torch.Generator().manual_seed(seed)
    meta = {"fingerprint": fingerprint, "model_id": model_id, "num_layers": 3, "hidden_size": 32}
    for trait in traits:
        tensors = {
            "mean_diff.response_avg": torch.randn(4, 32, generator=g),  # [L+1, hidden]
            "norm.response_avg": 5 + torch.rand(4, generator=g),  # [L+1]
        }
        save_vectors(folder / f"{trait}.safetensors", tensors, meta)


def build_project(
    root: Path,
    tiny_model_dir: Path,
    samples: Sequence[str] = SAMPLES,
    heldout: Sequence[str] = HELDOUT,
) -> list[str]:
    """Two traits with vectors, a persona, train and held-out prompts; returns config overrides."""
    traits = root / "traits"
    write_trait(
        traits,
        "T1",
        "be formal and warm",
        "be casual and cold",
        ["how was your weekend ?", "what should i cook ?"],
    )
    write_trait(traits, "T2", "talk about me", "talk about you", ["hello !", "how was work today ?"])
    persona = root / "personas" / "p1"
    persona.mkdir(parents=True)
    (persona / "persona_profile.txt").write_text("A warm friend who tells stories about the weekend.")
    (persona / "persona_samples.json").write_text(json.dumps(list(samples)))
    prompts = root / "prompts.yaml"
    train = ["how was your day ?", "what should i cook ?", "tell me about a trip"]
    prompts.write_text(yaml.safe_dump({"train": train, "heldout": list(heldout)}))
    overrides = [
        f"model.name={tiny_model_dir}",
        "model.accelerator=cpu",
        "judge.backend=embedding",  # mechanics on a 4-sample persona; the offline judge has its own tests
        "evaluate.judges=[embedding]",
        f"cache_dir={root / 'cache'}",
        f"vectors.trait_dir={traits}",
        f"vectors.out_dir={root / 'vectors'}",
        "vectors.traits=[T1, T2]",
        "traits=[T1, T2]",
        f"steering.trait_vector_dir={root / 'vectors'}",
        "steering.layer=2",
        "steering.alpha=2.0",
        "steering.persona_axis=false",  # mechanics on the traits; the persona axis (default) has its own tests
        "generation.max_new_tokens=6",
        f"optimize.persona_dir={root / 'personas'}",
        f"optimize.prompts_file={prompts}",
        "optimize.persona_id=p1",
        "optimize.num_prompts=2",
        f"optimize.save_dir={root / 'runs'}",
        f"sweep.out_dir={root / 'sweep'}",
        f"similarity.out_dir={root / 'similarity'}",
        "evaluate.bootstrap=500",
    ]
    run_vectors(load_config(None, overrides), log=lambda *_: None)
    return overrides


RUN_KEYS = (
    "weights",
    "score",
    "best_weights",
    "best_score",
    "optimization_history",
    "mean_weights",
    "history",
    "config_digest",
)
"""What two optimisation results must share to be the same run (where it was saved may differ)."""


def assert_same_run(a: dict, b: dict, label: object = "") -> None:
    """Two optimisation results are the same run: weights, scores, history and config digest."""
    for key in RUN_KEYS:
        assert a[key] == b[key], (label, key) if label else key


PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def isolated_server(monkeypatch: Any, tmp_path: Any, key_env: str, key: str) -> Iterator[FakeOpenAI]:
    """A fresh fake server for one test: the key in the environment, no proxy, a cwd without a .env.

    Use as a pytest fixture body: ``yield from isolated_server(monkeypatch, tmp_path, ENV, KEY)``.
    """
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv(key_env, key)
    monkeypatch.chdir(tmp_path)
    with FakeOpenAI() as srv:
        yield srv


def judge_threads(monkeypatch: Any) -> list[str]:
    """The names of the threads the embedding judge computes verdicts on, appended as it does."""
    import threading

    from persona_steering.judges.embedding import EmbeddingJudge

    threads: list[str] = []
    real = EmbeddingJudge._judge

    def spy(self: EmbeddingJudge, queries: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(self, queries)

    monkeypatch.setattr(EmbeddingJudge, "_judge", spy)
    return threads
