"""Success-rate statistics for closed-loop evaluation.

Data flow: per-episode success flags --:func:`wilson`--> a 95% score interval for one policy's success rate;
two policies' flags on the SAME (task, seed) episodes --:func:`paired_difference`--> the difference of their
success rates with a 95% interval for paired data, plus the discordant counts.

Sources:
- Wilson score interval: E. B. Wilson (1927), "Probable inference, the law of succession, and statistical
  inference", JASA 22:209-212; the form used here is Newcombe (1998a) "Two-sided confidence intervals for the
  single proportion: comparison of seven methods", Statistics in Medicine 17:857-872, method 3 (no continuity
  correction); it equals ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``.
- Paired difference: R. G. Newcombe (1998b), "Improved confidence intervals for the difference between
  binomial proportions based on paired data", Statistics in Medicine 17:2635-2650, method 10 (score-based,
  Wilson intervals for each marginal rate combined with the phi correlation of the paired table, no
  continuity correction).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from nora_edge.errors import InputError

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the success rate k / n.

    Args:
        k: successes, 0 <= k <= n; n: trials (n >= 1); z: normal quantile (95%: 1.96).

    Returns:
        (low, high) within [0, 1].

    Raises:
        InputError: n < 1, k outside [0, n], or non-integers.
    """
    for name, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InputError(f"wilson: {name} must be an int, got {v!r}")
    if n < 1 or not 0 <= k <= n:
        raise InputError(f"wilson: need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo, hi = centre - half, centre + half
    # exact endpoints at the boundaries (rounding would otherwise leave e.g. 1e-17 instead of 0)
    return (0.0 if k == 0 else max(0.0, lo)), (1.0 if k == n else min(1.0, hi))


@dataclass(frozen=True)
class PairedDifference:
    """Success rate of A minus that of B over the same n episodes.

    Attributes:
        n: paired episodes; both, a_only, b_only, neither: the 2x2 table (a_only + b_only are the discordant
        pairs); rate_a, rate_b: success rates; diff: rate_a - rate_b; low, high: the 95% interval of diff
        (Newcombe 1998b method 10); method: its name.
    """

    n: int
    both: int
    a_only: int
    b_only: int
    neither: int
    rate_a: float
    rate_b: float
    diff: float
    low: float
    high: float
    method: str = "newcombe-1998-method-10"

    def to_json(self) -> dict:
        return asdict(self)


def paired_table(a, b) -> tuple[int, int, int, int]:
    """(both, a_only, b_only, neither) counts of two equal-length bool sequences.

    Raises:
        InputError: different lengths or empty.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise InputError(
            f"paired outcomes must be two equal-length non-empty 1-D lists, got {a.shape}, {b.shape}"
        )
    return int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()), int((~a & ~b).sum())


def paired_difference(a, b, z: float = Z95) -> PairedDifference:
    """Difference of success rates of two policies on the same episodes, with Newcombe's paired interval.

    With the table (e = both, f = A only, g = B only, h = neither), n = e + f + g + h:
    ``theta = (f - g) / n``; (l1, u1), (l2, u2) are the Wilson intervals of p1 = (e + f) / n and
    p2 = (e + g) / n; ``phi = (e h - f g) / sqrt((e + f)(g + h)(e + g)(f + h))`` (0 when a margin is 0);
    ``low = theta - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)``,
    ``high = theta + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)``.

    Args:
        a, b: (n,) bool per episode, in the same episode order.
        z: normal quantile.

    Returns:
        :class:`PairedDifference`.
    """
    e, f, g, h = paired_table(a, b)
    n = e + f + g + h
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = wilson(e + f, n, z)
    l2, u2 = wilson(e + g, n, z)
    margins = (e + f) * (g + h) * (e + g) * (f + h)
    phi = 0.0 if margins == 0 else (e * h - f * g) / math.sqrt(margins)
    theta = (f - g) / n
    d_lo = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    d_hi = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    low = max(-1.0, theta - math.sqrt(max(d_lo, 0.0)))
    high = min(1.0, theta + math.sqrt(max(d_hi, 0.0)))
    return PairedDifference(n, e, f, g, h, p1, p2, theta, low, high)


def quantiles_ms(seconds) -> dict:
    """mean / median / p99 (milliseconds) and count of a list of durations in seconds (None when empty)."""
    x = np.asarray(list(seconds), dtype=np.float64) * 1e3
    if x.size == 0:
        return {"n": 0, "mean": None, "median": None, "p99": None}
    return {"n": int(x.size), "mean": float(x.mean()), "median": float(np.median(x)),
            "p99": float(np.percentile(x, 99))}  # fmt: skip
