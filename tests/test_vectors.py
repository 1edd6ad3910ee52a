"""Vector maths on planted signals: the methods recover a known direction with the right sign."""

import pytest
import torch

from persona_steering.vectors import DIRECTIONS, combine, cosine_matrix, mean_diff, svd_direction, unit


def planted(n: int = 64, hidden: int = 48, layers: int = 3, strength: float = 3.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    direction = unit(torch.randn(layers, hidden, generator=g))
    base = torch.randn(n, layers, hidden, generator=g) * 0.5
    spread = (1 + torch.rand(n, 1, 1, generator=g)) * strength
    pos = base + spread * direction + 0.3 * torch.randn(n, layers, hidden, generator=g)
    neg = base - spread * direction + 0.3 * torch.randn(n, layers, hidden, generator=g)
    return pos, neg, direction


@pytest.mark.parametrize("method", sorted(DIRECTIONS))
def test_methods_recover_planted_direction_with_sign(method):
    pos, neg, direction = planted()
    vec = DIRECTIONS[method](pos, neg)  # [layers, hidden]
    assert vec.shape == direction.shape
    cos = (unit(vec) * direction).sum(-1)
    assert torch.all(cos > 0.97), cos
    # Swapping the classes flips the sign.
    flipped = DIRECTIONS[method](neg, pos)
    assert torch.all((unit(flipped) * direction).sum(-1) < -0.97)


@pytest.mark.parametrize("method", ["svd", "pca"])
def test_directions_scaled_to_mean_diff_projection(method):
    pos, neg, _ = planted(seed=1)
    vec = DIRECTIONS[method](pos, neg)
    md = mean_diff(pos, neg)
    torch.testing.assert_close((md * unit(vec)).sum(-1), vec.norm(dim=-1), rtol=1e-4, atol=1e-4)


def test_pair_centred_pca_equals_svd_of_differences():
    pos, neg, _ = planted(seed=2)
    mid = (pos + neg) / 2
    centred = torch.cat([pos - mid, neg - mid]).movedim(0, -2)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    cos = (vh[..., 0, :] * unit(svd_direction(pos, neg))).sum(-1).abs()
    torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-4, rtol=0)


def test_inputs_are_not_mutated():
    pos, neg, _ = planted(seed=3)
    before = (pos.clone(), neg.clone())
    for fn in DIRECTIONS.values():
        fn(pos, neg)
    assert torch.equal(pos, before[0]) and torch.equal(neg, before[1])


def test_combine_is_linear_and_batched():
    vecs = torch.randn(5, 16)
    w = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.25])
    torch.testing.assert_close(combine(vecs, w), sum(w[i] * vecs[i] for i in range(5)))
    batch = torch.stack([w, 2 * w])
    torch.testing.assert_close(combine(vecs, batch)[1], 2 * combine(vecs, w))
    assert torch.equal(combine(vecs, torch.zeros(5)), torch.zeros(16))


def test_cosine_matrix_and_mismatched_shapes():
    v = torch.randn(3, 8)
    c = cosine_matrix(v)
    torch.testing.assert_close(torch.diag(c), torch.ones(3))
    with pytest.raises(ValueError, match="differ in shape"):
        mean_diff(torch.zeros(2, 4), torch.zeros(3, 4))
