"""The statistical check shared by the tests of the unbiased estimators (UORO, ARTBP).

check_unbiased(draw, exact, M) draws M independent estimates (vectors) and asserts two things:

1. No coordinate's mean is off: z_j = (mean_j - exact_j) / (sd_j / sqrt(M)) for every coordinate
   with a spread (the others must equal the exact value to rounding), and max |z_j| below the
   Bonferroni threshold for a total false-alarm rate of 1e-3 under the normal approximation of a
   mean of M draws: P(max |z| > z*) <= d * 2 (1 - Phi(z*)) = 1e-3.
2. The error falls like 1/sqrt(N): for N = 4, 16, 64, the squared error of the mean of N draws,
   averaged over the M / N disjoint groups, is V / N (V the summed variance) within a factor of 2.
   Each average has at least M / N = 64 degrees of freedom; a mean of 64 unit chi-squares leaves
   [0.5, 2] with probability below 2e-4, so with the first check the false-alarm rate is below
   about 1.2e-3 (normal approximations). A biased estimator fails it: its squared error tends to
   bias^2, not V / N.
"""

from __future__ import annotations

import math

import numpy as np


def z_threshold(d: int, alpha: float = 1e-3) -> float:
    """z* with d * 2 (1 - Phi(z*)) = alpha, by bisection on erfc."""
    lo, hi = 0.0, 20.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if d * math.erfc(mid / math.sqrt(2)) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def check_unbiased(draw, exact: np.ndarray, M: int = 4096) -> dict[int, float]:
    """Assert (1) and (2) of the module docstring; returns {N: squared error / (V / N)}."""
    G = np.array([draw() for _ in range(M)])  # (M, d)
    scale = float(np.linalg.norm(exact))
    sd = G.std(axis=0, ddof=1)
    spread = sd > 1e-9 * scale
    assert np.allclose(G[:, ~spread], exact[~spread], rtol=1e-9, atol=1e-12 * scale)
    z = (G.mean(axis=0)[spread] - exact[spread]) / (sd[spread] / math.sqrt(M))
    zmax = z_threshold(int(spread.sum()))
    assert np.abs(z).max() < zmax, f"max |z| = {np.abs(z).max():.2f} >= {zmax:.2f}"
    V = float((sd**2).sum())
    ratios = {}
    for N in (4, 16, 64):
        means = G[: M // N * N].reshape(M // N, N, -1).mean(axis=1)
        ratios[N] = float(((means - exact) ** 2).sum(axis=1).mean() / (V / N))
        assert 0.5 < ratios[N] < 2, ratios
    return ratios
