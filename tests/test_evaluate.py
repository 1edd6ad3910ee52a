"""Evaluation stage: statistics on synthetic data with known answers, the stage end to end on the
tiny model (embedding judge; embedding + OpenAI judge over a local fake server), warm re-runs,
invariances, skipped methods and bad input."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tests_helpers import HELDOUT, build_project, judge_threads, private_copy

from persona_steering.cache import Cache
from persona_steering.cli import main
from persona_steering.config import ConfigError, load_config
from persona_steering.evaluate import Context, MethodSkipped, registry
from persona_steering.evaluate.scoring import ECHO, FIT, LOOP, PARTS, JudgeScores, score_answers, summarise
from persona_steering.evaluate.search import Start, coordinate_search
from persona_steering.evaluate.stats import bootstrap_interval, holm, ranks, sign_flip_test, spearman
from persona_steering.judges import Judge, Query, Verdict
from persona_steering.optimize import Scored
from persona_steering.record import PersonaRecord
from persona_steering.style import loops
from persona_steering.traits import DefinitionError, load_persona

ALL_METHODS = [
    "base",
    "prompt",
    "prompt-short",
    "meandiff",
    "pca",
    "random_search",
    "grid",
    "proposed",
    "proposed-mean",
    "proposed-best",
    "prompt+proposed",
]
SAMPLES = 3  # the default evaluate.samples: each prompt is answered 1 + 3 times


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
        "selected": "best",
        "weights": weights,
        "score": 3.2,
        "best_weights": weights,
        "best_score": 3.2,
        "num_iterations": 1,
        "num_evaluations": evaluations,
        "traits": list(weights),
        "judge": "embedding",
        "vector_method": "mean_diff",
        "mean_weights": {t: w / 2 for t, w in weights.items()},
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
    run = [m for m in ALL_METHODS if m != "proposed-best"]  # the result serves its best candidate
    assert list(data["methods"]) == run and list(data["skipped"]) == ["proposed-best"]
    assert data["layer"] == 2 and data["num_prompts"] == 3 and data["prompts"] == HELDOUT
    assert data["answers_per_prompt"] == 1 + SAMPLES and data["sampling"]["seeds"] == [1, 2, 3]
    for method in data["methods"].values():
        assert len(method["answers"]) == 3
        assert [len(s) for s in method["sampled_answers"]] == [3] * SAMPLES
    sampled = {a for s in data["methods"]["base"]["sampled_answers"] for a in s}
    assert sampled - set(data["methods"]["base"]["answers"])  # sampling at 0.7 does reach other answers
    scores = data["scores"]["embedding"]
    assert scores["base"]["persona_fit"]["vs_base"] is None
    assert scores["proposed"]["persona_fit"]["vs_base"]["n"] == 3
    assert scores["proposed"]["persona_fit"]["vs_prompt"]["n"] == 3
    tests = [scores[m]["persona_fit"]["vs_base"] for m in run[1:]]
    assert [t["p_holm"] for t in tests] == pytest.approx(holm([t["p"] for t in tests]))
    for method in run:
        fit = scores[method]["persona_fit"]
        assert fit["n"] == 3 and fit["low"] <= fit["mean"] <= fit["high"]
        assert 1.0 <= fit["mean"] <= 5.0
        # The unit is the prompt: the mean over its greedy and sampled answers' scores.
        assert len(fit["per_answer"]) == 1 + SAMPLES
        assert fit["per_prompt"] == pytest.approx(np.mean(fit["per_answer"], axis=0).tolist())
        assert scores[method]["coherence"]["n"] == 3
        answers = [data["methods"][method]["answers"], *data["methods"][method]["sampled_answers"]]
        loop = scores[method][LOOP]
        assert loop["supported"] and loop["per_answer"] == [[float(loops(a)) for a in s] for s in answers]
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
    assert info["grid"]["evaluations"] == 4 and info["grid"]["per_trait"] == 2  # 4 // 2 traits
    assert info["prompt-short"]["system_prompt"] == "A warm friend who tells stories about the weekend."
    assert info["proposed"]["weights"] == {"T1": 1.5, "T2": -0.8}
    assert info["proposed-mean"]["weights"] == {"T1": 0.75, "T2": -0.4}
    assert info["proposed-mean"]["norm"] == pytest.approx(info["proposed"]["norm"] / 2, rel=1e-5)
    assert "proposed-best" not in data["methods"] and "`proposed`" in data["skipped"]["proposed-best"]
    assert data["methods"]["prompt"]["answers"] != data["methods"]["base"]["answers"]
    md = out.with_suffix(".md").read_text()
    assert "| prompt+proposed |" in md and "n/a" in md
    assert f"cannot score {', '.join(data['unsupported']['embedding'])}." in md
    assert "| grid |" in md and "loop rate" in md and "echo rate" in md and "p (Holm)" in md
    assert f"Optimised against: {data['judges'][0]} (the first judge" in md
    assert md in printed
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    def no_work(*a, **k):
        raise AssertionError("a warm re-run must not generate, read activations or judge")

    monkeypatch.setattr("persona_steering.generation._generate_batch", no_work)
    monkeypatch.setattr("persona_steering.persona_axis.record_activations", no_work)
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
    # Unsteered rows share their cache keys with base, sampled ones included (same seeds).
    assert data["methods"]["proposed"]["sampled_answers"] == data["methods"]["base"]["sampled_answers"]
    scores = data["scores"]["embedding"]
    fit = scores["proposed"]["persona_fit"]
    assert fit["per_answer"] == scores["base"]["persona_fit"]["per_answer"]
    assert fit["vs_base"]["p"] == 1.0 and fit["vs_base"]["diff"] == 0.0
    assert fit["vs_prompt"] is None  # prompt was not evaluated


def test_without_optimisation_result_methods_are_skipped_or_refused(project, capsys):
    root, overrides = project
    assert cli(overrides, "--num-prompts", "2") == 0
    data = json.loads((root / "runs" / "p1_evaluation.json").read_text())
    assert list(data["methods"]) == ["base", "prompt", "prompt-short", "meandiff", "pca"]
    assert set(data["skipped"]) == set(ALL_METHODS[5:])  # every method that needs the optimisation
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
    assert_refused(root, overrides, [], "weights has no weight for trait T2", capsys)


def test_registry_finds_every_method_module():
    methods = registry()
    assert list(methods) == ALL_METHODS
    assert {m for m, v in methods.items() if v.needs_optimization} == {
        "random_search",
        "grid",
        "proposed",
        "proposed-mean",
        "proposed-best",
        "prompt+proposed",
    }


def test_two_judges_report_agreement(project, monkeypatch):
    from persona_steering.fake_openai import FakeOpenAI

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
            return str(1 + sum(map(ord, prompt)) % 5)
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
    # Over per-prompt means of all answers: base's sampled answers are judged against its greedy
    # ones, so even base varies over prompts now.
    for method in ("base", "proposed", "prompt"):
        a = data["scores"]["embedding"][method]["persona_fit"]["per_prompt"]
        b = llm[method]["persona_fit"]["per_prompt"]
        assert pair[method]["n"] == 3
        assert pair[method]["rho"] == spearman(a, b)[0]
    md = (root / "runs" / "p1_evaluation.md").read_text()
    assert "## Judge: openai" in md and "Judge agreement embedding~openai" in md


# --- Holm, per-answer metrics and the baselines, without a model -------------------------------------


def test_holm_matches_a_hand_computed_example():
    # Sorted: 0.005, 0.01, 0.03, 0.04 (m = 4) -> 4*0.005 = 0.02, 3*0.01 = 0.03, 2*0.03 = 0.06,
    # max(0.06, 1*0.04) = 0.06 (step-down keeps the adjusted values monotone); None is not a test.
    assert holm([0.01, 0.04, 0.03, 0.005, None]) == pytest.approx([0.03, 0.06, 0.06, 0.02, None])
    assert holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # 2*0.4 = 0.8, then max(0.8, 0.5)
    assert holm([0.3, 0.6, 0.9]) == pytest.approx([0.9, 1.0, 1.0])  # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == [] and holm([None]) == [None]


def synthetic_scores(per_prompt: dict[str, list[float]]) -> JudgeScores:
    """JudgeScores of one metric (persona fit) with the given per-prompt values."""
    values = {m: {FIT: list(v)} for m, v in per_prompt.items()}
    return JudgeScores("stub", values, {m: {FIT: [list(v)]} for m, v in per_prompt.items()})


def test_holm_corrects_each_metric_and_reference_across_methods():
    rng = np.random.default_rng(6)
    base = rng.normal(3.0, 0.5, size=8).tolist()
    per_prompt = {
        "base": base,
        "prompt": [b + 0.4 + 0.1 * rng.normal() for b in base],
        "a": [b + 1.0 for b in base],
        "b": [b + 0.2 * rng.normal() for b in base],
    }
    ev = load_config(None, ["evaluate.bootstrap=200"]).evaluate
    out = summarise(synthetic_scores(per_prompt), ev, 0)
    for ref in ("base", "prompt"):
        tested = [m for m in per_prompt if m != ref]
        raw = [out[m][FIT][f"vs_{ref}"]["p"] for m in tested]
        adjusted = [out[m][FIT][f"vs_{ref}"]["p_holm"] for m in tested]
        assert adjusted == pytest.approx(holm(raw))
        assert all(h >= p for h, p in zip(adjusted, raw, strict=True))
    assert out["a"][FIT]["vs_base"]["p_holm"] == pytest.approx(3 * 2 / 2**8)  # smallest of three tests
    assert out["base"][FIT]["vs_base"] is None


class StubJudge(Judge):
    """Persona fit with (or without) parts read off the answer's length; coherence 50; no traits."""

    backend = "stub"
    kinds = frozenset({"persona_fit", "coherence"})

    def __init__(self, parts: bool) -> None:
        self.parts = parts

    def identity(self) -> dict:
        return {"stub": self.parts}

    def _judge(self, queries):
        out = []
        for q in queries:
            if q.kind == "coherence":
                out.append(Verdict(50.0))
                continue
            n = len(q.answer.split())
            parts = {"style": n / 100, "relevance": 0.5, "fluency": 1.0}
            out.append(Verdict(1.0 + n / 10, meta={"parts": parts} if self.parts else {}))
        return out


