"""Wilson score intervals for a fraction k/n (Wilson 1927; Brown, Cai & DasGupta 2001) and sample-size planning.

    centre = (p + z^2 / 2n) / (1 + z^2 / n),  half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2),  p = k / n

with z the two-sided normal quantile (1.96 for 95 %); the same as scipy's
binomtest(k, n).proportion_ci(method="wilson").  samples_to_bound(p, t) is the smallest n at which a rate
observed at p would have its upper bound below t (None when p >= t: no sample count can).
"""

from __future__ import annotations

import math
from typing import Optional

Z95 = 1.959963984540054  # scipy.stats.norm.ppf(0.975)
MAX_SAMPLES = 10**12


def wilson(k: int, n: int, z: float = Z95) -> tuple[Optional[float], Optional[float]]:
    """(lower, upper) of the Wilson score interval of k successes in n trials; (None, None) when n = 0."""
    if n <= 0:
        return None, None
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    p, z2 = k / n, z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z2 / (4 * n * n), 0.0))
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)  # exact at the ends (rounding)


def fraction_fields(name: str, k: int, n: int) -> dict:
    """{name: k/n, name_lower, name_upper, name_count: k} (None fraction and bounds when n = 0)."""
    lo, hi = wilson(k, n)
    return {name: (k / n if n else None), f"{name}_lower": lo, f"{name}_upper": hi, f"{name}_count": int(k)}


def _upper_at(p: float, n: int, z: float) -> float:
    z2 = z * z
    denom = 1.0 + z2 / n
    return (p + z2 / (2 * n)) / denom + z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))


def samples_to_bound(p: float, threshold: float, z: float = Z95) -> Optional[int]:
    """Smallest n with the Wilson upper bound of a rate observed at p (k = p n) below `threshold`; None when
    p >= threshold or threshold > 1 (nothing to bound) and when even MAX_SAMPLES do not suffice."""
    if not (0 <= p < threshold <= 1):
        return None
    lo, hi = 1, 1
    while _upper_at(p, hi, z) >= threshold:
        if hi >= MAX_SAMPLES:
            return None
        lo, hi = hi, min(hi * 2, MAX_SAMPLES)
    while lo < hi:  # the upper bound decreases in n at fixed p < threshold
        mid = (lo + hi) // 2
        if _upper_at(p, mid, z) < threshold:
            hi = mid
        else:
            lo = mid + 1
    return hi
