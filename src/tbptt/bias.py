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

Public functions: truncation_bias, lag_gradients, lag_norms, lag_profile, choose_k, suggest_k;
the commands `tbptt bias` and `tbptt suggest-k`. Plots import matplotlib inside the functions
that draw them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import check_batch, check_h0
from .elman import ElmanRNN, Trajectory, forward
from .functions import ACTIVATIONS, LOSSES, OUTPUTS, loss_and_error
from .gradients import window_sum
from .schedule import INJECT_MODES, Truncation, Window

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
    if not isinstance(model, ElmanRNN):
        raise TypeError(f"model must be a tbptt.ElmanRNN, got {type(model).__name__}")
    data = check_batch(
        x, y, m=model.m, p=model.p, dtype=model.dtype, loss=loss, g=model.g, mask=mask, reset=reset
    )
    h_init = check_h0(h0, model.n, data.x.shape[1], model.dtype)
    traj = forward(model, data.x, h_init, data.reset)
    _, e = loss_and_error(model.g, loss, traj.z, data.y, data.mask)  # (T, batch, p)
    weight = np.ones(data.x.shape[:2]) if data.mask is None else (data.mask != 0).astype(float)
    return _Run(model, traj, e, weight)


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
            raise TypeError(f"truncations must hold tbptt.Truncation, got {type(tr).__name__}")
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
    if isinstance(max_lag, bool) or not isinstance(max_lag, int | np.integer) or max_lag < 1:
        raise ValueError(f"max_lag must be an integer >= 1, got {max_lag!r}")
    if max_lag > T:
        raise ValueError(f"max_lag must be at most the number of steps T = {T}, got {max_lag}")
    return int(max_lag)


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
    max_lag = _check_lag(max_lag, T)
    if isinstance(fit_from, bool) or not isinstance(fit_from, int) or not 0 <= fit_from < max_lag:
        raise ValueError(
            f"fit_from must be an integer in [0, max_lag = {max_lag}), got {fit_from!r}"
        )
    w = run.weight[max_lag - 1 :]  # (T - max_lag + 1, batch): the loss steps t >= max_lag
    count = int(w.sum())
    if count == 0:
        raise ValueError(
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
    """E(K) of (B.5): the bias of keeping lags 0..K-1, from measured and fitted phi (inf if no decay)."""
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
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise ValueError(f"k_max must be an integer >= 1, got {k_max!r}")
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


# -- reading a model and data for the commands -----------------------------------------------------
def load_model(path: str | os.PathLike) -> ElmanRNN:
    """An ElmanRNN in float64 from an .npz file or a `tbptt train` run directory (numpy engine).

    The file holds A, B, C and optionally b, c (or the same keys prefixed "model.", as
    `TBPTT.save` writes them) and optionally f and g as strings. A run directory's latest state
    (checkpoint.json) is read; f is its config's activation and g is softmax for the
    cross-entropy tasks (text and copy), identity otherwise.
    """
    path = Path(path)
    meta: dict = {}
    if path.is_dir():
        meta = _run_config(path)
        pointer = path / "checkpoint.json"
        if pointer.exists():
            path = path / json.loads(pointer.read_text())["state"]
        else:
            files = sorted(path.glob("*.npz"), key=lambda p: p.stat().st_mtime)
            if not files:
                raise ValueError(f"model: no checkpoint.json or .npz file in {str(path)!r}")
            path = files[-1]
    if path.suffix != ".npz":
        raise ValueError(f"model: {str(path)!r} is not an .npz file (bias needs the numpy engine)")
    if not path.exists():
        raise OSError(f"model: no such file {str(path)!r}")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    params = {}
    for key in ("A", "B", "C", "b", "c"):
        for name in (key, f"model.{key}"):
            if name in arrays:
                params[key] = np.asarray(arrays[name], dtype=np.float64)
    if not {"A", "B", "C"} <= set(params):
        raise ValueError(
            f"model: {str(path)!r} holds no A, B, C (or model.A, ...) arrays; keys: "
            f"{sorted(arrays)[:8]}"
        )
    f = str(arrays["f"]) if "f" in arrays else str(meta.get("activation", "tanh"))
    g = str(arrays["g"]) if "g" in arrays else ("softmax" if _cross_entropy(meta) else "identity")
    return ElmanRNN(**params, f=f, g=g)


def _run_config(run: Path) -> dict:
    cfg = run / "config.toml"
    if not cfg.exists():
        return {}
    import tomllib

    with open(cfg, "rb") as fh:
        return tomllib.load(fh)


def _cross_entropy(meta: dict) -> bool:
    return meta.get("task") in ("shakespeare", "stdlib", "text", "copy")


def run_data(run: str | os.PathLike, steps: int) -> dict[str, Array]:
    """Up to `steps` steps of a `tbptt train` run's validation data, as x, y, mask, reset."""
    from . import config as cf
    from .data import load_problem

    run = Path(run)
    meta = _run_config(run)
    if not meta:
        raise ValueError(f"data: {str(run)!r} has no config.toml; give --data FILE.npz")
    cfg = cf.check(cf.Config(**meta))
    vocab = None
    if (run / "vocab.json").exists():
        v = json.loads((run / "vocab.json").read_text())
        vocab = "".join(v) if isinstance(v, list) else v
    problem = load_problem(cfg, vocab)
    parts, total = [], 0
    for chunk in problem.valid(None):
        parts.append(chunk)
        total += len(chunk[0])
        if total >= steps:
            break
    out: dict[str, Array] = {}
    for k, name in enumerate(("x", "y", "mask", "reset")):
        if parts[0][k] is not None:
            arr = np.concatenate([p[k] for p in parts])[:steps]
            out[name] = arr.astype(np.float64) if arr.dtype.kind == "f" else arr
    return out


def load_data(path: str | os.PathLike) -> dict[str, Array]:
    """x, y and optionally mask, reset, h0 from an .npz file (time-major arrays)."""
    with np.load(Path(path), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    if "x" not in arrays or "y" not in arrays:
        raise ValueError(f"data: {str(path)!r} must hold arrays x and y, got {sorted(arrays)}")
    return {k: arrays[k] for k in ("x", "y", "mask", "reset", "h0") if k in arrays}


def synthetic_data(model: ElmanRNN, T: int, batch: int, loss: str, seed: int) -> dict[str, Array]:
    """Random data shaped for the model: x ~ N(0, 1) (one-hot symbols for cross-entropy) and
    random targets. It measures what the network's own dynamics do to the gradient."""
    rng = np.random.default_rng(seed)
    if loss == "cross_entropy":
        x = np.eye(model.m, dtype=model.dtype)[rng.integers(model.m, size=(T, batch))]
        y = rng.integers(model.p, size=(T, batch))
    else:
        x = rng.normal(size=(T, batch, model.m)).astype(model.dtype)
        y = rng.normal(size=(T, batch, model.p)).astype(model.dtype)
    return {"x": x, "y": y}


# -- output files ----------------------------------------------------------------------------------
def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to a temporary file in the same folder, then rename it over path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def bias_csv(rows: list[BiasRow], estimate: dict[int, float] | None = None) -> str:
    """One line per schedule and parameter ("all" is every parameter as one vector)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(
        ["k1", "k2", "inject", "flush", "param", "cosine", "rel_error", "backward_steps",
         "estimated_rel_bias"]
    )  # fmt: skip
    for r in rows:
        tr = r.truncation
        est = ""
        if estimate is not None and tr.k1 == 1 and tr.inject == "new" and tr.k2 in estimate:
            est = f"{estimate[tr.k2]:.6g}"
        for name, (cos, rel) in [("all", (r.cosine, r.rel_error)), *r.per_param.items()]:
            w.writerow(
                [tr.k1, tr.k2, tr.inject, tr.flush, name, f"{cos:.10g}", f"{rel:.10g}",
                 r.backward_steps, est if name == "all" else ""]
            )  # fmt: skip
    return out.getvalue()


def lags_csv(profile: LagProfile) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["lag", "mean_norm", "fitted", "cum_norm"])
    for tau, (phi, fit, cum) in enumerate(
        zip(profile.norms, profile.fitted(), profile.cum_norms, strict=True)
    ):
        w.writerow([tau, f"{phi:.10g}", f"{fit:.10g}", f"{cum:.10g}"])
    return out.getvalue()


def plot_bias(rows: list[BiasRow], path: str | os.PathLike, estimate: dict[int, float] | None = None,
              title: str = "") -> None:  # fmt: skip
    """Relative error and cosine against k2, one line per inject mode (and k1), and the relative
    error per parameter for the first mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .explain import save_figure

    groups: dict[tuple[str, int | None], list[BiasRow]] = {}
    for r in rows:
        groups.setdefault((r.truncation.inject, r.truncation.k1), []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for (inject, k1), rs in groups.items():
        k2 = [r.truncation.k2 for r in rs]
        label = f"inject={inject}, k1={k1}"
        axes[0].plot(k2, [max(r.rel_error, 1e-17) for r in rs], marker="o", label=label)
        axes[1].plot(k2, [r.cosine for r in rs], marker="o", label=label)
    if estimate:
        ks = sorted(estimate)
        axes[0].plot(ks, [estimate[k] for k in ks], ls="--", color="black",
                     label="Aicher et al. bound (estimated)")  # fmt: skip
    first = next(iter(groups.values()))
    exact_names = []
    for name in first[0].per_param:
        errs = [r.per_param[name][1] for r in first]
        if max(errs) < 1e-12:  # e.g. C and c with inject=new: each loss used once, exactly
            exact_names.append(name)
            continue
        axes[2].plot([r.truncation.k2 for r in first], errs, marker=".", label=name)
    if exact_names:
        axes[2].plot([], [], ls="", label=f"exact: {', '.join(exact_names)}")
    for ax, ylabel in zip(axes, ("relative error", "cosine similarity", "relative error"),
                          strict=True):  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k2 (steps backpropagated)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].set_title("||g_trunc - g_exact|| / ||g_exact||", fontsize=9)
    axes[1].set_title("cos(g_trunc, g_exact)", fontsize=9)
    inj = first[0].truncation
    axes[2].set_title(f"per parameter (inject={inj.inject}, k1={inj.k1})", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, os.fspath(path))
    plt.close(fig)


def plot_lags(profile: LagProfile, path: str | os.PathLike, title: str = "") -> None:
    """phi_tau on a log scale with the fitted geometric decay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .explain import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    keep = profile.norms > TINY
    ax.semilogy(
        profile.lags[keep], profile.norms[keep], marker=".", label="mean ||dl_t/dh_(t-tau)||"
    )
    if np.isfinite(profile.rate) and profile.rate > 0:
        ax.semilogy(profile.lags, profile.fitted(), ls="--", color="black",
                    label=f"fit: beta = {profile.rate:.3f} (from lag {profile.fit_from})")  # fmt: skip
    ax.set_xlabel("lag tau (steps)")
    ax.set_ylabel("norm")
    ax.set_title(title or "Per-lag gradient (Pascanu et al. 2013, eq. 4)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, os.fspath(path))
    plt.close(fig)


# -- terminal tables -------------------------------------------------------------------------------
def _num(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.2e}"


def bias_table(rows: list[BiasRow], estimate: dict[int, float] | None = None) -> str:
    names = list(rows[0].per_param) if rows else []
    head = f"{'k1':>4} {'k2':>5} {'inject':>7} {'cosine':>9} {'rel err':>9}"
    head += "".join(f" {'err ' + k:>9}" for k in names)
    head += f" {'est. bias':>9}" if estimate else ""
    lines = [head]
    for r in rows:
        tr = r.truncation
        line = f"{tr.k1:>4} {tr.k2:>5} {tr.inject:>7} {r.cosine:>9.6f} {_num(r.rel_error):>9}"
        line += "".join(f" {_num(r.per_param[k][1]):>9}" for k in names)
        if estimate:
            e = estimate.get(tr.k2) if tr.k1 == 1 and tr.inject == "new" else None
            line += f" {_num(e) if e is not None else '':>9}"
        lines.append(line)
    return "\n".join(lines)


def lag_table(profile: LagProfile, every: int | None = None) -> str:
    lags = profile.lags
    if every is None:
        every = max(1, len(lags) // 16)
    shown = [t for t in lags if t % every == 0 or t == lags[-1]]
    lines = [f"{'lag':>5} {'mean norm':>11} {'fitted':>11}"]
    fit = profile.fitted()
    for t in shown:
        lines.append(f"{t:>5} {profile.norms[t]:>11.4e} {fit[t]:>11.4e}")
    return "\n".join(lines)


# -- the commands ----------------------------------------------------------------------------------
def _add_model_and_data(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (a saved one, or a fresh random one)")
    g.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="an .npz with A, B, C[, b, c] or a run directory",
    )
    g.add_argument("--hidden", type=int, default=32, help="fresh model: units n")
    g.add_argument("--inputs", type=int, default=4, help="fresh model: inputs m")
    g.add_argument("--outputs", type=int, default=2, help="fresh model: outputs p")
    g.add_argument("--f", default="tanh", choices=tuple(ACTIVATIONS), help="fresh model: f")
    g.add_argument("--g", default="identity", choices=OUTPUTS, help="fresh model: g")
    g.add_argument("--spectral-radius", type=float, default=1.0, metavar="RHO",
                   help="fresh model: rescale A to this largest |eigenvalue|")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="fresh model: seed of the parameters")
    d = parser.add_argument_group(
        "data (a file; a run directory's validation data; or random data shaped for the model)"
    )
    d.add_argument("--data", metavar="FILE.npz", help="arrays x, y[, mask, reset, h0], time-major")
    d.add_argument("--steps", type=int, default=256, help="random or run data: steps T")
    d.add_argument("--batch", type=int, default=8, help="random data: streams")
    d.add_argument("--data-seed", type=int, default=1, help="random data: seed")
    d.add_argument("--loss", default=None, choices=LOSSES,
                   help="the per-step loss; none means cross_entropy when g is softmax, else l2")  # fmt: skip
    a = parser.add_argument_group("per-lag profile")
    a.add_argument("--max-lag", type=int, default=None,
                   help="longest lag measured; none means min(64, T/2)")  # fmt: skip
    a.add_argument("--fit-from", type=int, default=1, help="first lag of the geometric fit")


def _hide_none_defaults(parser: argparse.ArgumentParser) -> None:
    """No "(default: None)" in --help: options whose default is None are simply left out."""
    for action in parser._actions:
        if action.default is None:
            action.default = argparse.SUPPRESS


def _get(args: argparse.Namespace, name: str):
    return getattr(args, name, None)


def _model_and_data(args: argparse.Namespace) -> tuple[ElmanRNN, dict[str, Array], str]:
    if _get(args, "model"):
        model = load_model(args.model)
    else:
        model = ElmanRNN.init(
            args.hidden, args.inputs, args.outputs, f=args.f, g=args.g, seed=args.seed,
            spectral_radius=args.spectral_radius,
        )  # fmt: skip
    loss = _get(args, "loss") or ("cross_entropy" if model.g == "softmax" else "l2")
    if _get(args, "data"):
        data = load_data(args.data)
    elif _get(args, "model") and Path(args.model).is_dir():
        data = run_data(args.model, args.steps)
    else:
        for name in ("steps", "batch"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {getattr(args, name)}")
        data = synthetic_data(model, args.steps, args.batch, loss, args.data_seed)
    return model, data, loss


def _describe(model: ElmanRNN, data: dict[str, Array], loss: str) -> str:
    x = np.asarray(data["x"])
    T, batch = x.shape[0], (x.shape[1] if x.ndim == 3 else 1)
    rho = float(np.abs(np.linalg.eigvals(model.A.astype(np.float64))).max())
    return f"{model!r}, spectral radius of A {rho:.3f}; {T} steps x {batch} streams, loss={loss}"


def _profile_from(args, model, data, loss) -> LagProfile:
    kw = {k: data[k] for k in ("mask", "reset") if k in data}
    return lag_profile(
        model,
        data["x"],
        data["y"],
        _get(args, "max_lag"),
        data.get("h0"),
        loss,
        fit_from=args.fit_from,
        **kw,
    )


def add_bias_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_and_data(parser)
    _hide_none_defaults(parser)
    s = parser.add_argument_group("schedules compared with exact BPTT")
    s.add_argument("--k2", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], metavar="K2",
                   help="truncation lengths")  # fmt: skip
    s.add_argument("--k1", type=int, nargs="+", default=[1],
                   help="steps between updates (one or more); 0 means k1 = k2 (disjoint chunks)")  # fmt: skip
    s.add_argument("--inject", nargs="+", default=["new"], choices=INJECT_MODES,
                   help="inject modes to compare")  # fmt: skip
    s.add_argument("--delta", type=float, default=0.1,
                   help="relative bias for the suggested K (Aicher et al.)")  # fmt: skip
    parser.add_argument("--out-dir", default="tbptt-bias", metavar="DIR",
                        help="where bias.csv, lags.csv, bias.png and lags.png go")  # fmt: skip


def run_bias(args: argparse.Namespace) -> int:
    model, data, loss = _model_and_data(args)
    T = np.asarray(data["x"]).shape[0]
    k1s = [None if k == 0 else k for k in args.k1]
    trs = schedules(args.k2, k1s, args.inject, flush=True)
    kw = {k: data[k] for k in ("mask", "reset") if k in data}
    rows = truncation_bias(model, data["x"], data["y"], trs, data.get("h0"), loss, **kw)
    profile = _profile_from(args, model, data, loss)
    choice = choose_k(profile, args.delta, k_max=max(256, max(args.k2)))
    estimate = {k: float(choice.rel_bias[k - 1]) for k in args.k2 if k <= len(choice.rel_bias)}
    os.makedirs(args.out_dir, exist_ok=True)
    out = Path(args.out_dir)
    write_atomic(out / "bias.csv", bias_csv(rows, estimate))
    write_atomic(out / "lags.csv", lags_csv(profile))
    title = _describe(model, data, loss)
    plot_bias(rows, out / "bias.png", estimate, title)
    plot_lags(profile, out / "lags.png")
    print(title)
    print(f"Frozen TBPTT estimate against exact BPTT on the same trajectory (T = {T}):")
    print(bias_table(rows, estimate))
    print("(est. bias: Aicher et al.'s estimated relative bias bound, for k1 = 1, inject=new)")
    print()
    print(f"Per-lag gradient, mean over {profile.count} loss terms (Pascanu et al. eq. 4):")
    print(lag_table(profile))
    print(f"Fitted geometric decay: beta = {profile.rate:.4f} per step (half-life "
          f"{profile.half_life:.3g} steps), fitted from lag {profile.fit_from}.")  # fmt: skip
    print(_k_sentence(choice))
    print(f"Wrote {out / 'bias.csv'}, {out / 'lags.csv'}, {out / 'bias.png'}, {out / 'lags.png'}")
    return 0


def _k_sentence(choice: KChoice) -> str:
    if choice.bounded:
        return (
            f"Suggested k2 (Aicher et al., delta = {choice.delta:g}): K = {choice.k} "
            f"(estimated relative bias {choice.rel_bias[choice.k - 1]:.3g})."
        )
    return (
        f"No K up to {len(choice.rel_bias)} has an estimated relative bias <= {choice.delta:g} "
        f"(no geometric decay, or too little of it); K = {choice.k}."
    )


def add_suggest_k_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_and_data(parser)
    _hide_none_defaults(parser)
    parser.add_argument("--delta", type=float, default=0.1,
                        help="largest acceptable relative bias of the truncated gradient")  # fmt: skip
    parser.add_argument("--k-max", type=int, default=256, help="the largest K considered")


def run_suggest_k(args: argparse.Namespace) -> int:
    model, data, loss = _model_and_data(args)
    profile = _profile_from(args, model, data, loss)
    choice = choose_k(profile, args.delta, args.k_max)
    print(_describe(model, data, loss))
    print(f"Fitted geometric decay of mean ||dl_t/dh_(t-tau)||: beta = {profile.rate:.4f} per "
          f"step (from lag {profile.fit_from} to {profile.max_lag}).")  # fmt: skip
    shown = sorted({1, 2, 4, 8, 16, 32, 64, 128, choice.k} & set(range(1, args.k_max + 1)))
    print("   K  estimated relative bias")
    for k in shown:
        print(f"{k:>4}  {_num(float(choice.rel_bias[k - 1]))}")
    print(_k_sentence(choice))
    print(choice.k)
    return 0
