"""The optimised-persona record: file names, save/load round trip, checks shared by every reader."""

import json
import types

import pytest
import torch

from persona_steering.config import ConfigError
from persona_steering.record import PersonaFiles, PersonaRecord
from persona_steering.store import VectorFileError

DATA = {
    "persona_id": "p1",
    "traits": ["R1", "R2"],
    "selected": "mean",
    "weights": {"R1": 0.5, "R2": -1.25},
    "score": 3.0,
    "best_weights": {"R1": 0.75, "R2": -1.5},
    "mean_weights": {"R1": 0.5, "R2": -1.25},
    "layer": 20,
    "alpha": 0.1,
    "num_evaluations": 64,
    "best_score": 3.2,
    "residual_scale": 12.5,
    "fingerprint": "f" * 64,
    "judge": "offline",
    "vector_method": "svd",
    "config_digest": "abc",
    "config": {"steering": {"positions": "all", "summary": "response_avg"}},
}


def test_files_are_named_in_one_place_and_ids_checked(tmp_path):
    files = PersonaFiles(tmp_path, "p1")
    assert files.result == tmp_path / "p1_optimization.json"
    assert files.best_weights == tmp_path / "p1_best_weights.json"
    assert files.evaluation("md") == tmp_path / "p1_evaluation.md"
    assert files.layers("png") == tmp_path / "p1_layers.png"
    assert files.page(tmp_path / "r") == tmp_path / "r" / "p1.html"
    for bad in ("/etc/x", "../p", "a/b", ""):
        with pytest.raises(ConfigError, match="not a usable persona id"):
            PersonaFiles(tmp_path, bad)


def test_save_load_round_trip_typed(tmp_path):
    files = PersonaFiles(tmp_path, "p1")
    assert PersonaRecord.load(files) is None
    with pytest.raises(ConfigError, match="run `make optimize PERSONA=p1`"):
        PersonaRecord.require(files)
    PersonaRecord.from_dict(DATA).save(files)
    record = PersonaRecord.require(files)
    assert (record.layer, record.alpha, record.positions, record.vector_method) == (20, 0.1, "all", "svd")
    assert record.data == DATA and record.source == files.result
    assert torch.equal(record.weights(["R2", "R1"]), torch.tensor([-1.25, 0.5]))
    assert (record.selected, record.score) == ("mean", 3.0)
    short = json.loads(files.best_weights.read_text())
    assert short == {
        k: DATA[k]
        for k in (
            "persona_id",
            "layer",
            "alpha",
            "selected",
            "weights",
            "score",
            "best_weights",
            "best_score",
            "mean_weights",
            "config_digest",
        )
    }
    with pytest.raises(ConfigError, match="holds persona 'p1', not 'p2'"):
        files.result.rename(tmp_path / "p2_optimization.json")
        PersonaRecord.load(PersonaFiles(tmp_path, "p2"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer": "20"}, "must be numbers"),
        ({"weights": {"R1": 1.0}}, "weights has no weight for trait R2"),
        ({"weights": {"R1": 1.0, "R2": 0.0, "R9": 1.0}}, "names R9"),
        ({"selected": "median"}, "selected must be one of mean, best"),
        ({"persona_id": "../x"}, "not a usable persona id"),
    ],
)
def test_bad_results_are_refused_with_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        PersonaRecord.from_dict({**DATA, **change})
    with pytest.raises(ConfigError, match="missing field 'alpha'"):
        PersonaRecord.from_dict({k: v for k, v in DATA.items() if k != "alpha"})


def test_a_result_from_before_optimize_select_serves_its_best_candidate():
    legacy = {k: v for k, v in DATA.items() if k not in ("selected", "weights", "score", "mean_weights")}
    record = PersonaRecord.from_dict(legacy)
    assert (record.selected, record.selected_weights, record.score) == ("best", legacy["best_weights"], 3.2)
    with pytest.raises(ConfigError, match="missing field 'weights'"):
        PersonaRecord.from_dict({k: v for k, v in legacy.items() if k != "best_weights"})


def test_changed_vectors_or_model_refused_with_one_message():
    record = PersonaRecord.from_dict(DATA)
    same = types.SimpleNamespace(fingerprint="f" * 64, scale=12.5)
    record.check_basis(same)  # type: ignore[arg-type]
    for other in ({"scale": 12.6}, {"fingerprint": "e" * 64}):
        with pytest.raises(VectorFileError, match="trait vectors or the model changed since"):
            record.check_basis(types.SimpleNamespace(**{**vars(same), **other}))  # type: ignore[arg-type]
