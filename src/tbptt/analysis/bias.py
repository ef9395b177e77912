"""Measure what truncation does to the gradient, and choose k2 (SEMANTICS.md 2, 3 and 5).

Bias against exact BPTT. With the parameters frozen over a sequence, the TBPTT(k1, k2) estimate is
the sum of window gradients (5.1) and the exact gradient is the single window (1, T, 1..T) of
section 2, both on the same trajectory. For each schedule we report, overall (all parameters as
one vector) and per parameter,

    cosine  = <g_trunc, g_exact> / (||g_trunc|| ||g_exact||)
    rel_err = ||g_trunc - g_exact|| / ||g_exact||

The per-lag decomposition (Pascanu, Mikolov and Bengio 2013, eq. 4). Unrolling (2.2),

    dL/dtheta = sum_t sum_{tau >= 0} dl_t/dh_{t-tau} d+h_{t-tau}/dtheta,
    (B.1)  dl_t/dh_t         = C^T e_t
    (B.2)  dl_t/dh_{t-tau-1} = A^T (f'(a_{t-tau}) * dl_t/dh_{t-tau})     (0 across a reset)

where d+ is the immediate partial. Truncating to k2 steps keeps the lags tau < k2 of every loss
(k1 = 1, inject="new": Williams and Peng's BPTT(k2)). We report

    (B.3)  phi_tau = mean over t of ||dl_t/dh_{t-tau}||                (each stream's own norm)
    (B.4)  log phi_tau ~ log c + tau log beta                          (least squares, tau >= tau0)

beta is the fitted geometric decay rate. The mean runs over the same loss steps t >= max_lag for
every lag (so that every t - tau >= 0), and over streams; masked steps are left out.

Choosing k2 (Aicher, Foti and Fox 2019, "Adaptively truncating backpropagation through time to
control gradient bias", section 4). Under geometric decay phi_k <= phi_tau0 beta^(k - tau0), the
bias of keeping lags 0..K-1 is bounded by the tail

    (B.5)  E(K) = sum_{k=K}^{tau0-1} phi_k + phi_tau0 beta^max(K - tau0, 0) / (1 - beta)

and the norm of the full gradient from below by  G = max_K ( ||gbar_K|| - E(K) ),  where
gbar_K = mean over t of sum_{k<K} dl_t/dh_{t-k}. The suggested truncation is

    (B.6)  K(delta) = the smallest K with E(K) / G <= delta.

Public functions: truncation_bias, lag_gradients, lag_norms, lag_profile, choose_k, suggest_k.
The commands `tbptt bias` and `tbptt suggest-k`, with their files, tables and plots, are in
tbptt.bias_commands.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..checks import check_int, is_int
from ..errors import InputError
from ..numpy.elman import ElmanRNN, Trajectory, run
from ..numpy.tbptt import window_sum
from ..schedule import Truncation, Window

Array = np.ndarray
TINY = 1e-300  # norms at or below this count as exactly zero (no gradient flows that far)


# -- shared set-up: one forward pass ---------------------------------------------------------------
@dataclass
class _Run:
    model: ElmanRNN
    traj: Trajectory
    e: Array  # (T, batch, p) dl_t/dz_t, already masked
    weight: Array  # (T, batch) 1 where step t of a stream has a loss, else 0


def _run(model, x, y, h0, loss, mask, reset) -> _Run:
    r = run(model, x, y, h0, loss, mask, reset)
    mask = r.data.mask
    weight = np.ones(r.data.x.shape[:2]) if mask is None else (mask != 0).astype(float)
    return _Run(model, r.traj, r.e, weight)


def _flat(grads: dict[str, Array], names: Sequence[str]) -> Array:
    return np.concatenate([np.ravel(grads[k]) for k in names]).astype(np.float64)


def _compare(approx: Array, exact: Array) -> tuple[float, float]:
    """(cosine, relative error) of approx against exact; nan where exact is zero."""
    ne, na = float(np.linalg.norm(exact)), float(np.linalg.norm(approx))
    rel = float(np.linalg.norm(approx - exact)) / ne if ne > 0 else math.nan
    cos = float(approx @ exact) / (na * ne) if na > 0 and ne > 0 else math.nan
    return cos, rel


# -- bias of a schedule against exact BPTT ---------------------------------------------------------
@dataclass(frozen=True)
class BiasRow:
    """One schedule's frozen estimate compared with exact BPTT on the same trajectory."""

    truncation: Truncation
    cosine: float  # all parameters as one vector
    rel_error: float
    per_param: dict[str, tuple[float, float]]  # name -> (cosine, rel_error)
    backward_steps: int  # Williams and Peng's cost on this sequence


