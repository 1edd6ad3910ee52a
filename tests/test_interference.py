"""The interference stage: the grid, the analysis on planted effects, the pole classifiers, end to end."""

import itertools
import json

import numpy as np
import pytest
import yaml
from tests_helpers import write_trait

from persona_steering.config import ConfigError, load_config
from persona_steering.interference import analyse, grid, run_interference
from persona_steering.interference_report import mean_additivity, mean_leakage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_grid_has_every_single_strength_and_every_pair_sign():
    cells = grid(4, [-1.0, -0.5, 0.5, 1.0], 0.5)
    assert len(cells) == 4 * 4 + 6 * 4 and len(set(cells)) == len(cells)
    singles = [c for c in cells if sum(w != 0 for w in c) == 1]
    pairs = [c for c in cells if sum(w != 0 for w in c) == 2]
    assert len(singles) == 16 and {abs(w) for c in pairs for w in c if w} == {0.5}
    assert {(c.index(next(w for w in c if w)),) for c in singles} == {(0,), (1,), (2,), (3,)}


def _planted(m: np.ndarray, singles: list[float], interaction: dict | None = None) -> dict:
    """Effects of every cell = w @ m, plus an optional product term for one pair of traits."""
    cells = grid(len(m), singles, 0.5)
    effects = {}
    for c in cells:
        w = np.array(c)
        e = w @ m
        for (i, j), vec in (interaction or {}).items():
            e = e + w[i] * w[j] * np.array(vec)
        effects[c] = e
    return {"effects": effects, "cells": cells}


def test_analysis_recovers_a_planted_linear_additive_basis():
    rng = np.random.default_rng(0)
    m = np.eye(3) * np.array([10.0, 5.0, 20.0]) + rng.normal(0, 2, (3, 3))
    singles = [-1.0, -0.5, 0.5, 1.0]
    p = _planted(m, singles)
    out = analyse(p["effects"], singles, [0.0] * len(p["cells"]), p["cells"], 0.0)
    np.testing.assert_allclose(out["slopes"], m, atol=1e-9)
    np.testing.assert_allclose(out["leakage"], m / np.diag(m)[:, None], atol=1e-9)
    np.testing.assert_allclose(np.diag(out["leakage"]), 1.0)
    assert all(e["r2"] == pytest.approx(1.0) for e in out["linearity"])
    assert all(e["saturates_at"] == {"positive": None, "negative": None} for e in out["linearity"])
    assert len(out["additivity"]) == 3
    for a in out["additivity"]:
        assert a["r2"] == pytest.approx(1.0) and a["interaction"] == pytest.approx(0.0, abs=1e-9)
    assert mean_leakage(out["leakage"]) == pytest.approx(np.abs(out["leakage"] - np.eye(3)).sum() / 6)
    assert out["additivity_overall"] == pytest.approx({"r2": 1.0, "slope": 1.0})
    # A pair doing half of what its parts do: pooled slope 0.5.
    for c in p["cells"]:
        if sum(w != 0 for w in c) == 2:
            p["effects"][c] = 0.5 * p["effects"][c]
    half = analyse(p["effects"], singles, [0.0] * len(p["cells"]), p["cells"], 0.0)["additivity_overall"]
    assert half["slope"] == pytest.approx(0.5) and half["r2"] < 1.0


def test_analysis_finds_a_planted_interaction_saturation_and_loops():
    m = np.eye(3) * 10.0
    singles = [-2.0, -1.0, -0.5, 0.5, 1.0, 2.0]
    p = _planted(m, singles, interaction={(0, 1): [40.0, 40.0, 0.0]})
    effects = p["effects"]
    # Trait 2 saturates: beyond |1| its effect no longer grows.
    for s in (2.0, -2.0):
        effects[tuple(s if t == 2 else 0.0 for t in range(3))] = np.array([0.0, 0.0, 10.0 * np.sign(s)])
    loop = [1.0 if c == (2.0, 0.0, 0.0) else 0.0 for c in p["cells"]]
    out = analyse(effects, singles, loop, p["cells"], 0.0)
    add = {tuple(a["pair"]): a for a in out["additivity"]}
    assert add[(0, 1)]["r2"] < 0.9 and add[(0, 2)]["r2"] == pytest.approx(1.0)
    # Product term 40 * (+-0.5)^2 over the sign combinations: +10 when signs agree, -10 otherwise.
    assert add[(0, 1)]["interaction"] == pytest.approx(0.0, abs=1e-9)
    assert add[(0, 1)]["residual_rms"] == pytest.approx(np.sqrt(2 * 100 / 3))
    assert out["linearity"][2]["saturates_at"] == {"positive": 2.0, "negative": -2.0}
    assert out["linearity"][2]["r2"] < out["linearity"][0]["r2"] == pytest.approx(1.0)
    assert out["linearity"][0]["breaks_at"] == {"positive": 2.0, "negative": None}
    assert mean_additivity(out["additivity"]) < 1.0


