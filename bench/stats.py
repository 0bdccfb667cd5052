"""Latency statistics: percentiles of a list of samples, jitter and deadline misses.

Data flow: per-step samples in milliseconds -> :func:`summarize` -> {n, mean, median, p25, p50, p90, p99, max, min}
(numpy's linear-interpolation percentiles) -> report tables and the CI gate.
"""

from __future__ import annotations

import numpy as np

from nora_edge.errors import InputError

PERCENTILES = (25, 50, 90, 99)


def summarize(samples_ms: list[float] | np.ndarray) -> dict[str, float]:
    """Order statistics of ``samples_ms`` (milliseconds): n, mean, median, p25, p50, p90, p99, max, min.

    Raises:
        InputError: no samples, or a sample that is not finite.
    """
    x = np.asarray(samples_ms, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise InputError("cannot summarize an empty list of latency samples")
    if not np.isfinite(x).all():
        raise InputError(f"latency samples contain NaN or inf: {x[~np.isfinite(x)][:3].tolist()}")
    p = np.percentile(x, PERCENTILES)
    return {
        "n": int(x.size),
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        **{f"p{q}": float(v) for q, v in zip(PERCENTILES, p, strict=True)},
        "max": float(x.max()),
        "min": float(x.min()),
    }


def jitter_ms(summary: dict[str, float]) -> float:
    """End-to-end jitter: p99 - p50."""
    return summary["p99"] - summary["p50"]


def deadline_miss_rate(samples_ms: list[float] | np.ndarray, deadline_ms: float) -> float:
    """Fraction of samples strictly over ``deadline_ms``."""
    if not deadline_ms > 0:
        raise InputError(f"deadline must be positive, got {deadline_ms!r} ms")
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size == 0:
        raise InputError("no samples to check against the deadline")
    return float(np.mean(x > deadline_ms))