def truncation_bias(
    model: ElmanRNN,
    x: Array,
    y: Array,
    truncations: Iterable[Truncation],
    h0: Array | None = None,
    loss: str = "l2",
    *,
    mask: Array | None = None,
    reset: Array | None = None,
) -> list[BiasRow]:
    """Cosine and relative error of each schedule's frozen estimate (5.1) against exact BPTT.

    Args:
        model, x, y, h0, loss, mask, reset: as for `tbptt.gradients`.
        truncations: the schedules to compare (e.g. from `schedules`).

    Returns:
        One BiasRow per schedule, in order; "h0" is not a parameter and is left out.
    """
    truncations = list(truncations)
    for tr in truncations:
        if not isinstance(tr, Truncation):
            raise InputError(f"truncations must hold tbptt.Truncation, got {type(tr).__name__}")
    run = _run(model, x, y, h0, loss, mask, reset)
    T = run.traj.h.shape[0]
    names = list(model.params)
    exact, _ = window_sum(model, run.traj, run.e, [Window(1, 1, T)])  # section 2
    g_exact = _flat(exact, names)
    rows = []
    for tr in truncations:
        approx, _ = window_sum(model, run.traj, run.e, tr.windows(T))  # (5.1)
        per = {
            k: _compare(np.ravel(approx[k]).astype(np.float64), np.ravel(exact[k])) for k in names
        }
        cos, rel = _compare(_flat(approx, names), g_exact)
        rows.append(BiasRow(tr, cos, rel, per, tr.backward_steps(T)))
    return rows


def schedules(
    k2s: Iterable[int],
    k1: int | None | Iterable[int | None] = 1,
    injects: Iterable[str] = ("new",),
    flush: bool = True,
) -> list[Truncation]:
    """Truncation(k1, k2, inject, flush) for every inject mode, k1 and k2 (in that nesting);
    k1=None means k1 = k2 (disjoint chunks)."""
    k1s = list(k1) if isinstance(k1, Iterable) else [k1]
    return [
        Truncation(k2 if k1_ is None else k1_, k2, inject, flush)
        for inject in injects
        for k1_ in k1s
        for k2 in list(k2s)
    ]


# -- the per-lag decomposition ---------------------------------------------------------------------
def _lag_gradients(run: _Run, max_lag: int):
    """Yield G_tau (T, batch, n) with G_tau[t-1] = dl_t/dh_{t-tau} for tau = 0..max_lag (B.1-B.2).

    Rows t < tau (no state h_{t-tau}) hold zeros. One matrix product per lag for all t at once.
    """
    traj, A = run.traj, run.model.A
    T = traj.h.shape[0]
    G = run.e @ run.model.C  # (T, batch, n): C^T e_t  (B.1)
    yield G
    for tau in range(max_lag):
        nxt = np.zeros_like(G)
        # row i (loss t = i + 1) at lag tau holds dl_t/dh_{i+1-tau}; the next lag multiplies by
        # f'(a_{i+1-tau}) = fprime[i - tau] and A^T  (B.2), for rows i >= tau
        nxt[tau:] = (G[tau:] * traj.fprime[: T - tau]) @ A
        if traj.reset is not None:  # step i+1-tau restarted from h0: nothing reaches h_{i-tau}
            nxt[tau:] *= ~traj.reset[: T - tau, :, None]
        G = nxt
        yield G


