"""steering.basis: the symmetric (Löwdin) orthogonalisation of the trait directions."""

import pytest
import torch
from tests_helpers import write_fake_vectors

from persona_steering.basis import load_basis
from persona_steering.config import ConfigError, load_config
from persona_steering.optimize import _run_digest
from persona_steering.traits import load_persona
from persona_steering.vectors import symmetric_orthogonalize, unit


def _correlated(k: int = 5, hidden: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(hidden, generator=g)
    return unit(torch.randn(k, hidden, generator=g) + 1.5 * shared)  # [k, hidden], cosines ~0.6


def test_rows_come_back_orthonormal():
    d = _correlated()
    assert float((d @ d.T - torch.eye(5)).abs().max()) > 0.3  # the input is far from orthonormal
    o = symmetric_orthogonalize(d)
    torch.testing.assert_close(o @ o.T, torch.eye(5), atol=1e-5, rtol=0)
    assert o.shape == d.shape and d.dtype == torch.float32


def test_orthonormal_rows_come_back_unchanged():
    q, _ = torch.linalg.qr(torch.randn(32, 5, generator=torch.Generator().manual_seed(1)))
    d = q.T.contiguous()  # [5, 32], orthonormal rows
    torch.testing.assert_close(symmetric_orthogonalize(d), d, atol=1e-5, rtol=0)


def test_it_is_the_closest_orthonormal_set_and_treats_rows_alike():
    d = _correlated(seed=2)
    o = symmetric_orthogonalize(d)
    best = float((o - d).norm())
    # Gram-Schmidt (QR) gives another orthonormal set of the same span; it is farther from d.
    q, r = torch.linalg.qr(d.T)
    gs = (q * torch.sign(torch.diagonal(r))).T  # rows signed like d's
    assert float((gs - d).norm()) > best + 1e-3
    # And so is any rotation of o within the span.
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        rot, _ = torch.linalg.qr(torch.eye(5) + 0.1 * torch.randn(5, 5, generator=g))
        assert float((rot @ o - d).norm()) >= best - 1e-5
    # Symmetric: permuting the input rows permutes the output rows (Gram-Schmidt would not).
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(symmetric_orthogonalize(d[perm]), o[perm], atol=1e-5, rtol=0)


def test_dependent_rows_are_refused():
    d = _correlated(k=3)
    with pytest.raises(ValueError, match="linearly dependent"):
        symmetric_orthogonalize(torch.cat([d, d[:1]]))


def _basis_files(tmp_path):
    fp, slug = "f" * 64, "tiny"
    write_fake_vectors(tmp_path / slug, fp, "tiny/model", ["A", "B", "C"])
    return tmp_path, slug, fp


def test_load_basis_orthogonal_keeps_span_scale_and_changes_the_digest(tmp_path):
    root, slug, fp = _basis_files(tmp_path)
    plain = load_basis(root, slug, ["A", "B", "C"], 2, fingerprint=fp)
    ortho = load_basis(root, slug, ["A", "B", "C"], 2, fingerprint=fp, kind="orthogonal")
    assert plain.kind == "traits" and ortho.kind == "orthogonal"
    torch.testing.assert_close(ortho.directions, symmetric_orthogonalize(plain.directions))
    torch.testing.assert_close(ortho.directions @ ortho.directions.T, torch.eye(3), atol=1e-5, rtol=0)
    assert ortho.scale == plain.scale
    # Same span: projecting the orthogonal rows onto the plain rows' span loses nothing.
    q, _ = torch.linalg.qr(plain.directions.T)
    torch.testing.assert_close(ortho.directions @ q @ q.T, ortho.directions, atol=1e-5, rtol=0)
    assert ortho.digest() != plain.digest()
    with pytest.raises(ConfigError, match="steering.basis"):
        load_basis(root, slug, ["A"], 2, fingerprint=fp, kind="gram")


def test_basis_option_reaches_config_digest_and_run_digest(project):
    tmp_path, overrides = project
    from persona_steering.basis import configured_basis
    from persona_steering.runtime import identify

    with pytest.raises(ConfigError, match="steering.basis must be one of traits, orthogonal"):
        load_config(None, overrides + ["steering.basis=gram"])
    plain = load_config(None, overrides + ["steering.basis=traits"])
    ortho = load_config(None, overrides)  # the default
    assert plain.digest("steering") != ortho.digest("steering")
    ident = identify(plain.model)
    persona = load_persona(plain.optimize.persona_dir, "p1")
    digests = []
    for cfg in (plain, ortho):
        basis = configured_basis(cfg.steering, cfg.traits, ident.slug, ident.fingerprint)
        assert basis.kind == cfg.steering.basis
        digests.append(_run_digest(cfg, persona, ["hi"], basis, ident.fingerprint))
    assert digests[0] != digests[1]


def test_optimize_with_orthogonal_basis_is_recorded_and_evaluate_follows_it(project):
    from persona_steering.evaluate.run import effective_config
    from persona_steering.optimize import run_optimize
    from persona_steering.record import PersonaFiles, PersonaRecord

    tmp_path, overrides = project
    cfg = load_config(None, overrides + ["steering.basis=orthogonal", "optimize.max_iterations=1"])
    run_optimize(cfg, log=lambda *_: None)
    record = PersonaRecord.require(PersonaFiles(tmp_path / "runs", "p1"))
    assert record.basis == "orthogonal"
    ident_basis = load_basis(
        tmp_path / "vectors",
        next(p.name for p in (tmp_path / "vectors").iterdir()),
        ["T1", "T2"],
        2,
        kind="orthogonal",
    )
    assert record.data["basis_digest"] == ident_basis.digest()
    notes: list[str] = []
    eff = effective_config(load_config(None, overrides + ["steering.basis=traits"]), record, notes)
    assert eff.steering.basis == "orthogonal"  # the run's basis, not the one configured now
    assert any("steering.basis = orthogonal" in n for n in notes)
