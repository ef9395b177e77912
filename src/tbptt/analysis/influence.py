"""Influence balancing (Tallec and Ollivier 2017, "Unbiased online recurrent optimization").

A linear recurrent system with one scalar parameter theta, built so that truncation gets the sign
of the gradient wrong. n units; the first p receive +theta, the others -theta; each unit is fed by
itself and by the next one:

    (I.1)  s_t = A s_{t-1} + theta v,   A = (I + N) / 2   (1/2 on the diagonal and superdiagonal)
           v = (+1, ..., +1, -1, ..., -1)   (p entries +1, n - p entries -1)
    (I.2)  l_t = 1/2 (s_t[1] - 1)^2        (the loss reads the first unit only)

The paper's instance has n = 23, p = 10 and starts from theta = 0.5; the state starts at s_0 = 1
(all ones), as in the public reimplementation of Vicol, Metz and Sohl-Dickstein 2021.
In the seed's notation this is the Elman model with f = g = identity, B = theta v (x_t = 1),
C = e_1^T and targets y_t = 1 (`as_elman`), so the library's engines apply unchanged.

Influence of theta on the first unit. theta enters every step; through j steps of (I.1) it reaches
unit 1 with weight e_1^T A^j v = sum_i binom(j, i-1) 2^-j v_i: near units (positive) arrive first,
far ones (negative) later. Backpropagating k steps keeps j < k:

    (I.3)  sigma_k = sum_{j=0}^{k-1} e_1^T A^j v      (the truncated sensitivity)
    (I.4)  sigma_inf = e_1^T (I - A)^{-1} v = 2 sum_i v_i = -6,   theta* = 1 / sigma_inf = -1/6

since at the fixed point s_1 = sigma_inf theta, and the loss is zero at s_1 = 1. sigma_k is
positive for every k <= 40 and negative from k = 41 on: a truncation shorter than that pushes theta
the wrong way. Because A and v do not depend on theta, the derivative of a loss l_t through the
last d steps is exactly

    (I.5)  dl_t/dtheta (depth d) = (s_t[1] - 1) sigma_d

whatever values theta had along the way, so the canonical online rule of SEMANTICS.md 5 is (I.5)
summed over each window's injected losses (d = t - s + 1), and exact BPTT is d = t.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..checks import check_int
from ..errors import InputError
from ..numpy.elman import ElmanRNN
from ..schedule import Truncation

Array = np.ndarray

N_UNITS, N_POSITIVE, THETA0 = 23, 10, 0.5  # the paper's instance


def _check(n: int, p: int) -> None:
    check_int("n", n)
    check_int("p", p, least=0)
    if p > n:
        raise InputError(f"p must be at most n = {n} (units receiving +theta), got {p}")


def system(n: int = N_UNITS, p: int = N_POSITIVE) -> tuple[Array, Array]:
    """A (n, n) with 1/2 on the diagonal and superdiagonal, and v (n,) = (+1 x p, -1 x (n-p))."""
    _check(n, p)
    A = 0.5 * (np.eye(n) + np.eye(n, k=1))  # (I.1)
    v = np.where(np.arange(n) < p, 1.0, -1.0)
    return A, v


def sensitivities(k_max: int, n: int = N_UNITS, p: int = N_POSITIVE) -> Array:
    """sigma_k for k = 0..k_max (I.3): (k_max + 1,), sigma_0 = 0."""
    check_int("k_max", k_max, least=0)
    A, v = system(n, p)
    out = np.zeros(k_max + 1)
    row = np.eye(n)[0]  # e_1^T A^j
    for k in range(1, k_max + 1):
        out[k] = out[k - 1] + row @ v
        row = row @ A
    return out


def exact_sensitivity(n: int = N_UNITS, p: int = N_POSITIVE) -> float:
    """sigma_inf = e_1^T (I - A)^{-1} v (I.4)."""
    A, v = system(n, p)
    return float(np.linalg.solve(np.eye(n) - A, v)[0])


def optimum(n: int = N_UNITS, p: int = N_POSITIVE) -> float:
    """theta* = 1 / sigma_inf: the fixed point's first unit equals the target 1 (I.4)."""
    return 1.0 / exact_sensitivity(n, p)


