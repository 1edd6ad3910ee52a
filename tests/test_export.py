"""llama.cpp control vectors: GGUF round trip, the layer index rule, steering parity on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tests_helpers import write_fake_vectors

from persona_steering.basis import load_basis
from persona_steering.cli import main
from persona_steering.config import load_config
from persona_steering.export import block_index, read_control_vector, write_control_vector
from persona_steering.layers import LayerError
from persona_steering.runtime import identify
from persona_steering.steering import steer
from persona_steering.store import VectorFileError

TRAITS = ["T1", "T2"]


@pytest.fixture()
def exported(tmp_path: Path, tiny_model_dir: Path) -> tuple[list[str], Path]:
    """Vector files for the tiny model and a persona optimisation result; returns config overrides."""
    overrides = [
        f"model.name={tiny_model_dir}",
        "model.accelerator=cpu",
        "judge.backend=embedding",  # mechanics on a 4-sample persona; the offline judge has its own tests
        f"cache_dir={tmp_path / 'cache'}",
        f"steering.trait_vector_dir={tmp_path / 'vectors'}",
        f"optimize.save_dir={tmp_path / 'runs'}",
        "traits=[T1, T2]",
    ]
    cfg = load_config(None, overrides)
    ident = identify(cfg.model)
    write_fake_vectors(tmp_path / "vectors" / ident.slug, ident.fingerprint, ident.model_id, TRAITS)
    basis = load_basis(tmp_path / "vectors", ident.slug, TRAITS, 2, fingerprint=ident.fingerprint)
    result = {
        "persona_id": "p1",
        "layer": 2,
        "alpha": 0.75,
        "selected": "mean",
        "weights": {"T1": 1.25, "T2": -0.5},  # the served search mean: what is exported
        "best_weights": {"T1": 2.0, "T2": 1.0},
        "traits": TRAITS,
        "num_evaluations": 16,
        "residual_scale": basis.scale,
        "vector_method": "mean_diff",
        "config": cfg.to_dict(),
    }
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "p1_optimization.json").write_text(json.dumps(result))
    return overrides, tmp_path


def test_round_trip_keys_dtype_values_exact(tmp_path: Path) -> None:
    vectors = {5: torch.randn(16), 9: torch.randn(16)}
    path = write_control_vector(tmp_path / "cv.gguf", vectors, "llama")
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    count = reader.get_field("controlvector.layer_count")
    assert count.contents() == 2 and count.types == [gguf.GGUFValueType.UINT32]
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"direction.4", "direction.8"}
    for row, vec in vectors.items():
        t = tensors[f"direction.{row - 1}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.data.dtype == np.float32
        assert np.array_equal(np.asarray(t.data).reshape(-1), vec.numpy())
    back = read_control_vector(path)
    assert list(back) == [5, 9]
    for row, vec in vectors.items():
        assert back[row].dtype == torch.float32 and torch.equal(back[row], vec)
    assert not list(tmp_path.glob(".*tmp")), "no temp file left beside the output"


def test_layer_index_rule() -> None:
    assert block_index(2) == 1 and block_index(20) == 19
    with pytest.raises(LayerError, match="llama.cpp refuses direction.0"):
        block_index(1)
    with pytest.raises(LayerError):
        block_index(0)


def test_reads_repeng_style_file(tmp_path: Path) -> None:
    """repeng writes the same keys, several layers at once, through GGUFWriter."""
    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(path, arch="controlvector")
    writer.add_string("controlvector.model_hint", "mistral")
    writer.add_uint32("controlvector.layer_count", 3)
    for n in (3, 4, 5):
        writer.add_tensor(f"direction.{n}", np.full(8, n, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    back = read_control_vector(path)
    assert sorted(back) == [4, 5, 6] and torch.equal(back[4], torch.full((8,), 3.0))


def test_not_a_control_vector_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(VectorFileError, match="not a readable GGUF"):
        read_control_vector(bad)
    assert main(["import-gguf", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]


def test_export_persona_and_steering_parity(exported: tuple[list[str], Path], tiny_rt, capsys) -> None:
    overrides, tmp_path = exported
    out = tmp_path / "export"
    args = [
        "export-gguf",
        *sum((["--set", o] for o in overrides), []),
        "--persona-id",
        "p1",
        "--out-dir",
        str(out),
    ]
    assert main(args) == 0
    path = out / "p1.gguf"
    assert f"wrote {path}" in capsys.readouterr().out
    cfg = load_config(None, overrides)
    basis = load_basis(  # the basis the record's config names (the default, orthogonal)
        cfg.steering.trait_vector_dir,
        tiny_rt.slug,
        TRAITS,
        2,
        fingerprint=tiny_rt.fingerprint,
        kind=cfg.steering.basis,
    )
    original = basis.deltas(torch.tensor([1.25, -0.5]), 0.75)[0]  # [hidden]
    ((row, vector),) = read_control_vector(path).items()
    assert row == 2 and gguf.GGUFReader(path).get_field("controlvector.model_hint").contents() == "llama"
    assert torch.equal(vector, original)

    ids = tiny_rt.tokenizer(["hello how was your day ?"], return_tensors="pt")["input_ids"]
    # What llama.cpp does with the file, done by hand: add direction.N to the output of block N at
    # every position. It must equal our steering at the optimised layer with positions "all".
    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in gguf.GGUFReader(path).tensors}
    ((name, direction),) = tensors.items()
    block = int(name.split(".")[1])

    def add_direction(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        moved = hidden + torch.from_numpy(direction).to(hidden.dtype)
        return (moved, *output[1:]) if isinstance(output, tuple) else moved

    handle = tiny_rt.model.model.layers[block].register_forward_hook(add_direction)
    try:
        with torch.no_grad():
            by_hand = tiny_rt.model(input_ids=ids).logits
    finally:
        handle.remove()
    with torch.no_grad(), steer(tiny_rt.model, basis.layer, original[None], positions="all"):
        ours = tiny_rt.model(input_ids=ids).logits
    torch.testing.assert_close(by_hand, ours, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(ours, tiny_rt.model(input_ids=ids).logits)  # the vector does something

    # Single traits: one file each, weight times the one-hot delta of the same basis.
    assert main([*args, "--single-traits", "T2", "--weight", "2"]) == 0
    single = read_control_vector(out / "p1_T2.gguf")[2]
    torch.testing.assert_close(single, basis.deltas(torch.tensor([0.0, 2.0]), 0.75)[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layer", "1", "--single-traits", "T1"], "cannot be exported: llama.cpp refuses direction.0"),
        (["--persona-id", "nobody"], "no optimisation result"),
        (["--persona-id", "p1", "--single-traits", "T9"], "--single-traits names T9"),
        ([], "needs --persona-id"),
    ],
)
def test_export_user_errors_one_line(exported, capsys, extra, message) -> None:
    overrides, tmp_path = exported
    code = main(
        ["export-gguf", *sum((["--set", o] for o in overrides), []), "--out-dir", str(tmp_path / "x"), *extra]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x").exists()


def test_export_refuses_a_result_whose_vectors_changed(exported, capsys) -> None:
    overrides, tmp_path = exported
    path = tmp_path / "runs" / "p1_optimization.json"
    result = json.loads(path.read_text())
    path.write_text(json.dumps({**result, "residual_scale": result["residual_scale"] * 1.01}))
    args = ["export-gguf", *sum((["--set", o] for o in overrides), []), "--out-dir", str(tmp_path / "x")]
    assert main([*args, "--persona-id", "p1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "trait vectors or the model changed since" in err[0] and "residual scale" in err[0]
    )
    path.write_text(json.dumps({k: v for k, v in result.items() if k != "num_evaluations"}))
    assert main([*args, "--persona-id", "p1"]) == 2
    assert "missing field 'num_evaluations'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