LOOPING = "the cat sat on the cat sat on the cat sat on"  # 'the cat sat on' three times
ALMOST = "the cat sat on the cat sat on the mat"  # twice only
PLAIN = "hello there my friend"


def stub_answers() -> dict[str, list[list[str]]]:
    """Two methods, two prompts, three answers each: [answer][prompt]."""
    return {
        "base": [[PLAIN, PLAIN], [PLAIN, ALMOST], [PLAIN, PLAIN]],
        "m": [[LOOPING, PLAIN], [PLAIN, LOOPING], [ALMOST, LOOPING]],
    }


def stub_fit():
    return types.SimpleNamespace(query=lambda q, a, b: Query("persona_fit", q, a, baseline=b))


def test_loop_rate_and_parts_come_per_answer_and_average_per_prompt():
    scores = score_answers(StubJudge(parts=True), None, None, [], ["p0", "p1"], stub_answers(), stub_fit())
    assert scores.per_answer["m"][LOOP] == [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    assert scores.values["m"][LOOP] == pytest.approx([1 / 3, 2 / 3])
    assert scores.values["base"][LOOP] == [0.0, 0.0]  # a repeat twice is not a loop
    # Parts come from each fit verdict's meta: style = words / 100 of that very answer.
    assert scores.per_answer["m"]["style"][0] == pytest.approx([0.12, 0.04])
    assert scores.values["m"]["style"][0] == pytest.approx((0.12 + 0.04 + 0.10) / 3)
    assert scores.values["m"]["fluency"] == [1.0, 1.0] and scores.unsupported == []
    assert scores.values["m"][FIT][1] == pytest.approx(1 + (4 + 12 + 12) / 30)
    ev = load_config(None, ["evaluate.bootstrap=200"]).evaluate
    out = summarise(scores, ev, 0)
    assert out["m"][LOOP]["mean"] == pytest.approx(0.5) and out["m"][LOOP]["per_answer"][0] == [1.0, 0.0]
    assert out["m"][LOOP]["vs_base"]["n"] == 2 and "p_holm" in out["m"][LOOP]["vs_base"]


def test_echo_rate_counts_answers_that_only_repeat_their_question():
    prompts = ["Shall we order takeout tonight?", "What should we name the new puppy?"]
    answers = {
        "base": [["Sure, pizza sounds good to me tonight.", "Maybe Biscuit, after the colour of his fur."]],
        "m": [["Shall we order takeout tonight?", "Maybe Biscuit, after the colour of his fur."]],
    }
    scores = score_answers(StubJudge(parts=True), None, None, [], prompts, answers, stub_fit())
    assert scores.per_answer["m"][ECHO] == [[1.0, 0.0]] and scores.per_answer["base"][ECHO] == [[0.0, 0.0]]
    out = summarise(scores, load_config(None, ["evaluate.bootstrap=200"]).evaluate, 0)
    assert out["m"][ECHO]["supported"] and out["m"][ECHO]["mean"] == pytest.approx(0.5)


def test_fit_verdicts_without_parts_make_the_parts_unsupported_not_zero():
    scores = score_answers(StubJudge(parts=False), None, None, [], ["p0", "p1"], stub_answers(), stub_fit())
    assert set(PARTS) <= set(scores.unsupported)
    ev = load_config(None, ["evaluate.bootstrap=200"]).evaluate
    out = summarise(scores, ev, 0)
    for part in PARTS:
        entry = out["m"][part]
        assert not entry["supported"] and entry["mean"] is None and entry["missing"] == 0
        assert entry["vs_base"] is None
    assert out["m"][LOOP]["supported"] and out["m"][FIT]["mean"] is not None  # judge-free metrics stay


def fake_context(weights: list[float] | None, budget: int, **optimize) -> Context:
    """A Context over a stub basis (k = 2 traits, hidden 4: the delta is the weights, zero-padded)."""
    overrides = [
        "traits=[A, B]",
        "steering.persona_axis=false",
        *(f"optimize.{k}={v}" for k, v in optimize.items()),
    ]
    if weights is not None:
        overrides.append(f"optimize.initial_weights=[{', '.join(map(str, weights))}]")
    cfg = load_config(None, overrides)
    basis = types.SimpleNamespace(
        traits=["A", "B"], deltas=lambda w, alpha: torch.cat([w, torch.zeros(2)])[None, :]
    )
    persona = types.SimpleNamespace(profile="A plain speaker. Says little.", short_prompt=None)
    rt = types.SimpleNamespace(hidden_size=4)
    result = PersonaRecord("p1", ["A", "B"], {"A": 0.0, "B": 0.0}, 20, 0.1, budget, score=3.0)
    return Context(cfg, rt, None, basis, persona, None, ["t0"], result)


class RecordingObjective:
    """Stands in for optimize.Objective: records candidates, scores |w - target|^2 (minimised)."""

    target = np.array([0.9, -0.8])
    batches: list[np.ndarray] = []

    def __init__(self, *args) -> None:
        RecordingObjective.batches = []

    def score(self, weights):
        w = np.asarray(weights)
        RecordingObjective.batches.append(w.copy())
        values = ((w - self.target) ** 2).sum(axis=1)
        return [Scored(-v, None, 1, 1, v) for v in values], []


def test_random_search_draws_from_the_cma_start_distribution_within_bounds(monkeypatch):
    from persona_steering.evaluate.methods import random_search

    monkeypatch.setattr("persona_steering.evaluate.search.Objective", RecordingObjective)
    ctx = fake_context([0.5, -1.0], 4000, sigma0=0.4, bound=1.5)
    plan = random_search.plan(ctx, ["q0", "q1"])
    [candidates] = RecordingObjective.batches
    assert candidates.shape == (4000, 2)  # the optimiser's budget, in one batch
    assert np.abs(candidates).max() <= 1.5
    a, b = candidates[:, 0], candidates[:, 1]
    # Trait A: 2.5 sigma from the bound, so N(0.5, 0.4) almost untouched by clipping.
    assert a.mean() == pytest.approx(0.5, abs=0.03) and a.std() == pytest.approx(0.4, abs=0.03)
    # Trait B: N(-1, 0.4) clipped at -1.5; the median is unmoved, P(z < -1.25) = 10.6% sit on the bound.
    assert np.median(b) == pytest.approx(-1.0, abs=0.04)
    assert (b == -1.5).mean() == pytest.approx(0.106, abs=0.02) and b.min() == -1.5
    best = candidates[((candidates - RecordingObjective.target) ** 2).sum(axis=1).argmin()]
    assert plan.deltas.shape == (2, 4)
    assert plan.deltas[1, :2].tolist() == pytest.approx(best.tolist())
    assert plan.info["evaluations"] == 4000 and plan.info["x0"] == {"A": 0.5, "B": -1.0}
    assert plan.info["sigma0"] == 0.4


def test_coordinate_search_spends_the_budget_one_axis_at_a_time():
    target = np.array([0.9, -0.8, 0.4])
    batches = []

    def evaluate(c):
        batches.append(c.copy())
        return ((c - target) ** 2).sum(axis=1)

    start = Start(np.array([0.2, -0.3, 0.0]), sigma0=0.5, bound=1.0, budget=14)
    found = coordinate_search(start, evaluate)
    assert [b.shape for b in batches] == [(4, 3)] * 3 and found.evaluations == 12  # 14 // 3 per trait
    expected_axes = [
        np.linspace(-0.8, 1.0, 4),  # 0.2 +- 1.0, clipped to the bound above
        np.linspace(-1.0, 0.7, 4),  # -0.3 +- 1.0, clipped below
        np.linspace(-1.0, 1.0, 4),
    ]
    point = start.x0.copy()
    for i, batch in enumerate(batches):
        others = np.delete(batch, i, axis=1)
        assert (others == np.delete(point, i)).all()  # every other weight held at the current point
        assert batch[:, i] == pytest.approx(expected_axes[i])
        point = batch[((batch - target) ** 2).sum(axis=1).argmin()]
    assert found.best == pytest.approx([1.0, -1.0, 1 / 3])
    assert found.value == pytest.approx(0.01 + 0.04 + (0.4 - 1 / 3) ** 2)


def test_coordinate_search_keeps_the_point_when_an_axis_does_not_improve_it():
    start = Start(np.zeros(2), sigma0=0.5, bound=3.0, budget=6)  # 3 values per axis
    # Axis 0 finds w0 = 1; on axis 1 every value is worse than that point, or has no verdict.
    values = iter([np.array([4.0, 1.0, 0.5]), np.array([0.7, math.nan, 0.9])])
    found = coordinate_search(start, lambda c: next(values))
    assert found.best.tolist() == [1.0, 0.0] and found.value == 0.5
    with pytest.raises(MethodSkipped, match="budget of 1 evaluations cannot cover 2 traits"):
        coordinate_search(Start(np.zeros(2), 0.5, 3.0, 1), lambda c: np.zeros(len(c)))
    with pytest.raises(MethodSkipped, match="no verdict"):
        coordinate_search(start, lambda c: np.full(len(c), math.nan))


def test_grid_plan_starts_at_x0_and_steers_with_the_end_point(monkeypatch):
    from persona_steering.evaluate.methods import grid

    monkeypatch.setattr("persona_steering.evaluate.search.Objective", RecordingObjective)
    ctx = fake_context([0.5, -1.0], 11, sigma0=0.25, bound=3.0)  # 11 // 2 = 5 values per trait
    plan = grid.plan(ctx, ["q0"])
    first, second = RecordingObjective.batches
    assert first[:, 0] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0]) and (first[:, 1] == -1.0).all()
    assert (second[:, 0] == 1.0).all() and second[:, 1] == pytest.approx([-1.5, -1.25, -1.0, -0.75, -0.5])
    assert plan.info["evaluations"] == 10 and plan.info["budget"] == 11 and plan.info["per_trait"] == 5
    assert plan.deltas[0, :2].tolist() == pytest.approx([1.0, -0.75])


