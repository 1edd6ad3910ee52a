"""Statistics for small paired samples, in numpy only: bootstrap intervals, a sign-flip test, Holm's
correction, Spearman.

Every function takes plain sequences in which a missing value is ``None`` or NaN; such values are
dropped (pairwise for the paired functions), never imputed. Randomness is seeded, so a report is
reproducible to the last digit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EXACT_MAX_N = 30
"""Up to this many pairs the sign-flip test counts all 2^n sign patterns exactly."""
_CHUNK = 1 << 16  # sign patterns per matrix product: bounds memory at 65536 x n floats


@dataclass(frozen=True)
class Interval:
    """A sample mean with a bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class PairedTest:
    """Mean of ``a - b`` over the pairs where both are present, and its two-sided p-value."""

    diff: float
    p: float
    n: int
    exact: bool


def clean(values: Sequence[float | None]) -> np.ndarray:
    """The finite values as float64 (None and NaN dropped)."""
    arr = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    return arr[np.isfinite(arr)]


def bootstrap_interval(
    values: Sequence[float | None], resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Interval | None:
    """Percentile bootstrap interval of the mean; None when no value is present.

    Args:
        values: one score per prompt; None or NaN where a verdict is missing.
        resamples: bootstrap resamples.
        confidence: coverage, e.g. 0.95.
        seed: seed of the resampling generator.
    """
    x = clean(values)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))  # [resamples, n]
    means = x[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    mean = float(x.mean())
    # Quantiles of means are averages too: clamp the last-bit rounding that can put the mean outside.
    return Interval(mean, min(float(low), mean), max(float(high), mean), int(x.size))


def paired(a: Sequence[float | None], b: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """The pairs where both values are finite, as two float64 arrays."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    x = np.array([math.nan if v is None else float(v) for v in a], dtype=np.float64)
    y = np.array([math.nan if v is None else float(v) for v in b], dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def sign_flip_test(
    a: Sequence[float | None], b: Sequence[float | None], permutations: int = 20000, seed: int = 0
) -> PairedTest | None:
    """Two-sided paired permutation test of mean(a - b) = 0 by flipping the signs of differences.

    Under the null hypothesis each difference is as likely to have either sign, so the observed
    |mean difference| is compared with its distribution over sign patterns: all 2^n of them when
    n <= EXACT_MAX_N, else ``permutations`` random ones (with the +1 correction that keeps a Monte
    Carlo p-value valid). Identical samples give p = 1; None when no pair is complete.
    """
    x, y = paired(a, b)
    d = x - y
    n = int(d.size)
    if n == 0:
        return None
    observed = abs(d.mean())
    # Equal sums may differ in the last bits depending on summation order: count them as ties.
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if n <= EXACT_MAX_N:
        hits = _exact_hits(d, observed - tol)
        return PairedTest(float(d.mean()), hits / 2**n, n, True)
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, permutations, _CHUNK):
        size = min(_CHUNK, permutations - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(size, n))
        hits += int((np.abs(signs @ d) / n >= observed - tol).sum())
    return PairedTest(float(d.mean()), (hits + 1) / (permutations + 1), n, False)


def _exact_hits(d: np.ndarray, threshold: float) -> int:
    """How many of the 2^n sign patterns give |mean| >= threshold, by meeting in the middle.

    Enumerating 2^20 patterns directly takes most of a second per test; instead the signed sums of
    each half (2^(n/2) each) are combined by sorting one half and counting with binary search.
    """
    n = d.size
    if threshold <= 0:
        return 2**n  # every pattern reaches a non-positive threshold
    target = threshold * n  # |sum| >= target  <=>  |mean| >= threshold
    left = _signed_sums(d[: n // 2])
    right = np.sort(_signed_sums(d[n // 2 :]))
    # With target > 0 the two tails are disjoint: no pattern is counted twice.
    upper = right.size - np.searchsorted(right, target - left, side="left")  # left + right >= target
    lower = np.searchsorted(right, -target - left, side="right")  # left + right <= -target
    return int(upper.sum() + lower.sum())


def _signed_sums(v: np.ndarray) -> np.ndarray:
    """sum_i s_i v_i for all 2^m sign patterns s of the m values: [2^m]."""
    codes = np.arange(2**v.size, dtype=np.int64)
    signs = ((codes[:, None] >> np.arange(v.size, dtype=np.int64)) & 1) * 2.0 - 1.0  # [2^m, m]
    return signs @ v


def holm(ps: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values for one family of tests; None stays None and is not counted.

    With the m present p-values sorted, p_(1) <= ... <= p_(m), the adjusted value of p_(i) is
    max over j <= i of min(1, (m - j + 1) * p_(j)): rejecting where it is below a level controls the
    family-wise error rate at that level under any dependence between the tests.
    """
    present = [(float(p), i) for i, p in enumerate(ps) if p is not None and math.isfinite(p)]
    m = len(present)
    out: list[float | None] = [None] * len(ps)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span (as Spearman's rho needs)."""
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    out = np.empty(values.size, dtype=np.float64)
    start = 0
    while start < values.size:
        end = start
        while end + 1 < values.size and sorted_vals[end + 1] == sorted_vals[start]:
            end += 1
        out[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(a: Sequence[float | None], b: Sequence[float | None]) -> tuple[float | None, int]:
    """Spearman's rank correlation over complete pairs, and how many pairs it rests on.

    None when fewer than 3 pairs remain or either side is constant (the correlation is undefined
    there, and reporting 0 would claim a disagreement nobody measured).
    """
    x, y = paired(a, b)
    n = int(x.size)
    if n < 3:
        return None, n
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    if denom == 0:
        return None, n
    return float((rx * ry).sum() / denom), n