def test_bad_options_are_refused_by_name():
    for bad, message in [
        ("interference.strengths=[0, 1]", "interference.strengths"),
        ("interference.bases=[gram]", "interference.bases"),
        ("interference.pair_strength=0", "interference.pair_strength"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])


@pytest.fixture()
def three_traits(tmp_path, tiny_model_dir):
    """Three traits with 4 extraction questions each (8 answers per pole), vectors, held-out prompts."""
    from persona_steering.extraction import run_vectors

    traits = tmp_path / "traits"
    questions = ["how was your weekend ?", "what should i cook ?", "hello !", "how was work today ?"]
    write_trait(traits, "T1", "be formal and warm", "be casual and cold", questions)
    write_trait(traits, "T2", "talk about me", "talk about you", questions[::-1])
    write_trait(traits, "T3", "tell a story", "be brief", questions[1:] + questions[:1])
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"train": ["hi"], "heldout": ["tell me about your family"]}))
    overrides = [
        f"model.name={tiny_model_dir}",
        "model.accelerator=cpu",
        "judge.backend=embedding",
        f"cache_dir={tmp_path / 'cache'}",
        f"vectors.trait_dir={traits}",
        f"vectors.out_dir={tmp_path / 'vectors'}",
        "vectors.traits=[T1, T2, T3]",
        "traits=[T1, T2, T3]",
        f"steering.trait_vector_dir={tmp_path / 'vectors'}",
        "steering.layer=2",
        "generation.max_new_tokens=6",
        f"optimize.prompts_file={prompts}",
        "interference.num_questions=1",
        "interference.num_prompts=1",
        "interference.strengths=[-1, 1]",
        f"interference.out_dir={tmp_path / 'interference'}",
    ]
    run_vectors(load_config(None, overrides), log=lambda *_: None)
    return tmp_path, overrides