def test_prompt_short_reads_the_short_prompt_file_or_falls_back_to_the_first_sentence(tmp_path):
    from persona_steering.evaluate.methods import prompt_short

    folder = tmp_path / "personas" / "p"
    folder.mkdir(parents=True)
    (folder / "persona_profile.txt").write_text("Ann is calm. She speaks slowly!\nShe likes tea.")
    (folder / "persona_samples.json").write_text(json.dumps(["hello"]))
    persona = load_persona(tmp_path / "personas", "p")
    assert persona.short_prompt is None
    ctx = fake_context(None, 1)
    ctx.persona = persona
    plan = prompt_short.plan(ctx, ["q0", "q1"])
    assert [r.system for r in plan.requests] == ["Ann is calm."] * 2 and not plan.deltas.any()
    assert "first sentence" in plan.info["source"]
    (folder / "persona_short_prompt.txt").write_text("\nAnswer calmly and slowly, like Ann.\n")
    ctx.persona = persona = load_persona(tmp_path / "personas", "p")
    assert persona.short_prompt == "Answer calmly and slowly, like Ann."
    plan = prompt_short.plan(ctx, ["q0"])
    assert plan.requests[0].system == persona.short_prompt and plan.requests[0].user == "q0"
    assert plan.info["source"] == "persona_short_prompt.txt"
    (folder / "persona_short_prompt.txt").write_text("Answer calmly.\nAnd slowly.")
    with pytest.raises(DefinitionError, match="must hold one line"):
        load_persona(tmp_path / "personas", "p")


