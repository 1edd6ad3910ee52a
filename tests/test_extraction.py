"""The vectors stage end to end on the tiny model: files, shapes, warm re-run, invalidation."""

from pathlib import Path

import pytest
import torch
from tests_helpers import write_trait

from persona_steering.config import load_config
from persona_steering.extraction import run_vectors
from persona_steering.store import load_vectors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tiny_cfg(tmp_path, tiny_model_dir):
    traits = tmp_path / "traits"
    write_trait(
        traits,
        "T1",
        "be formal and warm",
        "be casual and cold",
        ["how was your weekend ?", "what should i cook ?", "tell me a story"],
    )
    write_trait(traits, "T2", "talk about me", "talk about you", ["hello !", "how was work today ?"])
    return load_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            "model.accelerator=cpu",
            f"cache_dir={tmp_path / 'cache'}",
            f"vectors.trait_dir={traits}",
            f"vectors.out_dir={tmp_path / 'runs'}",
            "vectors.traits=[T1, T2]",
            "generation.max_new_tokens=6",
        ],
    )


def test_vectors_stage_writes_every_layer_and_method(tiny_cfg):
    results = run_vectors(tiny_cfg, log=lambda *_: None)
    assert [r.trait for r in results] == ["T1", "T2"]
    assert not any(r.skipped for r in results)
    vf = load_vectors(results[0].path, hidden_size=32)
    names = {
        f"{m}.{s}" for m in ("mean_diff", "svd", "pca") for s in ("response_avg", "prompt_avg", "prompt_last")
    }
    assert names <= set(vf.tensors)
    for name in names:
        assert vf.tensors[name].shape == (4, 32)  # 3 layers + embeddings
        assert torch.isfinite(vf.tensors[name]).all()
    assert vf.tensors["norm.response_avg"].shape == (4,)
    assert vf.meta["pairs_kept"] == 6 and vf.meta["questions"] == 3  # 3 questions x 2 rotating pairs
    assert vf.meta["hidden_size"] == 32 and vf.meta["num_layers"] == 3
    assert len(vf.meta["config_digest"]) == 16 and vf.meta["fingerprint"]
    # svd/pca are sign-aligned with mean_diff at every row that has a contrast
    md, svd = vf.tensors["mean_diff.response_avg"], vf.tensors["svd.response_avg"]
    assert ((md * svd).sum(-1)[1:] >= 0).all()


def test_warm_rerun_loads_no_model_and_changes_nothing(tiny_cfg, monkeypatch):
    first = run_vectors(tiny_cfg, log=lambda *_: None)
    stamps = {r.path: Path(r.path).stat().st_mtime_ns for r in first}

    def no_load(*args, **kwargs):
        raise AssertionError("a warm re-run must not load the model")

    monkeypatch.setattr("persona_steering.extraction.load_runtime", no_load)
    again = run_vectors(tiny_cfg, log=lambda *_: None)
    assert all(r.skipped for r in again)
    assert {r.path: Path(r.path).stat().st_mtime_ns for r in again} == stamps


def test_deleted_file_regenerates_from_cache_without_generation(tiny_cfg, monkeypatch):
    first = run_vectors(tiny_cfg, log=lambda *_: None)
    before = load_vectors(first[0].path).tensors["mean_diff.response_avg"]
    Path(first[0].path).unlink()
    import persona_steering.generation as generation

    def no_decode(*args, **kwargs):
        raise AssertionError("cached answers must not be generated again")

    monkeypatch.setattr(generation, "_generate_batch", no_decode)
    again = run_vectors(tiny_cfg, log=lambda *_: None)
    assert not again[0].skipped and again[1].skipped
    torch.testing.assert_close(load_vectors(again[0].path).tensors["mean_diff.response_avg"], before)