def as_elman(
    theta: float, T: int, n: int = N_UNITS, p: int = N_POSITIVE
) -> tuple[ElmanRNN, Array, Array]:
    """The system as the seed's model (f = g = identity, B = theta v, C = e_1^T), with x_t = 1 and
    y_t = 1 for T steps: returns (model, x (T, 1), y (T, 1)). Start it from h0 = s_0.

    The gradient for theta is v . dL/dB[:, 0] (B = theta v)."""
    A, v = system(n, p)
    C = np.eye(n)[:1]  # (1, n): the loss reads the first unit
    model = ElmanRNN(A, theta * v[:, None], C, f="identity", g="identity")
    return model, np.ones((T, 1)), np.ones((T, 1))


def gradient(
    theta: float,
    T: int,
    truncation: Truncation | None = None,
    s0: Array | None = None,
    n: int = N_UNITS,
    p: int = N_POSITIVE,
) -> float:
    """dL/dtheta over T steps with theta fixed: exact (truncation=None) or the frozen TBPTT
    estimate, the sum over windows of (I.5) for their injected losses."""
    if truncation is not None and not isinstance(truncation, Truncation):
        raise InputError(
            f"truncation must be a tbptt.Truncation or None, got {type(truncation).__name__}"
        )
    A, v = system(n, p)
    s = np.ones(n) if s0 is None else np.asarray(s0, dtype=float)
    first = np.empty(T)  # s_t[1] for t = 1..T
    for t in range(T):  # (I.1)
        s = A @ s + theta * v
        first[t] = s[0]
    sigma = sensitivities(T, n, p)
    if truncation is None:
        return float(((first - 1) * sigma[1 : T + 1]).sum())  # depth t for loss t
    total = 0.0
    for w in truncation.windows(T):
        for t in w.losses:
            total += (first[t - 1] - 1) * sigma[w.depth(t)]  # (I.5)
    return float(total)


@dataclass(frozen=True)
class Run:
    """An online training run: theta after every step, and each step's loss."""

    theta: Array  # (steps + 1,) theta_0 and theta after each step
    loss: Array  # (steps,) l_t, computed with the theta in force at step t
    truncation: Truncation

    @property
    def final(self) -> float:
        return float(self.theta[-1])


def train(
    truncation: Truncation,
    steps: int,
    lr: float = 1e-4,
    theta0: float = THETA0,
    s0: Array | None = None,
    n: int = N_UNITS,
    p: int = N_POSITIVE,
) -> Run:
    """Online TBPTT(k1, k2) with plain SGD on theta (the canonical rule, SEMANTICS.md 5).

    The state runs on, never reset; after every update step u of the schedule, theta moves by
    -lr times the sum of (I.5) over the window's injected losses. Exact online BPTT (RTRL) is
    Truncation(1, steps): every loss reaches back to step 1.
    """
    if not isinstance(truncation, Truncation):
        raise InputError(f"truncation must be a tbptt.Truncation, got {type(truncation).__name__}")
    check_int("steps", steps)
    if not lr > 0:
        raise InputError(f"lr must be a positive number, got {lr!r}")
    A, v = system(n, p)
    sigma = sensitivities(min(truncation.k2, steps), n, p)
    s = np.ones(n) if s0 is None else np.asarray(s0, dtype=float).copy()
    theta = np.empty(steps + 1)
    theta[0] = theta0
    err = np.empty(steps)  # s_t[1] - 1
    th, u_prev = float(theta0), 0
    for t in range(1, steps + 1):
        s = A @ s + th * v  # (I.1) with the theta in force now
        err[t - 1] = s[0] - 1
        if truncation.is_update(t):
            w = truncation.window(t, u_prev)
            ts = np.arange(w.i, w.u + 1)
            th -= lr * float(err[ts - 1] @ sigma[ts - w.s + 1])  # (I.5) summed over I
            u_prev = t
        theta[t] = th
        if not np.isfinite(th) or abs(th) > 1e12:
            theta[t:] = np.inf * np.sign(th) if np.isfinite(th) or np.isinf(th) else np.nan
            err[t:] = np.inf
            break
    return Run(theta=theta, loss=0.5 * err**2, truncation=truncation)