def test_every_shipped_persona_has_a_one_sentence_short_instruction():
    root = Path(__file__).resolve().parent.parent / "personas"
    ids = sorted(p.name for p in root.iterdir() if (p / "persona_profile.txt").is_file())
    assert len(ids) == 5
    for pid in ids:
        short = load_persona(root, pid).short_prompt
        assert short is not None and short.startswith("Answer as "), pid
        assert short.endswith(".") and short.count(". ") == 0 and len(short) < 200, pid


def test_every_answer_setting_has_its_own_generation_cache_key(tiny_rt):
    from persona_steering.cache import digest
    from persona_steering.evaluate.run import answer_settings
    from persona_steering.generation import _row_key

    cfg = load_config(None, ["seed=5", "evaluate.samples=3", "evaluate.sample_temperature=0.7"])
    settings = answer_settings(cfg)
    assert [(g.temperature, seed) for g, seed, _ in settings] == [(0.0, 5), (0.7, 6), (0.7, 7), (0.7, 8)]
    keys = [_row_key(tiny_rt, "x", g, seed, None, 0) for g, seed, _ in settings]
    assert len({digest(k) for k in keys}) == 4  # temperature and seed both reach the key
    assert keys[1]["gen"]["temperature"] == 0.7 and keys[1]["seed"] == 6 and keys[0]["seed"] is None
    assert len(answer_settings(load_config(None, ["evaluate.samples=0"]))) == 1
    with pytest.raises(ConfigError, match="evaluate.sample_temperature must be > 0"):
        load_config(None, ["evaluate.sample_temperature=0"])


