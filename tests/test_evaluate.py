"""Evaluation stage: statistics on synthetic data with known answers, the stage end to end on the
tiny model (embedding judge; embedding + OpenAI judge over a local fake server), warm re-runs,
invariances, skipped methods and bad input."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_extraction import write_trait
from tests_helpers import private_copy

from persona_steering.cache import Cache
from persona_steering.cli import main
from persona_steering.config import load_config
from persona_steering.evaluate import registry
from persona_steering.evaluate.stats import bootstrap_interval, ranks, sign_flip_test, spearman
from persona_steering.extraction import run_vectors

HELDOUT = ["how are you today ?", "what should we eat for dinner ?", "tell me about your family"]
ALL_METHODS = ["base", "prompt", "meandiff", "pca", "random_search", "proposed", "prompt+proposed"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- statistics on synthetic data -----------------------------------------------------------------


def test_constant_shift_is_significant_and_identical_samples_are_not():
    x = np.random.default_rng(0).normal(3.0, 1.0, size=20)
    shifted = sign_flip_test(x + 0.5, x)
    assert shifted.exact and shifted.n == 20
    assert shifted.diff == pytest.approx(0.5)
    assert shifted.p == pytest.approx(2 / 2**20)  # only the all-plus and all-minus patterns reach it
    same = sign_flip_test(x, x)
    assert same.p == 1.0 and same.diff == 0.0
    # Monte Carlo beyond the exact range: nothing reaches a constant shift but the +1 correction.
    y = np.random.default_rng(1).normal(size=40)
    mc = sign_flip_test(y + 1.0, y, permutations=5000, seed=3)
    assert not mc.exact and mc.p == pytest.approx(1 / 5001)


def test_exact_test_matches_brute_force_enumeration():
    rng = np.random.default_rng(2)
    for n in (1, 2, 5, 8, 11):
        a, b = rng.normal(size=n), rng.normal(size=n)
        b[0] = a[0]  # a zero difference among the pairs
        d = a - b
        observed = abs(d.mean())
        count = sum(abs(np.dot(s, d)) / n >= observed - 1e-12 for s in itertools.product([-1, 1], repeat=n))
        assert sign_flip_test(a, b).p == pytest.approx(count / 2**n), n


def test_null_rejection_rate_is_at_most_nominal():
    rng = np.random.default_rng(4)
    ps = [sign_flip_test(rng.normal(size=10), rng.normal(size=10)).p for _ in range(400)]
    rate = np.mean(np.array(ps) < 0.05)
    assert 0.01 < rate <= 0.08  # an exact test of size 5%, with sampling noise over 400 draws


def test_missing_values_are_dropped_pairwise_not_imputed():
    a = [1.0, None, 3.0, float("nan"), 5.0]
    b = [0.0, 2.0, None, 1.0, 4.0]
    test = sign_flip_test(a, b)
    assert test.n == 2 and test.diff == pytest.approx(1.0)  # pairs (1, 0) and (5, 4) only
    interval = bootstrap_interval(a, resamples=500)
    assert interval.n == 3 and interval.mean == pytest.approx(3.0)
    assert bootstrap_interval([None, float("nan")]) is None
    assert sign_flip_test([None], [1.0]) is None


def test_bootstrap_interval_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(5)
    hits = 0
    for seed in range(200):
        sample = rng.normal(3.0, 1.0, size=30)
        iv = bootstrap_interval(sample, resamples=1000, confidence=0.95, seed=seed)
        assert iv.low <= iv.mean <= iv.high
        hits += iv.low <= 3.0 <= iv.high
    assert 0.88 <= hits / 200 <= 0.99
    constant = bootstrap_interval([2.0] * 7)
    assert (constant.mean, constant.low, constant.high) == (2.0, 2.0, 2.0)
    again = bootstrap_interval(sample, resamples=1000, seed=199)
    assert again == iv  # seeded: reproducible to the last digit


def test_spearman_against_a_reference_with_ties():
    def reference(x, y):
        def rank(v):
            v = np.asarray(v, float)
            return np.array([1 + (v < e).sum() + 0.5 * ((v == e).sum() - 1) for e in v])

        return float(np.corrcoef(rank(x), rank(y))[0, 1])

    x = [1.0, 2.0, 2.0, 4.0, 5.0, 3.0]
    y = [2.0, 1.0, 3.0, 3.0, 6.0, 5.0]
    rho, n = spearman(x, y)
    assert n == 6 and rho == pytest.approx(reference(x, y))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45])[0] == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1])[0] == pytest.approx(-1.0)
    assert spearman([3, 3, 3], [1, 2, 3])[0] is None  # constant side: undefined, not 0
    assert spearman([1, 2, None, 4], [1, 2, 3, None]) == (None, 2)
    assert ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


# --- the stage on the tiny model ---------------------------------------------------------------------


def build_project(root: Path, tiny_model_dir: Path) -> list[str]:
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
    samples = [
        "i love my weekend with family",
        "i remember a trip once",
        "the food was good",
        "thanks friend",
    ]
    (persona / "persona_samples.json").write_text(json.dumps(samples))
    prompts = root / "prompts.yaml"
    train = ["how was your day ?", "what should i cook ?", "tell me about a trip"]
    prompts.write_text(yaml.safe_dump({"train": train, "heldout": HELDOUT}))
    overrides = [
        f"model.name={tiny_model_dir}",
        "model.accelerator=cpu",
        f"cache_dir={root / 'cache'}",
        f"vectors.trait_dir={traits}",
        f"vectors.out_dir={root / 'vectors'}",
        "vectors.traits=[T1, T2]",
        "traits=[T1, T2]",
        f"steering.trait_vector_dir={root / 'vectors'}",
        "steering.layer=2",
        "steering.alpha=2.0",
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


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("eval-project")
    return root, build_project(root, tiny_model_dir)


@pytest.fixture()
def project(built, tmp_path):
    """A private copy of the built project (its cache included), so tests cannot disturb each other."""
    root, overrides = built
    return private_copy(root, overrides, tmp_path / "p")


def write_result(root: Path, weights: dict[str, float], evaluations: int = 4) -> Path:
    """An optimisation result as optimize writes it (the fields evaluate reads)."""
    path = root / "runs" / "p1_optimization.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "persona_id": "p1",
        "layer": 2,
        "alpha": 2.0,
        "best_weights": weights,
        "best_score": 3.2,
        "num_iterations": 1,
        "num_evaluations": evaluations,
        "traits": list(weights),
        "judge": "embedding",
        "vector_method": "mean_diff",
    }
    path.write_text(json.dumps(result))
    return path


def cli(overrides: list[str], *extra: str) -> int:
    return main(["evaluate", *sum((["--set", o] for o in overrides), []), *extra])


def test_evaluate_end_to_end_then_warm_rerun_does_no_work(project, monkeypatch, capsys):
    root, overrides = project
    write_result(root, {"T1": 1.5, "T2": -0.8})
    assert cli(overrides) == 0
    printed = capsys.readouterr().out
    out = root / "runs" / "p1_evaluation"
    data = json.loads(out.with_suffix(".json").read_text())
    assert list(data["methods"]) == ALL_METHODS and data["skipped"] == {}
    assert data["layer"] == 2 and data["num_prompts"] == 3 and data["prompts"] == HELDOUT
    for method in data["methods"].values():
        assert len(method["answers"]) == 3
    scores = data["scores"]["embedding"]
    # Each answer is judged against the base answer: the embedding judge scores an unchanged one 3.
    assert scores["base"]["persona_fit"]["per_prompt"] == [3.0, 3.0, 3.0]
    assert scores["base"]["persona_fit"]["vs_base"] is None
    assert scores["proposed"]["persona_fit"]["vs_base"]["n"] == 3
    assert scores["proposed"]["persona_fit"]["vs_prompt"]["n"] == 3
    for method in ALL_METHODS:
        fit = scores[method]["persona_fit"]
        assert fit["n"] == 3 and fit["low"] <= fit["mean"] <= fit["high"]
        assert 1.0 <= fit["mean"] <= 5.0
        assert scores[method]["coherence"]["n"] == 3
        # The embedding judge cannot score traits: n/a, not missing and not a number.
        trait = scores[method]["trait:T1"]
        assert not trait["supported"] and trait["mean"] is None and trait["missing"] == 0
    assert data["missing_verdicts"] == {"embedding": 0}
    assert data["unsupported"] == {"embedding": ["trait:T1", "trait:T2"]}
    # Single vectors have the proposed vector's norm; random search spent the optimiser's budget.
    info = {m: d["info"] for m, d in data["methods"].items()}
    assert info["meandiff"]["norm"] == pytest.approx(info["proposed"]["norm"], rel=1e-5)
    assert info["pca"]["norm"] == pytest.approx(info["proposed"]["norm"], rel=1e-5)
    assert info["random_search"]["evaluations"] == 4 and set(info["random_search"]["weights"]) == {"T1", "T2"}
    assert info["proposed"]["weights"] == {"T1": 1.5, "T2": -0.8}
    assert data["methods"]["prompt"]["answers"] != data["methods"]["base"]["answers"]
    md = out.with_suffix(".md").read_text()
    assert "| prompt+proposed |" in md and "n/a" in md and "cannot score trait:T1" in md
    assert md in printed
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    def no_work(*a, **k):
        raise AssertionError("a warm re-run must not generate, read activations or judge")

    monkeypatch.setattr("persona_steering.generation._generate_batch", no_work)
    monkeypatch.setattr("persona_steering.evaluate.persona_vector.record_activations", no_work)
    monkeypatch.setattr("persona_steering.judges.embedding.EmbeddingJudge._judge", no_work)
    assert cli(overrides) == 0
    assert json.loads(out.with_suffix(".json").read_text()) == data


def test_zero_weights_and_zero_strength_reproduce_base(project):
    root, overrides = project
    write_result(root, {"T1": 0.0, "T2": 0.0})
    assert cli(overrides, "--methods", "base,meandiff,proposed") == 0
    data = json.loads((root / "runs" / "p1_evaluation.json").read_text())
    assert list(data["methods"]) == ["base", "meandiff", "proposed"]
    base = data["methods"]["base"]["answers"]
    assert data["methods"]["proposed"]["answers"] == base
    assert data["methods"]["meandiff"]["info"]["norm"] == 0.0  # strength follows the (zero) proposed vector
    assert data["methods"]["meandiff"]["answers"] == base
    fit = data["scores"]["embedding"]["proposed"]["persona_fit"]
    assert fit["per_prompt"] == [3.0, 3.0, 3.0] and fit["vs_base"]["p"] == 1.0
    assert fit["vs_prompt"] is None  # prompt was not evaluated


def test_without_optimisation_result_methods_are_skipped_or_refused(project, capsys):
    root, overrides = project
    assert cli(overrides, "--num-prompts", "2") == 0
    data = json.loads((root / "runs" / "p1_evaluation.json").read_text())
    assert list(data["methods"]) == ["base", "prompt", "meandiff", "pca"]
    assert set(data["skipped"]) == {"random_search", "proposed", "prompt+proposed"}
    assert data["num_prompts"] == 2
    assert data["methods"]["meandiff"]["info"]["strength"] == 1.0  # the documented default
    assert "proposed skipped: no optimisation result" in (root / "runs" / "p1_evaluation.md").read_text()
    shutil.rmtree(root / "runs")
    capsys.readouterr()
    assert_refused(root, overrides, ["--methods", "base,proposed"], "needs an optimisation result", capsys)


def assert_refused(root: Path, overrides: list[str], extra: list[str], message: str, capsys) -> None:
    """Exit 2, one line naming the problem, no evaluation file and no new cache entry."""
    with Cache(root / "cache") as cache:
        entries = cache.count()
    code = cli(overrides, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not list(root.glob("runs/p1_evaluation*"))
    with Cache(root / "cache") as cache:
        assert cache.count() == entries


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "base,telepathy"], "unknown evaluation method 'telepathy'"),
        (["--traits", "T1,T9"], "unknown trait 'T9'"),
        (["--persona-id", "nobody"], "unknown persona 'nobody'"),
        (["--layer", "7"], "layer 7 is out of range"),
        (["--judges", "embedding,oracle"], "evaluate.judges: 'oracle'"),
    ],
)
def test_bad_input_one_line_nothing_written(project, capsys, extra, message):
    root, overrides = project
    assert_refused(root, overrides, extra, message, capsys)


def test_empty_prompts_and_vectors_of_another_model(project, capsys, tiny_model_dir):
    root, overrides = project
    prompts = root / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"train": ["hello !"], "heldout": []}))
    assert_refused(root, overrides, [], "field 'heldout' must be a non-empty list", capsys)
    prompts.write_text(yaml.safe_dump({"train": ["hello !"], "heldout": HELDOUT}))
    from tests_helpers import perturbed_copy

    other = perturbed_copy(tiny_model_dir, root / "other-model")
    assert_refused(root, overrides, ["--model", str(other)], "no vectors for trait T1 of this model", capsys)
    write_result(root, {"T1": 1.0})  # a result whose traits lack a weight
    path = root / "runs" / "p1_optimization.json"
    data = json.loads(path.read_text())
    data["traits"] = ["T1", "T2"]
    path.write_text(json.dumps(data))
    assert_refused(root, overrides, [], "best_weights has no weight for trait T2", capsys)


def test_registry_finds_every_method_module():
    methods = registry()
    assert list(methods) == ALL_METHODS
    assert {m for m, v in methods.items() if v.needs_optimization} == {
        "random_search",
        "proposed",
        "prompt+proposed",
    }


def test_two_judges_report_agreement(project, monkeypatch):
    from openai_server import FakeOpenAI

    root, overrides = project
    write_result(root, {"T1": 1.0, "T2": 1.0})
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("PS_EVAL_TEST_KEY", "sk-test-key")
    monkeypatch.chdir(root)

    def reply(request):
        prompt = request["messages"][-1]["content"]
        if "single digit from 1 to 5" in prompt:  # persona fit: a deterministic digit per answer
            return str(1 + sum(map(ord, prompt.split("Answer B (candidate):")[1])) % 5)
        return "40" if "score" in prompt and "0 to 100" in prompt else "80"

    with FakeOpenAI() as server:
        server.content_fn = reply
        judge_opts = [
            f"judge.base_url={server.base_url}",
            "judge.api_key_env=PS_EVAL_TEST_KEY",
            "judge.model=fake",
        ]
        code = cli(
            overrides + judge_opts, "--judges", "embedding,openai", "--methods", "base,proposed,prompt"
        )
    assert code == 0
    data = json.loads((root / "runs" / "p1_evaluation.json").read_text())
    assert data["judges"] == ["embedding", "openai"]
    llm = data["scores"]["openai"]
    assert llm["proposed"]["trait:T2"]["supported"] and llm["proposed"]["trait:T2"]["mean"] == pytest.approx(
        40.0
    )
    assert llm["base"]["coherence"]["mean"] == pytest.approx(80.0)
    assert data["missing_verdicts"]["openai"] == 0
    pair = data["agreement"]["embedding~openai"]
    for method in ("proposed", "prompt"):
        a = data["scores"]["embedding"][method]["persona_fit"]["per_prompt"]
        b = llm[method]["persona_fit"]["per_prompt"]
        assert pair[method]["n"] == 3
        assert pair[method]["rho"] == spearman(a, b)[0]
    assert pair["base"]["rho"] is None  # the embedding judge scores base against itself: constant 3
    md = (root / "runs" / "p1_evaluation.md").read_text()
    assert "## Judge: openai" in md and "Judge agreement embedding~openai" in md
