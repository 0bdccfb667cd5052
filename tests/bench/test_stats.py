"""Latency statistics against Python's statistics module (float64, linear-interpolation quantiles)."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nora_edge.bench.stats import deadline_miss_rate, jitter_ms, summarize
from nora_edge.errors import InputError

samples = st.lists(st.floats(0.001, 1e4, allow_nan=False), min_size=2, max_size=300)


@given(samples)
def test_summary_matches_statistics_module(xs):
    s = summarize(xs)
    q = statistics.quantiles(xs, n=100, method="inclusive")  # q[k-1] = k-th percentile
    assert s["n"] == len(xs)
    assert s["median"] == pytest.approx(statistics.median(xs), rel=1e-12)
    assert s["p50"] == pytest.approx(statistics.median(xs), rel=1e-12)
    for k in (25, 90, 99):
        assert s[f"p{k}"] == pytest.approx(q[k - 1], rel=1e-9, abs=1e-12)
    assert s["max"] == max(xs) and s["min"] == min(xs)
    assert s["mean"] == pytest.approx(statistics.fmean(xs), rel=1e-9)
    assert jitter_ms(s) == pytest.approx(q[98] - statistics.median(xs), rel=1e-9, abs=1e-9)


@given(samples, st.floats(0.01, 1e4))
def test_deadline_miss_rate_counts_strict_overruns(xs, deadline):
    assert deadline_miss_rate(xs, deadline) == sum(x > deadline for x in xs) / len(xs)


def test_bad_samples_are_refused():
    with pytest.raises(InputError, match="empty"):
        summarize([])
    with pytest.raises(InputError, match="NaN or inf"):
        summarize([1.0, float("nan")])
    with pytest.raises(InputError, match="deadline must be positive"):
        deadline_miss_rate(np.ones(3), 0)