@pytest.mark.parametrize("selected", ["mean", "best"])
def test_proposed_steers_the_served_weights_and_the_other_candidate_is_its_own_method(selected):
    from persona_steering.evaluate.methods import proposed

    best, mean = {"A": 1.0, "B": -0.5}, {"A": 0.25, "B": 0.5}
    served, other = (mean, best) if selected == "mean" else (best, mean)
    ctx = fake_context(None, 8)
    data = {
        "persona_id": "p1",
        "traits": ["A", "B"],
        "layer": 20,
        "alpha": 0.1,
        "num_evaluations": 8,
        "selected": selected,
        "weights": served,
        "best_weights": best,
        "mean_weights": mean,
    }
    ctx.result = PersonaRecord.from_dict(data)
    assert proposed.plan(ctx, ["q"]).info["weights"] == served
    assert proposed.plan_with_prompt(ctx, ["q"]).requests[0].system == ctx.persona.profile
    alternative, same = (proposed.plan_best, proposed.plan_mean)
    if selected == "best":
        alternative, same = same, alternative
    plan = alternative(ctx, ["q", "r"])
    assert plan.info["weights"] == other and torch.equal(
        plan.deltas[1], torch.tensor([*other.values(), 0, 0])
    )
    with pytest.raises(MethodSkipped, match=f"optimize.select={selected}"):
        same(ctx, ["q"])


