"""Influence balancing trained online by RTRL, UORO and ARTBP, through the system's own Jacobians.

The system of tbptt.analysis.influence (Tallec and Ollivier 2017): s_t = A s_{t-1} + theta v (I.1),
l_t = 1/2 (s_t[1] - 1)^2 (I.2), one scalar parameter theta, theta* = -1/6 (I.4). Its Jacobians are
dF/ds = A and dF/dtheta = v (constants), and dl_t/ds_t = (s_t[1] - 1) e_1. SEMANTICS.md 8 on it,
with theta updated by plain SGD (theta <- theta - lr g) at each method's update times:

    RTRL   (I.6)  J_t = A J_{t-1} + v,  g_t = (s_t[1] - 1) J_t[1]                   every step
    UORO   (I.7)  g_t = (s_t[1] - 1) (A^T e_1 . s~_{t-1}) theta~_{t-1} + (s_t[1] - 1) v[1]
                  s~_t = rho0 A s~_{t-1} + rho1 nu_t,
                  theta~_t = theta~_{t-1} / rho0 + (nu_t . v) / rho1
                  rho0 = sqrt((|theta~_{t-1}| + eps) / (||A s~_{t-1}|| + eps)),
                  rho1 = sqrt((|nu_t . v| + eps) / (||nu_t|| + eps))                  every step
    ARTBP  (I.8)  delta_t = (s_t[1] - 1) e_1 + w_t A^T delta_{t+1}, t in (previous cut, u],
                  g = sum_t v . delta_t,  w_t = 1 / (1 - c_L) at an uncut boundary     at every cut

Each returns tbptt.analysis.influence.Run (theta after every step, each step's loss), like
tbptt.analysis.influence.train does for TBPTT(k1, k2). The state runs on from s_0 = 1 (all ones),
never reset; a run that leaves |theta| < 1e12 is marked as diverged (theta = +-inf from there).
"""

from __future__ import annotations

import numpy as np

from ..checks import check_int, check_real
from ..generators import as_generator
from ..numpy.artbp import Cuts, check_c
from ..schedule import Truncation
from . import influence as ib

Array = np.ndarray

DIVERGED = 1e12


def _start(steps: int, lr: float, theta0: float, n: int, p: int):
    steps = check_int("steps", steps)
    check_real("lr", lr, low=0, open_low=True)
    A, v = ib.system(n, p)
    theta = np.empty(steps + 1)
    theta[0] = theta0
    return A, v, np.ones(n), theta, np.empty(steps)


def _diverged(theta: Array, err: Array, t: int) -> bool:
    th = theta[t]
    if np.isfinite(th) and abs(th) <= DIVERGED:
        return False
    theta[t:] = np.inf * np.sign(th) if not np.isnan(th) else np.nan
    err[t - 1 :] = np.inf
    return True


def _run(theta: Array, err: Array) -> ib.Run:
    # the schedule field records the nearest TBPTT (every step, whole history) for plotting only
    return ib.Run(theta=theta, loss=0.5 * err**2, truncation=Truncation(1, 1))


def train_rtrl(
    steps: int,
    lr: float = 1e-4,
    theta0: float = ib.THETA0,
    n: int = ib.N_UNITS,
    p: int = ib.N_POSITIVE,
) -> ib.Run:
    """Online RTRL (I.6), an SGD step after every step: exact online gradients."""
    A, v, s, theta, err = _start(steps, lr, theta0, n, p)
    J = np.zeros(n)  # ds_t / dtheta
    th = float(theta0)
    for t in range(1, steps + 1):
        s = A @ s + th * v  # (I.1)
        J = A @ J + v  # (I.6)
        err[t - 1] = s[0] - 1
        th -= lr * err[t - 1] * J[0]
        theta[t] = th
        if _diverged(theta, err, t):
            break
    return _run(theta, err)


def train_uoro(
    steps: int,
    lr: float = 1e-4,
    *,
    rng: int | np.random.Generator | None,
    theta0: float = ib.THETA0,
    eps: float = 1e-7,
    n: int = ib.N_UNITS,
    p: int = ib.N_POSITIVE,
) -> ib.Run:
    """Online UORO (I.7), an SGD step after every step."""
    rng = as_generator(rng)
    A, v, s, theta, err = _start(steps, lr, theta0, n, p)
    st, tt = np.zeros(n), 0.0  # s~, theta~
    a1 = A[0].copy()  # A^T e_1
    th = float(theta0)
    nus = np.where(rng.random((steps, n)) < 0.5, -1.0, 1.0)
    for t in range(1, steps + 1):
        s = A @ s + th * v  # (I.1)
        e = s[0] - 1
        err[t - 1] = e
        g = e * (a1 @ st) * tt + e * v[0]  # (I.7)
        nu = nus[t - 1]
        As = A @ st
        nv = float(nu @ v)
        rho0 = np.sqrt((abs(tt) + eps) / (np.linalg.norm(As) + eps))
        rho1 = np.sqrt((abs(nv) + eps) / (np.sqrt(n) + eps))
        st, tt = rho0 * As + rho1 * nu, tt / rho0 + nv / rho1
        th -= lr * g
        theta[t] = th
        if _diverged(theta, err, t):
            break
    return _run(theta, err)


def train_artbp(
    steps: int,
    lr: float = 1e-4,
    *,
    c,
    b: int = 1,
    rng: int | np.random.Generator | None,
    theta0: float = ib.THETA0,
    n: int = ib.N_UNITS,
    p: int = ib.N_POSITIVE,
) -> ib.Run:
    """Online ARTBP (I.8): an SGD step at every cut, with the window's compensated gradient."""
    c, b = check_c(c), check_int("b", b)
    A, v, s, theta, err = _start(steps, lr, theta0, n, p)
    cuts = Cuts(c, b, as_generator(rng), None)
    cut_at, weights = cuts.decide(0, steps)
    ends = set(cut_at) | {steps}
    th, start = float(theta0), 1
    for t in range(1, steps + 1):
        s = A @ s + th * v  # (I.1), theta constant within a window
        err[t - 1] = s[0] - 1
        theta[t] = th
        if t in ends:  # (I.8): backpropagate the window start..t
            delta, g = np.zeros(n), 0.0
            for r in range(t, start - 1, -1):
                w = weights.get(r, 1.0) if r < t else 0.0
                delta = w * (A.T @ delta)
                delta[0] += err[r - 1]
                g += float(v @ delta)
            th -= lr * g
            theta[t] = th
            start = t + 1
        if _diverged(theta, err, t):
            break
    return _run(theta, err)
