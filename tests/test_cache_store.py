"""The memo store and the vector files: miss then hit, failures never stored, refusals are clear."""

import json

import pytest
import torch

from persona_steering.cache import Cache, atomic_write_json, canonical_json, digest
from persona_steering.store import VectorFileError, load_vectors, save_vectors


def test_canonical_json_is_order_independent():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1})
    assert digest({"b": 1, "a": 2}) == digest({"a": 2, "b": 1})
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_cache_miss_then_hit_and_persists(tmp_path):
    key = {"model": "abc", "prompt": "hi"}
    with Cache(tmp_path) as cache:
        assert cache.get("generation", key) is None
        cache.set("generation", key, {"text": "hello"})
        assert cache.get("generation", key) == {"text": "hello"}
        assert cache.misses["generation"] == 1 and cache.hits["generation"] == 1
        assert cache.get("generation", {**key, "model": "other"}) is None
    with Cache(tmp_path) as again:  # a new process sees the same entries
        assert again.get("generation", key) == {"text": "hello"}
        assert again.count("generation") == 1


def test_cache_refuses_failures_and_treats_garbage_as_miss(tmp_path):
    with Cache(tmp_path) as cache:
        with pytest.raises(ValueError, match="never memoised"):
            cache.set("verdict", {"q": 1}, None)
        cache._store.set(cache.key("verdict", {"q": 2}), "{not json")
        assert cache.get("verdict", {"q": 2}) is None


def test_cache_has_no_eviction(tmp_path):
    with Cache(tmp_path) as cache:
        assert cache._store.eviction_policy == "none"


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = atomic_write_json(tmp_path / "a" / "x.json", {"k": 1})
    assert json.loads(path.read_text()) == {"k": 1}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_vector_file_round_trip_and_refusals(tmp_path):
    tensors = {"mean_diff.response_avg": torch.randn(4, 8), "norm.response_avg": torch.rand(4)}
    meta = {"hidden_size": 8, "fingerprint": "f" * 64, "model_id": "tiny", "trait": "R1"}
    path = save_vectors(tmp_path / "R1.safetensors", tensors, meta)
    vf = load_vectors(path, hidden_size=8, fingerprint="f" * 64)
    assert vf.meta == meta
    torch.testing.assert_close(
        vf.vector("mean_diff", "response_avg", 2), tensors["mean_diff.response_avg"][2]
    )
    with pytest.raises(VectorFileError, match="hidden size 8, but the model has 16"):
        load_vectors(path, hidden_size=16)
    with pytest.raises(VectorFileError, match="extracted from model tiny"):
        load_vectors(path, fingerprint="0" * 64)
    with pytest.raises(VectorFileError, match="no tensor 'svd.response_avg'"):
        vf.vector("svd", "response_avg", 0)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(VectorFileError, match="unreadable"):
        load_vectors(tmp_path / "bad.safetensors")


class _WritesAFile:
    """Unpickling this creates ``target``: what a malicious cache row would do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_tampered_cache_rows_holding_pickles_are_refused(tmp_path, capsys):
    import diskcache

    target = tmp_path / "pwned"
    key = {"q": 1}
    with Cache(tmp_path / "c") as cache:
        cache.set("verdict", key, {"score": 3})
        row = cache.key("verdict", key)
    # Someone with write access to cache_dir stores pickles with diskcache's default Disk.
    with diskcache.Cache(str(tmp_path / "c")) as raw:
        raw.set(row, _WritesAFile(target))  # a pickled value under a real key
        raw.set(("tuple", "key"), "x")  # a pickled key
        raw.set(_WritesAFile(target), "y")  # a pickled key that would write the file
        raw.set("big", _WritesAFile(target).__dict__ | {"pad": "x" * 70000})  # a pickle in a file
    with Cache(tmp_path / "c") as cache:
        assert cache.get("verdict", key) is None and cache.misses["verdict"] == 1
        assert cache.count("verdict") == 1 and cache.count() == 4
        assert cache.refused == 1
        cache.set("verdict", key, {"score": 4})  # recomputed and stored again as JSON
        assert cache.get("verdict", key) == {"score": 4}
    assert not target.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "treated as a miss" in err[0], err


def test_corrupt_cache_db_is_an_error_naming_the_file(tmp_path):
    from persona_steering.cache import CacheError

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cache.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CacheError, match="cache.db is not a readable cache"):
        Cache(tmp_path / "c")


def test_atomic_write_fsyncs_the_file_and_then_its_folder(tmp_path, monkeypatch):
    import os
    import stat

    synced = []
    real = os.fsync

    def recording(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    atomic_write_json(tmp_path / "sub" / "x.json", {"a": 1})
    assert synced == [False, True]  # the data, then the rename
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.endswith(".tmp")]


def test_wrong_shaped_generation_entry_is_a_miss(tiny_rt, tmp_path):
    from persona_steering.config import GenerationConfig
    from persona_steering.generation import Request, generate

    gen = GenerationConfig(max_new_tokens=4)
    with Cache(tmp_path / "c") as cache:
        [first] = generate(tiny_rt, [Request("hello !")], gen, cache=cache)
        [row] = list(cache._store.iterkeys())
        cache._store.set(row, json.dumps({"text": 5, "ids": "not a list"}))  # an edited row
        [again] = generate(tiny_rt, [Request("hello !")], gen, cache=cache)
        assert again.text == first.text and again.ids == first.ids  # generated again
        assert json.loads(cache._store.get(row)) == {"text": first.text, "ids": first.ids}  # and repaired


def test_a_row_of_the_wrong_shape_is_a_miss_that_the_caller_overwrites(tmp_path):
    from persona_steering.evaluate.models import _text_row
    from persona_steering.evaluate.sweep import _number
    from persona_steering.persona_axis import _directions_row

    with Cache(tmp_path / "c") as cache:
        cache.set("answers", "k", {"text": 5})  # e.g. an edited row
        assert cache.get("answers", "k") == {"text": 5}  # without a check it reads back as stored
        assert cache.get("answers", "k", _text_row) is None
        assert cache.misses["answers"] == 1 and cache.hits["answers"] == 1
        cache.set("answers", "k", {"text": "fine"})
        assert cache.get("answers", "k", _text_row) == {"text": "fine"}
    assert _number(1.5) and not _number("1.5") and not _number(True) and not _number([1.0])
    assert _directions_row({"mean_diff": [0.0] * 4, "pca": [1.0] * 4}, 4)
    assert not _directions_row({"mean_diff": [0.0] * 4, "pca": [1.0] * 3}, 4)
    assert not _directions_row({"mean_diff": [0.0] * 4}, 4)