def test_a_killed_runs_temp_files_go_and_a_second_run_into_the_folder_stops(tiny_cfg):
    from persona_steering.cache import LockedError, exclusive_lock

    first = run_vectors(tiny_cfg, log=lambda *_: None)
    path = Path(first[0].path)
    stale = path.parent / f".{path.name}.k1ll3d.tmp"  # what a kill between write and rename leaves
    stale.write_bytes(b"half a file")
    path.unlink()
    with exclusive_lock(path.parent / ".lock", "a vectors run"):  # another run is writing here
        with pytest.raises(LockedError, match="already running"):
            run_vectors(tiny_cfg, log=lambda *_: None)
    assert stale.exists() and not path.exists()  # the refused run touched nothing
    again = run_vectors(tiny_cfg, log=lambda *_: None)
    assert not again[0].skipped and path.exists() and not stale.exists()


def test_another_model_gets_its_own_folder(tiny_cfg, tiny_model_dir, tmp_path):
    from tests_helpers import perturbed_copy

    first = run_vectors(tiny_cfg, log=lambda *_: None)
    other = perturbed_copy(tiny_model_dir, tmp_path / "other-model")
    tiny_cfg.model.name = str(other)
    second = run_vectors(tiny_cfg, log=lambda *_: None)
    assert Path(first[0].path).parent != Path(second[0].path).parent
    assert not any(r.skipped for r in second)
    a, b = load_vectors(first[0].path), load_vectors(second[0].path)
    assert a.meta["fingerprint"] != b.meta["fingerprint"]


def test_shipped_traits_are_valid():
    from persona_steering.traits import load_traits

    traits = load_traits(REPO / "configs" / "traits", ["R1", "R2", "R3", "R4", "R5"])
    for t in traits:
        assert len(t.instructions) >= 5
        assert len(t.extract_questions) == 20 and len(t.eval_questions) == 20
        assert not set(t.extract_questions) & set(t.eval_questions)