def test_interference_end_to_end_then_warm_rerun_does_no_model_work(three_traits, monkeypatch):
    tmp_path, overrides = three_traits
    data = run_interference(load_config(None, overrides), log=lambda *_: None)
    folder = next((tmp_path / "interference").iterdir())
    for name in ("leakage.png", "leakage_cosine.png", "additivity.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((folder / "interference.json").read_text()) == data
    md = (folder / "interference.md").read_text()
    assert "scorer classifier" in md and "scorer projection" in md and "Basis orthogonal" in md
    assert set(data["bases"]) == {"traits", "orthogonal"}
    assert set(data["scorers"]) == {"classifier", "projection"}  # no LLM judge with the embedding backend
    assert data["strengths"] == [-1.0, -0.5, 0.5, 1.0]  # +-pair_strength joined the singles
    # 3 traits: 3 x 4 single cells and 3 pairs x 4 sign combinations per basis.
    assert len(data["bases"]["traits"]["answers"]) == 12 + 12
    for report in data["classifier_report"].values():
        assert 0 <= report["accuracy"] <= 1 and report["pos"] == report["neg"] == 8
    ortho = np.array(data["bases"]["orthogonal"]["cosines"])
    plain = np.array(data["bases"]["traits"]["cosines"])
    np.testing.assert_allclose(np.diag(plain), 1.0, atol=1e-5)  # an axis is its own trait there
    assert not np.allclose(ortho, plain)
    for basis in data["bases"].values():
        for s in basis["scorers"].values():
            leak = np.array(s["leakage"], dtype=float)
            finite = np.isfinite(np.diag(leak))
            np.testing.assert_allclose(np.diag(leak)[finite], 1.0)
            assert len(s["additivity"]) == 3 and len(s["linearity"]) == 3

    def no_model(*a, **k):
        raise AssertionError("a warm re-run must do no model work")

    monkeypatch.setattr("persona_steering.generation._generate_batch", no_model)
    monkeypatch.setattr("persona_steering.evaluate.sweep.record_activations", no_model)
    monkeypatch.setattr("persona_steering.trait_scorer.Embedder", no_model)
    again = run_interference(load_config(None, overrides), log=lambda *_: None)
    assert again == data


def test_a_killed_run_resumes_only_the_missing_cells(three_traits, monkeypatch):
    from persona_steering import generation

    tmp_path, overrides = three_traits
    cfg = load_config(None, overrides + ["interference.bases=[traits]", "generation.max_batch=4"])
    real = generation._generate_batch
    calls = itertools.count()

    def dies_after_two(*a, **k):
        if next(calls) >= 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr("persona_steering.generation._generate_batch", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_interference(cfg, log=lambda *_: None)
    rows: list[int] = []

    def counting(rt, texts, *a, **k):
        rows.append(len(texts))
        return real(rt, texts, *a, **k)

    monkeypatch.setattr("persona_steering.generation._generate_batch", counting)
    data = run_interference(cfg, log=lambda *_: None)
    # Before the kill: the unsteered rows, then one block of 4 of the 24 cells x 4 prompts.
    assert len(data["prompts"]) == 4 and len(data["bases"]["traits"]["answers"]) == 24
    assert sum(rows) == 24 * 4 - 4


def test_pole_classifier_learns_planted_poles_reports_accuracy_and_caches(tmp_path, monkeypatch):
    from persona_steering.cache import Cache
    from persona_steering.extraction import Pair
    from persona_steering.trait_scorer import fit_trait_scorer
    from persona_steering.traits import Trait

    formal = [f"Good evening. I would be delighted to assist you with item number {i}." for i in range(10)]
    casual = [f"hey dude lol yeah gonna grab stuff {i} totally awesome!!" for i in range(10)]
    pairs = ([Pair("q", "", t, "", (1,)) for t in formal], [Pair("q", "", t, "", (1,)) for t in casual])
    monkeypatch.setattr("persona_steering.trait_scorer.trait_answers", lambda *a: {"F": pairs})
    trait = Trait("F", "F", "", "formal", "casual", [], [], [], "")
    with Cache(tmp_path / "cache") as cache:
        scorer = fit_trait_scorer(None, load_config(None, []), [trait], cache)  # type: ignore[arg-type]
        report = scorer.report()["F"]
        assert report["accuracy"] == 1.0 and report["auc"] == 1.0 and report["pos"] == 10
        high, low = scorer.score(
            ["I would be honoured to discuss this matter.", "yeah lol gonna chill dude"], cache
        )
        assert high[0] > 50 > low[0]
        monkeypatch.setattr("persona_steering.trait_scorer.Embedder", lambda: 1 / 0)
        again = fit_trait_scorer(None, load_config(None, []), [trait], cache)  # type: ignore[arg-type]
        assert again.report() == scorer.report()
        assert again.score(["yeah lol gonna chill dude"], cache) == [low]


def test_projections_many_equals_one_direction_at_a_time_in_one_forward(tiny_rt, tmp_path, monkeypatch):
    import torch

    from persona_steering.cache import Cache
    from persona_steering.config import GenerationConfig
    from persona_steering.evaluate import sweep
    from persona_steering.generation import Request, generate

    gen = GenerationConfig(max_new_tokens=4)
    answers = generate(tiny_rt, [Request("hello !"), Request("how was work today ?")], gen)
    directions = torch.nn.functional.normalize(
        torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    calls = []
    real = sweep.record_activations
    monkeypatch.setattr(sweep, "record_activations", lambda *a, **k: calls.append(1) or real(*a, **k))
    with Cache(tmp_path / "a") as cache:
        many = sweep.projections_many(tiny_rt, cache, answers, 2, directions)
        assert len(calls) == 1 and sweep.projections_many(tiny_rt, cache, answers, 2, directions) == many
        assert len(calls) == 1  # all cached
    with Cache(tmp_path / "b") as cache:
        one = [sweep.projections(tiny_rt, cache, answers, 2, d) for d in directions]
    for a, b in zip(many, one, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
