"""sim.stats against independent references: scipy's Wilson interval, a float64 re-derivation of Newcombe's
paired interval, its defining properties, and its coverage by simulation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from nora_edge.errors import InputError
from nora_edge.sim.stats import Z95, paired_difference, paired_table, quantiles_ms, wilson


def test_wilson_matches_scipy_for_every_k():
    compared = 0
    for n in (1, 2, 5, 10, 37, 100):
        for k in range(n + 1):
            ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
            lo, hi = wilson(k, n)
            assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12), (k, n)
            compared += 1
    assert compared == 2 + 3 + 6 + 11 + 38 + 101


def test_wilson_is_the_score_test_inversion():
    """Independent float64 route: the endpoints are the roots of (k/n - p)^2 = z^2 p (1 - p) / n."""
    compared = 0
    for n, k in itertools.product((3, 20, 50), range(0, 51, 7)):
        if k > n:
            continue
        phat, z2 = k / n, Z95**2
        roots = np.sort(np.roots([1 + z2 / n, -(2 * phat + z2 / n), phat**2]).real)
        np.testing.assert_allclose(wilson(k, n), roots, atol=1e-10)
        compared += 1
    assert compared == 1 + 3 + 8  # k <= n of 0, 7, ..., 49


@pytest.mark.parametrize("k, n", [(-1, 5), (6, 5), (0, 0), (1.0, 5), (True, 5)])
def test_wilson_rejects_bad_counts(k, n):
    with pytest.raises(InputError, match="wilson"):
        wilson(k, n)


def _newcombe10(e: int, f: int, g: int, h: int, z: float = 1.959963984540054) -> tuple[float, float, float]:
    """Newcombe (1998) paired method 10, re-derived in float64 from the paper's formulas (not sim.stats)."""
    n = e + f + g + h

    def score(x: int) -> tuple[float, float]:  # Wilson interval via the quadratic formula
        a, b, c = n + z * z, -(2 * x + z * z), x * x / n
        d = math.sqrt(b * b - 4 * a * c)
        return max(0.0, (-b - d) / (2 * a)), min(1.0, (-b + d) / (2 * a))

    p1, p2 = (e + f) / n, (e + g) / n
    (l1, u1), (l2, u2) = score(e + f), score(e + g)
    den = math.prod([e + f, g + h, e + g, f + h])
    phi = (e * h - f * g) / math.sqrt(den) if den else 0.0
    dl = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    du = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return p1 - p2, p1 - p2 - dl, p1 - p2 + du


def _flags(e: int, f: int, g: int, h: int) -> tuple[list[bool], list[bool]]:
    return [True] * (e + f) + [False] * (g + h), [True] * e + [False] * f + [True] * g + [False] * h


def test_paired_difference_matches_float64_rederivation_on_every_small_table():
    compared = 0
    for n in (1, 4, 9):
        for e, f, g in itertools.product(range(n + 1), repeat=3):
            h = n - e - f - g
            if h < 0:
                continue
            a, b = _flags(e, f, g, h)
            d = paired_difference(a, b)
            assert (d.both, d.a_only, d.b_only, d.neither) == (e, f, g, h)
            np.testing.assert_allclose([d.diff, d.low, d.high], _newcombe10(e, f, g, h), atol=1e-12)
            assert d.low <= d.diff <= d.high
            compared += 1
    assert compared == 4 + 35 + 220  # tables with n cells: C(n + 3, 3)


def test_paired_difference_is_antisymmetric_and_zero_on_identical_outcomes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.random(30) < 0.6, rng.random(30) < 0.4
        ab, ba = paired_difference(a, b), paired_difference(b, a)
        np.testing.assert_allclose([ab.diff, ab.low, ab.high], [-ba.diff, -ba.high, -ba.low], atol=1e-12)
        same = paired_difference(a, a)
        assert same.diff == 0 and same.a_only == same.b_only == 0 and same.low < 0 < same.high


def test_paired_difference_covers_the_true_difference():
    """Coverage by simulation (fixed RNG): the 95% interval holds the true difference ~95% of the time."""
    probs = np.array([0.45, 0.25, 0.10, 0.20])  # both, A only, B only, neither -> true diff 0.15
    rng = np.random.default_rng(1)
    tables = rng.multinomial(40, probs, size=2000)
    covered = 0
    for e, f, g, h in tables:
        d = paired_difference(*_flags(e, f, g, h))
        covered += d.low <= 0.15 <= d.high
    assert 0.92 <= covered / len(tables) <= 0.98, covered


def test_paired_table_rejects_mismatched_lengths():
    with pytest.raises(InputError, match="equal-length"):
        paired_table([True, False], [True])


def test_quantiles_ms_against_numpy():
    x = np.random.default_rng(2).random(101)
    q = quantiles_ms(x)
    assert q == {"n": 101, "mean": pytest.approx(x.mean() * 1e3), "median": pytest.approx(np.median(x) * 1e3),
                 "p99": pytest.approx(np.percentile(x, 99) * 1e3)}  # fmt: skip
    assert quantiles_ms([])["mean"] is None