def test_hub_model_fingerprint_is_the_same_before_and_after_its_first_download(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Artefacts of a first run (which downloads) must match every later identify()."""
    import shutil

    import huggingface_hub.constants

    from persona_steering import runtime
    from persona_steering.config import ModelConfig

    hub = tmp_path / "hub"
    snapshot = hub / "models--org--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snapshot, ignore=shutil.ignore_patterns("cache"))
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    real = runtime._hub_fingerprint
    calls = []

    def first_not_yet_downloaded(name, cfg):
        calls.append(name)
        return runtime.digest([name, cfg.revision, cfg.gguf_file]) if len(calls) == 1 else real(name, cfg)

    monkeypatch.setattr(runtime, "_hub_fingerprint", first_not_yet_downloaded)
    cfg = ModelConfig(name="org/tiny", accelerator="cpu")
    rt = runtime.load_runtime(cfg, cache_dir=tmp_path / "cache")
    assert rt.fingerprint == runtime.identify(cfg).fingerprint == real("org/tiny", cfg)
    assert len(calls) >= 2


def test_recording_on_a_cpu_takes_at_most_cpu_whole_rows_per_forward(tiny_rt):
    """max_batch null: decoding sizes batches from memory, but the CPU recording forward stays small
    (measured faster there); a number is still taken as it is. The means do not depend on it."""
    from persona_steering import extraction
    from persona_steering.generation import CPU_WHOLE_ROWS
    from persona_steering.layers import decoder_blocks

    rows = [extraction.Pair("q", "", "", f"question {i} ?", tuple(range(5, 8 + i % 5))) for i in range(40)]
    sizes: list[int] = []
    hook = decoder_blocks(tiny_rt.model)[0].register_forward_pre_hook(
        lambda m, a: sizes.append(a[0].shape[0])
    )
    try:
        auto, _ = extraction.record_activations(tiny_rt, rows, None)
        assert max(sizes) == CPU_WHOLE_ROWS and sum(sizes) == 40
        sizes.clear()
        fixed, _ = extraction.record_activations(tiny_rt, rows, 40)
        assert sizes == [40]
    finally:
        hook.remove()
    for summary in auto:
        torch.testing.assert_close(auto[summary], fixed[summary], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("leave", [True, False])
def test_activations_recorded_while_generating_equal_the_recording_pass(tiny_rt, monkeypatch, leave):
    """One pass: the activations a Recorder sums while the answers are decoded (prompt forward,
    then a token per step; rows leaving the batch or not) equal a second forward over prompt + answer,
    for rows that ended early and rows cut off at max_new_tokens alike."""
    from persona_steering import extraction
    from persona_steering.config import GenerationConfig
    from persona_steering.generation import Request, generate

    systems = ["be brief", "you are a very formal assistant who writes long letters", ""]
    reqs = [Request(q, s or None) for q in ("hello !", "what should i cook for dinner ?") for s in systems]
    gen = GenerationConfig(max_new_tokens=10, repetition_penalty=1.3, finished_rows_leave=leave)
    first = generate(tiny_rt, reqs, gen)
    # Make a token the random model emits mid-answer an end token, so rows end at different steps.
    ends = {t: {a.ids.index(t) for a in first if t in a.ids} for a in first for t in a.ids}
    end = max(ends, key=lambda t: len(ends[t]))
    eos = sorted({*([tiny_rt.model.generation_config.eos_token_id] or []), end} - {None})
    monkeypatch.setattr(tiny_rt.model.generation_config, "eos_token_id", eos)

    recorder = extraction.Recorder(tiny_rt, len(reqs))
    answers = generate(tiny_rt, reqs, gen, record=recorder)
    lengths = [len(a.ids) for a in answers]
    assert min(lengths) < 10 and max(lengths) == 10, lengths  # rows that ended and rows cut off
    assert len(set(lengths)) >= 2
    one = recorder.activations()
    assert recorder.seen.all()
    rows = [
        extraction.Pair(r.user, r.system or "", a.text, a.prompt, tuple(a.ids))
        for r, a in zip(reqs, answers, strict=True)
    ]
    two = extraction.record_rows(tiny_rt, rows, None)
    torch.testing.assert_close(one.counts, two.counts, rtol=0, atol=0)  # the same tokens counted
    for (s, a), b in zip(one.means().items(), two.means().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=s)
    for a, b in zip(one.norm_means().values(), two.norm_means().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # A row in the cache is not generated, so the recorder does not claim it.
    again = extraction.Recorder(tiny_rt, len(reqs))
    assert generate(tiny_rt, reqs[:1] * 2, gen, record=again)[0] == answers[0]
    assert again.seen.tolist() == [True] + [False] * (len(reqs) - 1)  # the repeat is not generated twice


def test_vectors_from_one_pass_equal_vectors_from_the_recording_pass(tiny_cfg, monkeypatch, tmp_path):
    """A cold vectors run records while generating and makes no second pass; the same answers from
    the cache go through the recording pass; the vector files agree within float rounding."""
    import dataclasses

    from persona_steering import extraction

    real = extraction.record_rows
    passes: list[int] = []
    monkeypatch.setattr(
        extraction,
        "record_rows",
        lambda rt, rows, *a, **k: passes.append(len(rows)) or real(rt, rows, *a, **k),
    )
    tiny_cfg = dataclasses.replace(tiny_cfg, vectors=dataclasses.replace(tiny_cfg.vectors, one_pass=True))
    cold = run_vectors(tiny_cfg, log=lambda *_: None)
    assert passes == []  # every answer was fresh: recorded while generated
    for r in cold:
        Path(r.path).rename(tmp_path / f"one-pass-{r.trait}.safetensors")
    cached = run_vectors(tiny_cfg, log=lambda *_: None)
    assert passes == [12, 8]  # every answer from the cache: the recording pass, per trait (pos + neg)
    off = dataclasses.replace(
        tiny_cfg,
        cache_dir=str(tmp_path / "cache-off"),
        vectors=dataclasses.replace(tiny_cfg.vectors, one_pass=False, out_dir=str(tmp_path / "off")),
    )
    two_pass = run_vectors(off, log=lambda *_: None)
    assert passes[2:] == [12, 8]  # cold, one_pass off: generation, then the recording pass
    for r, o in zip(cached, two_pass, strict=True):
        one = load_vectors(tmp_path / f"one-pass-{r.trait}.safetensors")
        for two in (load_vectors(r.path), load_vectors(o.path)):
            assert one.meta["inputs_digest"] == two.meta["inputs_digest"]
            assert set(one.tensors) == set(two.tensors)
            for key in two.tensors:
                torch.testing.assert_close(one.tensors[key], two.tensors[key], rtol=1e-4, atol=1e-5, msg=key)