def test_held_out_answers_judged_while_generating_give_the_same_evaluation(project, monkeypatch):
    import threading

    root, overrides = project
    write_result(root, {"T1": 1.5, "T2": -0.8})
    threads = judge_threads(monkeypatch)
    runs = {}
    for ahead in (False, True):
        threads.clear()
        extra = [
            f"judge.while_generating={'always' if ahead else 'auto'}",  # auto: not beside a CPU policy
            "generation.max_batch=4",  # several blocks per answer set
            f"cache_dir={root / f'cache-{ahead}'}",  # nothing judged for one run helps the other
            "evaluate.num_prompts=3",
        ]
        assert cli([*overrides, *extra], "--methods", "base,prompt,proposed") == 0
        runs[ahead] = json.loads((root / "runs" / "p1_evaluation.json").read_text())
        if ahead:
            # every verdict came from the background, block by block; the main thread found them cached
            assert threads and all(t.startswith("judge-ahead") for t in threads) and len(threads) > 4
        else:
            assert threads and all(t == threading.main_thread().name for t in threads)
    assert runs[True]["scores"] == runs[False]["scores"]
    assert runs[True]["methods"] == runs[False]["methods"]


def test_the_evaluate_bench_writes_nothing_beside_the_users_result(project, tmp_path):
    from persona_steering.bench.ahead import bench_ahead_evaluate
    from persona_steering.runtime import load_runtime

    root, overrides = project
    result = write_result(root, {"T1": 1.5, "T2": -0.8})
    cfg = load_config(None, [*overrides, "evaluate.num_prompts=2", "evaluate.samples=1"])
    rt = load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = bench_ahead_evaluate(cfg, rt, scratch, 0.0, log=lambda *_: None)
    assert out["same_scores"] is True and out["rows"] == 3 * 2 * 2
    assert sorted(p.name for p in result.parent.iterdir()) == [result.name]
    assert (scratch / "optimize-ahead-evaluate-True" / "p1_evaluation.json").is_file()
