"""Sweep and similarity stages end to end on the tiny model: outputs, invariances, the projection
proxy against a reference, incremental grids, no model load for similarity, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests_helpers import build_project, private_copy

from persona_steering.cache import Cache
from persona_steering.cli import main
from persona_steering.config import load_config
from persona_steering.evaluate.sweep import projections
from persona_steering.generation import Request, generate
from persona_steering.store import load_vectors
from persona_steering.vectors import unit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("sweep-project")
    return root, build_project(root, tiny_model_dir)


@pytest.fixture()
def project(built, tmp_path):
    root, overrides = built
    return private_copy(root, overrides, tmp_path / "p")


def run(command: str, overrides: list[str], *extra: str) -> int:
    return main([command, *sum((["--set", o] for o in overrides), []), *extra])


def sweep_dir(root: Path) -> Path:
    [folder] = (root / "sweep").glob("*/T1")
    return folder


def test_sweep_end_to_end_and_coefficient_zero_is_unsteered(project, capsys):
    root, overrides = project
    assert run("sweep", overrides, "--trait", "T1", "--layers", "1,2,-1", "--coefs=-2,0,2") == 0
    printed = capsys.readouterr().out
    folder = sweep_dir(root)
    data = json.loads((folder / "sweep.json").read_text())
    assert data["layers"] == [1, 2, 3] and data["coefs"] == [-2.0, 0.0, 2.0]
    assert data["read_layer"] == 2 and data["questions"] == ["how was your weekend ?"]
    assert len(data["cells"]) == 9 and not data["trait_score_supported"]
    unsteered = data["unsteered"]
    for cell in data["cells"]:
        assert cell["trait_score"] == {"mean": None, "n": 0, "missing": 1}  # embedding judge: no trait score
        assert cell["coherence"]["n"] == 1
        if cell["coef"] == 0.0:
            assert cell["answers"] == unsteered["answers"]
            assert cell["projection_delta"]["mean"] == 0.0
    steered = [c["projection_delta"]["mean"] for c in data["cells"] if c["coef"] != 0.0]
    assert all(v is not None for v in steered) and any(v != 0.0 for v in steered)
    for name in ("trait.png", "coherence.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"
    assert "# Sweep of T1" in printed and "| 3 |" in printed


def test_widening_the_grid_generates_only_new_cells(project, monkeypatch):
    root, overrides = project
    assert run("sweep", overrides, "--trait", "T1", "--layers", "1,2", "--coefs=-1,1") == 0
    import persona_steering.generation as generation

    real = generation._generate_batch
    rows: list[int] = []

    def counting(rt, texts, *args, **kwargs):
        rows.append(len(texts))
        return real(rt, texts, *args, **kwargs)

    monkeypatch.setattr(generation, "_generate_batch", counting)
    with Cache(root / "cache") as cache:
        before = cache.count("generation")
    assert run("sweep", overrides, "--trait", "T1", "--layers", "1,2,3", "--coefs=-1,1,3") == 0
    # New cells: layer 3 x 3 coefs + layers 1, 2 x coef 3 = 5 cells of one question each.
    assert sum(rows) == 5
    with Cache(root / "cache") as cache:
        assert cache.count("generation") == before + 5
    rows.clear()
    assert run("sweep", overrides, "--trait", "T1", "--layers", "1,2,3", "--coefs=-1,1,3") == 0
    assert rows == []


def test_projection_matches_hidden_states_reference(project, tiny_rt):
    root, overrides = project
    cfg = load_config(None, overrides)
    [vf_path] = (root / "vectors").glob("*/T1.safetensors")
    direction = unit(load_vectors(vf_path).vector("mean_diff", "response_avg", 2))
    with Cache(root / "cache") as cache:
        answers = generate(
            tiny_rt, [Request("hello !"), Request("how was work today ?")], cfg.generation, cache=cache
        )
        got = projections(tiny_rt, cache, answers, 2, direction)
        assert cache.count("projection") == 2
        again = projections(tiny_rt, cache, answers, 2, direction)
    assert again == got
    for answer, value in zip(answers, got, strict=True):
        prompt_ids = tiny_rt.tokenizer(answer.prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer.ids])
        with torch.no_grad():
            hidden = tiny_rt.model(input_ids=ids, output_hidden_states=True).hidden_states[
                2
            ]  # [1, seq, hidden]
        expected = hidden[0, len(prompt_ids) :].mean(0) @ direction
        assert value == pytest.approx(float(expected), abs=1e-4)


def test_similarity_from_vector_files_without_loading_a_model(project, monkeypatch, capsys):
    root, overrides = project

    def no_model(*a, **k):
        raise AssertionError("similarity must not load a model")

    monkeypatch.setattr("persona_steering.runtime.load_runtime", no_model)
    assert run("similarity", overrides, "--layer", "2") == 0
    printed = capsys.readouterr().out
    [folder] = (root / "similarity").glob("*")
    data = json.loads((folder / "similarity.json").read_text())
    files = {t: load_vectors(next((root / "vectors").glob(f"*/{t}.safetensors"))) for t in ("T1", "T2")}
    v1, v2 = (files[t].vector("mean_diff", "response_avg", 2) for t in ("T1", "T2"))
    expected = float(torch.nn.functional.cosine_similarity(v1, v2, dim=0))
    cos = data["cosine"]
    assert cos[0][0] == pytest.approx(1.0) and cos[1][1] == pytest.approx(1.0)
    assert cos[0][1] == pytest.approx(expected, abs=1e-6) and cos[1][0] == pytest.approx(expected, abs=1e-6)
    assert data["layers"] == [1, 2, 3] and data["pairs_by_layer"]["T1~T2"][1] == pytest.approx(
        expected, abs=1e-6
    )
    svd = files["T1"].vector("svd", "response_avg", 2)
    md_svd = float(
        torch.nn.functional.cosine_similarity(files["T1"].vector("mean_diff", "response_avg", 2), svd, dim=0)
    )
    assert data["methods"]["T1"]["mean_diff~svd"] == pytest.approx(md_svd, abs=1e-6)
    assert set(data["methods"]["T2"]) == {"mean_diff~svd", "mean_diff~pca", "svd~pca"}
    for name in ("layer2.png", "layers.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"
    assert (folder / "similarity.md").read_text() in printed + "\n"
    assert "| T1 | 1.00 |" in printed


def assert_refused(
    root: Path, command: str, overrides: list[str], extra: list[str], message: str, capsys
) -> None:
    with Cache(root / "cache") as cache:
        entries = cache.count()
    code = run(command, overrides, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (root / "sweep").exists() and not (root / "similarity").exists()
    with Cache(root / "cache") as cache:
        assert cache.count() == entries


@pytest.mark.parametrize(
    "command, extra, message",
    [
        ("sweep", [], "sweep.trait is required"),
        ("sweep", ["--trait", "T9"], "unknown trait 'T9'"),
        ("sweep", ["--trait", "T1", "--layers", "1,9"], "layer 9 is out of range"),
        ("sweep", ["--trait", "T1", "--layers", "1", "--read-layer", "-9"], "layer -9 is out of range"),
        ("sweep", ["--trait", "T1", "--num-questions", "0"], "sweep.num_questions must be >= 1"),
        ("similarity", ["--traits", "T1"], "needs at least two traits"),
        ("similarity", ["--traits", "T1,T9"], "no vectors for trait T9"),
        ("similarity", ["--layer", "5"], "layer 5 is out of range"),
    ],
)
def test_bad_input_one_line_nothing_written(project, capsys, command, extra, message):
    root, overrides = project
    assert_refused(root, command, overrides, extra, message, capsys)


def test_vectors_of_another_model_are_refused(project, capsys, tiny_model_dir):
    from tests_helpers import perturbed_copy

    root, overrides = project
    other = str(perturbed_copy(tiny_model_dir, root / "other-model"))
    assert_refused(root, "sweep", overrides, ["--trait", "T1", "--model", other], "not found", capsys)
    assert_refused(root, "similarity", overrides, ["--model", other], "no vectors for trait T1", capsys)
