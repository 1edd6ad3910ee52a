"""The damage stage: KL maths, the budget rule, the stage end to end, and optimize's norm penalty."""

import json

import numpy as np
import pytest
import torch

from persona_steering.basis import TraitBasis
from persona_steering.config import ConfigError, load_config
from persona_steering.damage import kl_divergence, max_norm, run_damage
from persona_steering.optimize import Objective, Scored, _run_digest
from persona_steering.traits import load_persona

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_kl_matches_a_reference_and_is_zero_for_equal_distributions():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 7, generator=g).log_softmax(-1)
    b = torch.randn(2, 5, 7, generator=g).log_softmax(-1)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=a), torch.distributions.Categorical(logits=b)
    ).mean(-1)  # [2]
    torch.testing.assert_close(kl_divergence(a, b), ref)
    torch.testing.assert_close(kl_divergence(a, a), torch.zeros(2), atol=1e-6, rtol=0)


def test_budget_is_the_largest_norm_whose_prefix_stays_within_both_limits():
    curve = [
        {"norm": 0.25, "kl": 0.1, "loop_rate": 0.0},
        {"norm": 0.5, "kl": 0.3, "loop_rate": 0.0},
        {"norm": 1.0, "kl": 0.4, "loop_rate": 0.5},  # loops
        {"norm": 2.0, "kl": 0.45, "loop_rate": 0.0},  # back within, but beyond a broken norm
    ]
    assert max_norm(curve, 0.5, 0.05) == 0.5
    assert max_norm(curve, 0.5, 1.0) == 2.0
    assert max_norm(curve, 0.2, 1.0) == 0.25
    assert max_norm(curve, 0.05, 1.0) is None


def test_damage_end_to_end_grows_with_norm_and_rerun_does_no_model_work(project, monkeypatch):
    tmp_path, overrides = project
    overrides = overrides + [
        "damage.layers=[1, 2]",
        "damage.norms=[0.0001, 0.5, 4]",
        "damage.num_prompts=1",
        f"damage.out_dir={tmp_path / 'damage'}",
    ]
    data = run_damage(load_config(None, overrides), log=lambda *_: None)
    folder = next((tmp_path / "damage").iterdir())
    assert json.loads((folder / "damage.json").read_text()) == data
    assert (folder / "damage.png").read_bytes()[:4] == b"\x89PNG"
    assert "Largest norm within it" in (folder / "damage.md").read_text()
    assert set(data["layers"]) == {"1", "2"}
    for entry in data["layers"].values():
        kls = [p["kl"] for p in entry["curve"]]
        assert [p["norm"] for p in entry["curve"]] == [0.0001, 0.5, 4.0]
        assert kls[0] < 1e-4 and kls[0] < kls[1] < kls[2]
        assert entry["curve"][0]["perplexity"] == pytest.approx(data["unsteered"]["perplexity"], rel=1e-3)
        expected = max_norm(entry["curve"], data["budget"]["max_kl"], data["budget"]["max_loop_rate"])
        assert entry["max_norm"] == expected and entry["max_norm"] is not None

    def no_model(*a, **k):
        raise AssertionError("a warm re-run must do no steered model work")

    monkeypatch.setattr("persona_steering.generation._generate_batch", no_model)
    monkeypatch.setattr("persona_steering.damage.steer", no_model)
    assert run_damage(load_config(None, overrides), log=lambda *_: None) == data


def _objective(max_norm_: float | None, alpha: float = 0.5) -> Objective:
    sets = [f"steering.alpha={alpha}", f"optimize.max_norm={max_norm_ if max_norm_ else 'null'}"]
    cfg = load_config(None, sets + ["optimize.norm_penalty=2"])
    basis = TraitBasis(["A", "B"], 1, torch.eye(2, 4), 3.0, "mean_diff", "response_avg", "f", 2)
    return Objective(None, cfg, basis, None, [], None, None)  # type: ignore[arg-type]


def test_norm_penalty_only_beyond_the_budget():
    weights = np.array([[0.6, 0.8], [3.0, 4.0]])  # alpha * |w| = 0.5 and 2.5 (orthonormal directions)
    scored = [Scored(3.0, None, 1, 1, -3.0), Scored(4.0, None, 1, 1, -4.0)]
    assert _objective(None).within_budget(scored, weights) == scored
    out = _objective(1.0).within_budget(scored, weights)
    assert out[0] == scored[0]
    assert out[1].objective == pytest.approx(-4.0 + 2 * (2.5 - 1.0)) and out[1].fit == 4.0
    with pytest.raises(ConfigError, match="optimize.max_norm"):
        load_config(None, ["optimize.max_norm=0"])


def test_budget_options_reach_the_run_digest_only_when_on(project):
    from persona_steering.basis import configured_basis
    from persona_steering.runtime import identify

    tmp_path, overrides = project
    ident = identify(load_config(None, overrides).model)

    def run_digest(extra: list[str]) -> str:
        cfg = load_config(None, overrides + extra)
        basis = configured_basis(cfg.steering, cfg.traits, ident.slug, ident.fingerprint)
        return _run_digest(
            cfg, load_persona(cfg.optimize.persona_dir, "p1"), ["hi"], basis, ident.fingerprint
        )

    off = run_digest(["optimize.max_norm=null"])
    assert run_digest(["optimize.max_norm=null", "optimize.norm_penalty=3"]) == off  # no budget: no effect
    on = run_digest(["optimize.max_norm=0.5"])
    assert on != off and run_digest(["optimize.max_norm=0.5", "optimize.norm_penalty=3"]) != on