def _check_lag(max_lag: object, T: int) -> int:
    if max_lag is None:
        return max(1, min(64, T // 2))
    lag = check_int("max_lag", max_lag)
    if lag > T:
        raise InputError(f"max_lag must be at most the number of steps T = {T}, got {lag}")
    return lag


def lag_gradients(
    model: ElmanRNN,
    x: Array,
    y: Array,
    max_lag: int | None = None,
    h0: Array | None = None,
    loss: str = "l2",
    *,
    mask: Array | None = None,
    reset: Array | None = None,
) -> Array:
    """Every term dl_t/dh_{t-tau} of the decomposition (B.1-B.2), for tau = 0..max_lag.

    Returns (max_lag + 1, T, batch, n) with out[tau, t - 1] = dl_t/dh_{t-tau} (zeros where
    t - tau < 0); memory grows as max_lag * T, so keep it for small problems and use
    `lag_norms` or `lag_profile` otherwise. Summing out[tau, t-1] * f'(a_{t-tau}) h_{t-tau-1}^T
    over t and tau < k2 gives BPTT(k2)'s dL/dA; over every tau, the exact one.
    """
    run = _run(model, x, y, h0, loss, mask, reset)
    T = run.traj.h.shape[0]
    max_lag = _check_lag(max_lag, T)
    return np.stack(list(_lag_gradients(run, max_lag)))


def lag_norms(
    model: ElmanRNN,
    x: Array,
    y: Array,
    max_lag: int | None = None,
    h0: Array | None = None,
    loss: str = "l2",
    *,
    mask: Array | None = None,
    reset: Array | None = None,
) -> Array:
    """||dl_t/dh_{t-tau}|| for every lag tau = 0..max_lag, step t and stream (B.1-B.2).

    Returns (max_lag + 1, T, batch), with nan where t - tau < 0 (h_0 is lag t of step t).
    One stream (x of shape (T, m)) gives (max_lag + 1, T, 1).
    """
    run = _run(model, x, y, h0, loss, mask, reset)
    T, batch, _ = run.traj.h.shape
    max_lag = _check_lag(max_lag, T)
    out = np.full((max_lag + 1, T, batch), np.nan)
    for tau, G in enumerate(_lag_gradients(run, max_lag)):
        out[tau, max(tau - 1, 0) :] = np.linalg.norm(G[max(tau - 1, 0) :], axis=-1)
    return out


@dataclass(frozen=True)
class LagProfile:
    """phi_tau = mean_t ||dl_t/dh_{t-tau}|| (B.3) with its fitted geometric decay (B.4)."""

    norms: Array  # (max_lag + 1,) phi_tau for tau = 0..max_lag
    cum_norms: Array  # (max_lag + 1,) ||mean_t sum_{k <= tau} dl_t/dh_{t-k}||
    count: int  # how many (t, stream) loss terms each mean averages
    rate: float  # beta: phi_tau ~ scale * rate**tau; nan when fewer than 2 nonzero lags to fit
    scale: float  # c
    fit_from: int  # tau0: the first lag used in the fit

    @property
    def max_lag(self) -> int:
        return len(self.norms) - 1

    @property
    def lags(self) -> Array:
        return np.arange(len(self.norms))

    @property
    def half_life(self) -> float:
        """Lags over which phi halves: log 2 / -log beta (inf without decay)."""
        if not 0 < self.rate < 1:
            return 0.0 if self.rate == 0 else math.inf
        return math.log(2) / -math.log(self.rate)

    def fitted(self) -> Array:
        """scale * rate**tau at every lag (the fitted line of B.4)."""
        return self.scale * self.rate ** self.lags.astype(float)


def fit_decay(norms: Array, fit_from: int = 1) -> tuple[float, float]:
    """(beta, c) of log norms[tau] ~ log c + tau log beta over tau >= fit_from (B.4).

    Lags whose norm is zero are left out; if no lag from fit_from on is nonzero the gradient does
    not flow that far at all and beta = 0; with a single nonzero lag there is no fit (nan).
    """
    norms = np.asarray(norms, dtype=float)
    tau = np.arange(len(norms))
    keep = (tau >= fit_from) & (norms > TINY) & np.isfinite(norms)
    if not keep.any():
        return 0.0, float(norms[min(fit_from, len(norms) - 1)]) if len(norms) else 0.0
    if keep.sum() < 2:
        return math.nan, math.nan
    slope, intercept = np.polyfit(tau[keep], np.log(norms[keep]), 1)
    return float(np.exp(slope)), float(np.exp(intercept))


def lag_profile(
    model: ElmanRNN,
    x: Array,
    y: Array,
    max_lag: int | None = None,
    h0: Array | None = None,
    loss: str = "l2",
    *,
    fit_from: int = 1,
    mask: Array | None = None,
    reset: Array | None = None,
) -> LagProfile:
    """The per-lag decomposition (B.3) averaged over loss steps t >= max_lag, and its decay (B.4).

    Args:
        max_lag: the longest lag measured; None means min(64, T // 2).
        fit_from: tau0, the first lag of the geometric fit (the decay may start late).
    """
    run = _run(model, x, y, h0, loss, mask, reset)
    T, batch, n = run.traj.h.shape
    given, max_lag = max_lag, _check_lag(max_lag, T)
    if not is_int(fit_from) or not 0 <= fit_from < max_lag:  # type: ignore[operator]
        why = "" if given is not None else f", min(64, T // 2) for the T = {T} steps given"
        raise InputError(
            f"fit_from must be an integer in [0, max_lag = {max_lag}{why}), got {fit_from!r}"
        )
    w = run.weight[max_lag - 1 :]  # (T - max_lag + 1, batch): the loss steps t >= max_lag
    count = int(w.sum())
    if count == 0:
        raise InputError(
            f"no loss step t >= max_lag = {max_lag} has a target (mask); lower max_lag"
        )
    norms = np.empty(max_lag + 1)
    cum_norms = np.empty(max_lag + 1)
    total = np.zeros(n)  # sum over (t, stream) of sum_{k <= tau} dl_t/dh_{t-k}
    for tau, G in enumerate(_lag_gradients(run, max_lag)):
        Gt = G[max_lag - 1 :]  # (T - max_lag + 1, batch, n)
        norms[tau] = float((np.linalg.norm(Gt, axis=-1) * w).sum()) / count  # (B.3)
        total += np.einsum("tbn,tb->n", Gt, w)
        cum_norms[tau] = float(np.linalg.norm(total)) / count
    rate, scale = fit_decay(norms, fit_from)
    return LagProfile(norms, cum_norms, count, rate, scale, fit_from)


# -- Aicher, Foti and Fox's choice of K ------------------------------------------------------------
@dataclass(frozen=True)
class KChoice:
    """The result of (B.6): K, and the estimated relative bias E(K)/G for K = 1..k_max."""

    k: int
    delta: float
    rel_bias: Array  # (k_max,) estimated relative bias of K = 1..k_max (inf: no bound)
    lower_bound: float  # G, the lower bound on the norm of the full gradient (<= 0: none)
    bounded: bool  # whether some K <= k_max meets delta (else k = k_max)


def tail_bound(profile: LagProfile, K: int) -> float:
    """E(K) of (B.5): the bias of keeping lags 0..K-1, from measured and fitted phi (inf without
    decay)."""
    beta, tau0, phi = profile.rate, profile.fit_from, profile.norms
    if beta == 0:  # nothing flows beyond the measured lags that are nonzero
        return float(phi[K:].sum()) if K <= profile.max_lag else 0.0
    if not 0 < beta < 1:
        return math.inf
    head = float(phi[K:tau0].sum()) if K < tau0 else 0.0
    return head + float(phi[tau0]) * beta ** max(K - tau0, 0) / (1 - beta)


def choose_k(profile: LagProfile, delta: float = 0.1, k_max: int = 256) -> KChoice:
    """(B.6): the smallest K in 1..k_max whose estimated relative bias is at most delta."""
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise InputError(f"delta must be a number in (0, 1), got {delta!r}")
    check_int("k_max", k_max)
    tails = np.array([tail_bound(profile, K) for K in range(1, k_max + 1)])
    # ||g|| >= ||gbar_K|| - E(K) for every measured K (lags 0..K-1 are cum_norms[K - 1])
    measured = min(profile.max_lag + 1, k_max)
    lower = float(np.max(profile.cum_norms[:measured] - tails[:measured]))
    rel = tails / lower if lower > 0 else np.full(k_max, math.inf)
    ok = np.flatnonzero(rel <= delta)
    k = int(ok[0]) + 1 if len(ok) else k_max
    return KChoice(k=k, delta=float(delta), rel_bias=rel, lower_bound=lower, bounded=bool(len(ok)))


def suggest_k(
    model: ElmanRNN,
    x: Array,
    y: Array,
    delta: float = 0.1,
    h0: Array | None = None,
    loss: str = "l2",
    *,
    max_lag: int | None = None,
    fit_from: int = 1,
    k_max: int = 256,
    mask: Array | None = None,
    reset: Array | None = None,
) -> int:
    """Aicher, Foti and Fox's K: the smallest truncation whose estimated relative bias <= delta.

    A pure function of the current parameters and a recent stretch of data (x, y of at least
    2 * max_lag steps). When the gradient shows no geometric decay it returns k_max.
    For training, call it every N updates on the last chunk and continue with
    Truncation(k1, max(K, k1)) (see docs/guide.md, "Choosing k2").
    """
    profile = lag_profile(model, x, y, max_lag, h0, loss, fit_from=fit_from, mask=mask, reset=reset)
    return choose_k(profile, delta, k_max).k
