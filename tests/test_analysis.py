"""project and monitor on the tiny model: parity with a plain hidden_states reference, the second
model's shift (zero for the same model), steering seen by the monitor, colours, and bad input."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tests_helpers import write_trait

from persona_steering.basis import load_basis
from persona_steering.cli import main
from persona_steering.config import MonitorConfig, SteerConfig, load_config
from persona_steering.extraction import run_vectors
from persona_steering.generation import Request, chat_text
from persona_steering.monitor import NEGATIVE, NEUTRAL, POSITIVE, MonitorSettings, render_tokens, run_monitor
from persona_steering.runtime import identify, load_runtime
from persona_steering.store import load_vectors
from persona_steering.vectors import unit

ROWS = [
    {
        "prompt": "how was your weekend ?",
        "answer": "i went to the park with my family",
        "system": "",
        "id": "1",
    },
    {"prompt": "what should i cook ?", "answer": "you should cook dinner", "system": "be formal", "id": "2"},
    {"prompt": "hello !", "answer": "", "system": "", "id": "3"},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    """Two traits with vectors for the tiny model; returns (root, config overrides)."""
    root = tmp_path_factory.mktemp("analysis")
    traits = root / "traits"
    write_trait(
        traits, "T1", "be formal and warm", "be casual and cold", ["how was your weekend ?", "hello !"]
    )
    write_trait(
        traits, "T2", "talk about me", "talk about you", ["what should i cook ?", "how was work today ?"]
    )
    overrides = [
        f"model.name={tiny_model_dir}",
        "model.accelerator=cpu",
        "judge.backend=embedding",  # mechanics on a 4-sample persona; the offline judge has its own tests
        f"cache_dir={root / 'cache'}",
        f"vectors.trait_dir={traits}",
        f"vectors.out_dir={root / 'vectors'}",
        "vectors.traits=[T1, T2]",
        "traits=[T1, T2]",
        f"steering.trait_vector_dir={root / 'vectors'}",
        "steering.layer=2",
        "steering.alpha=2.0",
        "generation.max_new_tokens=6",
    ]
    run_vectors(load_config(None, overrides), log=lambda *_: None)
    return root, overrides


def cli(overrides: list[str], *args: str) -> int:
    return main([args[0], *sum((["--set", o] for o in overrides), []), *args[1:]])


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def unit_vector(root: Path, cfg_model, trait: str, row: int) -> torch.Tensor:
    ident = identify(cfg_model)
    vf = load_vectors(root / "vectors" / ident.slug / f"{trait}.safetensors")
    return unit(vf.vector("mean_diff", "response_avg", row).float())


@torch.inference_mode()
def reference(
    rt, prompt: str, answer: str, system: str | None, row: int, u: torch.Tensor
) -> dict[str, float | None]:
    """The three projections from one unpadded forward with output_hidden_states (row < num_layers)."""
    p = rt.tokenizer(chat_text(rt.tokenizer, Request(prompt, system)), add_special_tokens=False)["input_ids"]
    a = rt.tokenizer(answer, add_special_tokens=False)["input_ids"]
    hs = rt.model(torch.tensor([p + a]), output_hidden_states=True).hidden_states[row][0]  # [seq, hidden]
    n = len(p)
    return {
        "proj": float(hs[n:].mean(0) @ u) if a else None,
        "prompt_last_proj": float(hs[n - 1] @ u),
        "prompt_avg_proj": float(hs[1:n].mean(0) @ u),
    }


# --- project ------------------------------------------------------------------------------------------


def test_project_matches_a_hidden_states_reference_for_csv_and_jsonl(project, tmp_path, capsys):
    root, overrides = project
    source = write_csv(tmp_path / "answers.csv", ROWS)
    assert cli(overrides, "project", str(source), "--layers", "1,2") == 0
    out = read_csv(tmp_path / "answers_projections.csv")
    cfg = load_config(None, overrides)
    rt = load_runtime(cfg.model, cfg.cache_dir)
    suffixes = ("proj", "prompt_last_proj", "prompt_avg_proj")
    expected = ["prompt", "answer", "system", "id"] + [
        f"{t}_L{r}_{s}" for t in ("T1", "T2") for r in (1, 2) for s in suffixes
    ]
    assert list(out[0]) == expected
    for given, row in zip(ROWS, out, strict=True):
        assert row["id"] == given["id"] and row["answer"] == given["answer"]
        for trait in ("T1", "T2"):
            for layer in (1, 2):
                ref = reference(
                    rt,
                    given["prompt"],
                    given["answer"],
                    given["system"] or None,
                    layer,
                    unit_vector(root, cfg.model, trait, layer),
                )
                for suffix in suffixes:
                    value = row[f"{trait}_L{layer}_{suffix}"]
                    if ref[suffix] is None:
                        assert value == ""  # an empty answer has no response average: no number is made up
                    else:
                        assert float(value) == pytest.approx(ref[suffix], rel=1e-4, abs=1e-6)
    meta = json.loads((tmp_path / "answers_projections.json").read_text())
    assert meta["layers"] == [1, 2] and meta["rows"] == 3 and meta["traits"] == ["T1", "T2"]
    table = (tmp_path / "answers_projections.md").read_text()
    assert "| T2_L2_proj | 2 |" in table and table in capsys.readouterr().out
    # The same rows as JSONL with 'question' instead of 'prompt' give the same numbers.
    jsonl = tmp_path / "answers.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"question": r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}}) + "\n"
            for r in ROWS
        )
    )
    assert cli(overrides, "project", str(jsonl), "--layers", "1,2", "--out", str(tmp_path / "j.csv")) == 0
    again = read_csv(tmp_path / "j.csv")
    for a, b in zip(out, again, strict=True):
        assert {k: v for k, v in a.items() if k.startswith("T")} == {
            k: v for k, v in b.items() if k.startswith("T")
        }


def perturbed_model(src: Path, dst: Path) -> Path:
    """A copy of the tiny model with moved embeddings (tests_helpers.perturbed_copy moves the LM head,
    which changes no hidden state)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache"))
    tensors = load_file(dst / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    noise = torch.randn(embed.shape, generator=torch.Generator().manual_seed(0))
    tensors["model.embed_tokens.weight"] = embed + 0.05 * noise
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_compare_model_shift_is_zero_for_the_same_model_and_exact_for_another(
    project, tmp_path, tiny_model_dir
):
    root, overrides = project
    source = write_csv(tmp_path / "answers.csv", ROWS[:2])
    assert cli(overrides, "project", str(source), "--compare-model", str(tiny_model_dir)) == 0
    same = read_csv(tmp_path / "answers_projections.csv")
    for row in same:
        for trait in ("T1", "T2"):
            col = f"{trait}_L2_proj"
            assert row[f"compare_{col}"] == row[col] and float(row[f"shift_{col}"]) == 0.0
    other = perturbed_model(tiny_model_dir, tmp_path / "other-model")
    assert cli(overrides, "project", str(source), "--compare-model", str(other)) == 0
    shifted = read_csv(tmp_path / "answers_projections.csv")
    moved = 0
    for row in shifted:
        for col in [c for c in row if c.startswith("T")]:
            shift = float(row[f"shift_{col}"])
            assert shift == pytest.approx(float(row[f"compare_{col}"]) - float(row[col]), rel=1e-4, abs=1e-5)
            moved += shift != 0.0
    assert moved > 0
    table = (tmp_path / "answers_projections.md").read_text()
    assert "shift mean" in table and "other-model" in table


def test_project_bad_input_is_one_line_and_writes_nothing(project, tmp_path, capsys):
    root, overrides = project
    bad = write_csv(tmp_path / "bad.csv", [{"prompt": "hello !", "reply": "hi"}])
    good = write_csv(tmp_path / "good.csv", ROWS[:1])
    cases = [
        ([str(bad)], "needs an 'answer' string"),
        ([str(good), "--layers", "9"], "layer 9 is out of range"),
        ([str(good), "--traits", "T9"], "T9.safetensors not found"),
        ([str(good), "--compare-model", str(tmp_path / "no-model")], "no-model not found"),
        ([str(good), "--out", str(tmp_path / "x.txt")], "must be a .csv file"),
        ([str(tmp_path / "answers.txt")], "file not found"),
    ]
    for args, message in cases:
        assert cli(overrides, "project", *args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "good.csv"]


# --- monitor ----------------------------------------------------------------------------------------


@torch.inference_mode()
def test_monitor_values_are_the_states_that_chose_each_token(project, tmp_path):
    root, overrides = project
    cfg = load_config(None, overrides + ["steering.basis=traits"])  # steering T1 moves along T1 itself
    monitored = MonitorConfig(trait="T1", read_layer=2, out_dir=str(tmp_path))
    cfg = replace(cfg, monitor=monitored, steer=SteerConfig(prompt="how was your weekend ?"))
    settings = MonitorSettings.from_config(cfg)
    assert (settings.trait, settings.layer, settings.weights) == ("T1", 2, {})
    result = run_monitor(cfg, log=lambda *_: None)
    assert result.ids and len(result.values) == len(result.ids) == len(result.tokens)
    rt = load_runtime(cfg.model, cfg.cache_dir)
    prompt = rt.tokenizer(chat_text(rt.tokenizer, Request(settings.prompt)), add_special_tokens=False)[
        "input_ids"
    ]
    hs = rt.model(torch.tensor([prompt + result.ids]), output_hidden_states=True).hidden_states[2][0]
    n = len(prompt)
    u = unit_vector(root, cfg.model, "T1", 2)
    expected = (hs[n - 1 : n - 1 + len(result.ids)] @ u).tolist()  # token t is chosen at position t-1
    assert result.values == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert "".join(result.tokens).strip() == result.answer
    assert Path(result.png).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(Path(result.json).read_text())
    assert saved["values"] == result.values and saved["ids"] == result.ids

    # Steering T1 at the read layer: the first state (the last prompt token, the same input either way)
    # moves along the read direction by exactly alpha * scale * (steering direction . read direction).
    steered = run_monitor(
        replace(cfg, steer=SteerConfig(weights="T1=1.0", prompt=settings.prompt)), log=lambda *_: None
    )
    basis = load_basis(root / "vectors", rt.slug, ["T1", "T2"], 2)
    shift = float(basis.deltas(torch.tensor([1.0, 0.0]), 2.0)[0] @ u)
    assert steered.values[0] - result.values[0] == pytest.approx(shift, rel=1e-4)
    assert shift == pytest.approx(2.0 * basis.scale, rel=1e-5)  # the read direction is T1's own


def test_monitor_cli_prints_values_without_a_terminal_and_colours(project, tmp_path, capsys):
    root, overrides = project
    code = cli(overrides, "monitor", "--trait", "T2", "--prompt", "hello !", "--out-dir", str(tmp_path))
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "\x1b" not in "\n".join(lines)  # captured stdout is not a terminal: plain text
    values = [float(line.split()[0]) for line in lines if line.startswith(" ") and "'" in line]
    assert values and len(list(tmp_path.glob("T2_L2_*.png"))) == 1
    saved = json.loads(next(tmp_path.glob("T2_L2_*.json")).read_text())
    assert [round(v, 4) for v in saved["values"]] == values

    line = render_tokens(["a", "b", "c"], [2.0, -2.0, 0.0], color=True)
    assert f"48;2;{';'.join(map(str, POSITIVE))}ma" in line
    assert f"48;2;{';'.join(map(str, NEGATIVE))}mb" in line
    assert f"48;2;{';'.join(map(str, NEUTRAL))}mc" in line
    half = render_tokens(["x", "y"], [4.0, -2.0], color=True)
    assert "48;2;225;142;142my" in half  # half of the peak: halfway from grey to red


def test_monitor_bad_input(project, tmp_path, capsys):
    root, overrides = project
    cases = [
        (["--trait", "T1", "--prompt", "hi", "--weights", "T9=1"], "--weights names T9"),
        (["--trait", "T1", "--prompt", "hi", "--weights", "T1=x"], "must look like R2=1.0"),
        (["--trait", "T1"], "needs --trait NAME and --prompt TEXT"),
        (["--trait", "T1", "--prompt", "hi", "--read-layer", "7"], "layer 7 is out of range"),
    ]
    for args, message in cases:
        assert cli(overrides, "monitor", *args, "--out-dir", str(tmp_path / "m")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert not (tmp_path / "m").exists()
