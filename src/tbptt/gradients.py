"""Exact BPTT and the frozen TBPTT estimate: the sum of window gradients (SEMANTICS.md 2, 3, 5).

The parameters stay fixed over the whole sequence. For a schedule with windows W = (s, u, I):

    (5.1)  g = sum_W g^W,   g^W_A = sum_{t=s..u} r^W_t h_{t-1}^T,   g^W_C = sum_{t in I} e_t h_t^T

Summing over windows first and multiplying once:  g_A = sum_t (sum_W r^W_t) h_{t-1}^T  and
g_C = sum_t n_t e_t h_t^T, with n_t the number of windows that inject loss t. The Python loop runs
over the backward recursion (3.1) only; each parameter gradient is one product over stacked time.
Exact BPTT (section 2) is the single window (1, T, 1..T).
"""

from __future__ import annotations

import numpy as np

from .checks import check_batch, check_h0
from .elman import ElmanRNN, Trajectory, backprop, forward, parameter_gradients, project
from .errors import InputError
from .functions import loss_and_error
from .schedule import Truncation, Window

Array = np.ndarray


def gradients(
    model: ElmanRNN,
    x: Array,
    y: Array,
    truncation: Truncation | None = None,
    h0: Array | None = None,
    loss: str = "l2",
    *,
    mask: Array | None = None,
    reset: Array | None = None,
) -> dict[str, Array]:
    """The gradient of L = sum_t l_t, exact (truncation=None) or the frozen TBPTT estimate.

    Args:
        model: the ElmanRNN whose parameters stay fixed over the sequence.
        x: inputs, (T, m) for one stream or (T, batch, m).
        y: targets, (T, p) / (T, batch, p) for loss="l2"; integer (T,) / (T, batch) for
            loss="cross_entropy" (which needs g="softmax").
        truncation: the schedule; None means exact BPTT.
        h0: initial state (n,) or (batch, n); None means zeros.
        loss: "l2" (the seed's 1/2 ||yhat - y||^2) or "cross_entropy".
        mask: optional (T,) / (T, batch) weights; a 0 switches l_t off.
        reset: optional (T,) / (T, batch) bool; step t of stream j restarts from h0, a constant.

    Returns:
        {"A", "B", "C", ["b", "c",] "h0"}: gradients summed over steps and streams. "h0" has the
        shape h0 was given in ((n,) when None and x is one stream, else (batch, n)); only
        windows that start at step 1 contribute to it.
    """
    if not isinstance(model, ElmanRNN):
        raise InputError(f"model must be a tbptt.ElmanRNN, got {type(model).__name__}")
    if truncation is not None and not isinstance(truncation, Truncation):
        raise InputError(
            f"truncation must be a tbptt.Truncation or None, got {type(truncation).__name__}"
        )
    data = check_batch(
        x, y, m=model.m, p=model.p, dtype=model.dtype, loss=loss, g=model.g, mask=mask, reset=reset
    )
    T, batch, _ = data.x.shape
    h_init = check_h0(h0, model.n, batch, model.dtype)
    traj = forward(model, data.x, h_init, data.reset)
    _, e = loss_and_error(model.g, loss, traj.z, data.y, data.mask)  # (T, batch, p)
    windows = [Window(1, 1, T)] if truncation is None else truncation.windows(T)
    grads, gh0 = window_sum(model, traj, e, windows)
    if h0 is not None and np.ndim(h0) == 1 or h0 is None and data.single:
        gh0 = gh0.sum(axis=0)  # one initial state shared by every stream
    grads["h0"] = gh0
    return grads


def window_sum(
    model: ElmanRNN, traj: Trajectory, e: Array, windows: list[Window]
) -> tuple[dict[str, Array], Array]:
    """sum_W g^W over a trajectory computed with fixed parameters (5.1), and the h_0 gradient."""
    T, batch, n = traj.h.shape
    dh = project(e, model.C)  # (T, batch, n): C^T e_t for every t, one product
    gh0 = np.zeros((batch, n), model.dtype)
    if len(windows) == 1 and windows[0] == Window(1, 1, T):  # exact BPTT: one window, every loss
        R, gh0 = backprop(traj.fprime, model.A, dh, cut=traj.reset, out=dh)  # r_t over C^T e_t
        e_used = e
    else:
        R = np.zeros_like(traj.h)  # (T, batch, n): sum over windows of r^W_t
        uses = np.zeros(T, dtype=model.dtype)  # n_t: windows that inject loss t
        for w in windows:
            sl = slice(w.s - 1, w.u)  # steps s..u, 0-based
            cut = None if traj.reset is None else traj.reset[sl]
            Rw, back = backprop(traj.fprime[sl], model.A, dh[w.i - 1 : w.u], cut=cut)
            R[sl] += Rw
            uses[w.i - 1 : w.u] += 1
            if w.s == 1:
                gh0 += back  # (2.5) / (3.3): only a window that starts at step 1 reaches h_0
        e_used = e * uses[:, None, None]  # n_t e_t
    grads = parameter_gradients(
        R, traj.h_prev, traj.x, e_used, traj.h, model.b is not None, model.c is not None
    )
    return grads, gh0


def total_loss(
    model: ElmanRNN,
    x: Array,
    y: Array,
    h0: Array | None = None,
    loss: str = "l2",
    *,
    mask: Array | None = None,
    reset: Array | None = None,
) -> float:
    """L = sum_t l_t summed over streams (1.5): the quantity whose gradient `gradients` returns."""
    data = check_batch(
        x, y, m=model.m, p=model.p, dtype=model.dtype, loss=loss, g=model.g, mask=mask, reset=reset
    )
    h_init = check_h0(h0, model.n, data.x.shape[1], model.dtype)
    traj = forward(model, data.x, h_init, data.reset)
    l, _ = loss_and_error(model.g, loss, traj.z, data.y, data.mask)
    return float(l.sum())
