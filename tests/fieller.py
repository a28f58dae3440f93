"""Fieller's 95 % interval of a ratio of sums from per-sequence totals, in numpy, as the
copy-suppression shares' intervals define it (``share_interval`` in ``views.sql``): the
reference the tests hold the SQL macro to."""

from __future__ import annotations

import math

import numpy as np


def t975(df: int) -> float:
    """Student's t 0.975 quantile with ``df`` degrees of freedom, from its distribution
    function (mpmath, which sympy brings)."""
    import mpmath

    def tail(t):
        return mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True) / 2 - 0.025
    return float(mpmath.findroot(tail, 2.0))


def fieller(x: np.ndarray, y: np.ndarray, complement: bool = False):
    """Fieller's 95 % interval of Σx/Σy (or of 1 − it) from per-sequence totals x, y
    (float64 ``[n]``, n ≥ 2), the quadratic solved as printed, t = t975(n − 1): (low, high),
    or None where the set is unbounded (Ȳ² ≤ t²·v_yy)."""
    n = len(x)
    mx, my = x.mean(), y.mean()
    cov = np.cov(x, y, ddof=1) / n
    t = t975(n - 1)
    a = my * my - t * t * cov[1, 1]
    if a <= 0:
        return None
    b = mx * my - t * t * cov[0, 1]
    c = mx * mx - t * t * cov[0, 0]
    root = math.sqrt(max(b * b - a * c, 0.0))
    low, high = (b - root) / a, (b + root) / a
    return (1 - high, 1 - low) if complement else (low, high)
