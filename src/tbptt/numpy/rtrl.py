"""RTRL (Williams and Zipser 1989) for the seed's model: the influence dh_t/dtheta carried forward;
the frozen estimate and the online rule (forward.py, an update every k1 steps).

SEMANTICS.md 8. theta = (A, B, b), the recurrent parameters, ordered by rows: row i of theta is
(A[i, :], B[i, :], b[i]), the parameters of unit i's pre-activation. Then

    (8.1)  a_t = A h_{t-1} + B x_t + b = Theta u_t,   u_t = (h_{t-1}, x_t, 1) in R^q
           (q = n + m + 1; q = n + m for a model without b; u_t holds h_0 where a stream restarted)
    (8.2)  dF/dtheta|_t = D_t M_t,   M_t[k, (i, j)] = [k = i] u_t[j]     (h_{t-1} held fixed)
    (8.3)  J_t = D_t (A J_{t-1} + M_t),   J_0 = 0;   a reset zeroes that stream's J_{t-1}
    (8.4)  g_theta = sum_t (C^T e_t)^T J_t,   g_C = sum_t e_t h_t^T,   g_c = sum_t e_t

with D_t = diag(f'(a_t)) and e_t of (2.1). (8.4) is the chain rule of exact BPTT (section 2) summed
in the other order, so frozen RTRL equals exact BPTT to rounding.

Cost per step and stream: the product A J_{t-1}, 2 n^2 |theta| flops with |theta| = n q, against
about 6 n^2 for a step of BPTT; memory n |theta| for J (twice that with the buffer the product
writes into), independent of the sequence length. The Python loop runs over the steps; each step
is one matrix product over every stream at once (J is stored (n, batch, n, q), so A J_{t-1} is one
(n x n) @ (n x batch |theta|) product), one in-place add of M_t on a diagonal view, one scaling by
D_t, and one vector-matrix product for (8.4).
"""

from __future__ import annotations

import numpy as np

from ..checks import check_real
from ..errors import InputError
from .elman import ElmanRNN, Trajectory, project, run, stacked
from .forward import ForwardRule
from .optim import SGD, Adam
from .trainer import TBPTT

Array = np.ndarray

MAX_BYTES = 2**30  # default limit on the memory of J and its buffer


def theta_size(model: ElmanRNN) -> int:
    """|theta| = n q: the entries of A, B and b."""
    return model.n * (model.n + model.m + (model.b is not None))


def influence_bytes(model: ElmanRNN, batch: int) -> int:
    """Memory of J and the buffer its product writes into: 2 x batch x n x |theta| entries."""
    return 2 * batch * model.n * theta_size(model) * model.dtype.itemsize


def check_influence_size(model: ElmanRNN, batch: int, max_bytes: float) -> None:
    """InputError, before anything is allocated or trained, when J would exceed max_bytes."""
    check_real("max_bytes", max_bytes, low=0, open_low=True)
    need = influence_bytes(model, batch)
    if need > max_bytes:
        entries = batch * model.n * theta_size(model)
        raise InputError(
            f"RTRL's influence matrix J = dh/dtheta needs batch x n x |theta| = {batch} x "
            f"{model.n} x {theta_size(model):,} = {entries:,} entries, {need / 2**20:,.0f} MiB "
            f"with its buffer in {model.dtype}, more than max_bytes = {max_bytes / 2**20:,.0f} "
            f"MiB; use UORO or ARTBP, fewer units or streams, or raise max_bytes (an argument of "
            f"tbptt.RTRL)"
        )


def theta_inputs(traj: Trajectory, bias: bool) -> Array:
    """u_t = (h_{t-1}, x_t, 1) for every step (8.1): (L, batch, q)."""
    parts = [traj.h_prev, traj.x]
    if bias:
        parts.append(np.ones((*traj.x.shape[:2], 1), traj.h.dtype))
    return np.concatenate(parts, axis=2)


def split_theta(G: Array, model: ElmanRNN) -> dict[str, Array]:
    """(n, q) rows of theta -> {"A", "B"[, "b"]} (fresh arrays)."""
    n, m = model.n, model.m
    out = {"A": G[:, :n].copy(), "B": G[:, n : n + m].copy()}
    if model.b is not None:
        out["b"] = G[:, n + m].copy()
    return out


def output_gradients(e: Array, h: Array, bias_c: bool) -> dict[str, Array]:
    """(8.4) for C and c, as (2.4): one product over the stacked steps."""
    out = {"C": stacked(e).T @ stacked(h)}
    if bias_c:
        out["c"] = e.sum(axis=(0, 1))
    return out


class Influence:
    """J_t of every stream, carried across pieces of a stream (8.3).

    J is stored (n, batch, n, q): J[k, j, i, :] = dh_t[k] / d(row i of theta) for stream j.
    """

    def __init__(self, model: ElmanRNN, batch: int) -> None:
        n, q = model.n, model.n + model.m + (model.b is not None)
        self.J = np.zeros((n, batch, n, q), model.dtype)
        self._next = np.empty_like(self.J)  # A J_{t-1} is written here, then the two swap

    def arrays(self) -> dict[str, Array]:
        return {"J": self.J}

    def advance(self, A: Array, fprime: Array, dh: Array, U: Array, reset: Array | None) -> Array:
        """Run (8.3) over L steps and return their sum (8.4) for theta, (n, q).

        fprime: (L, batch, n) f'(a_t); dh: (L, batch, n) C^T e_t; U: (L, batch, q) u_t;
        reset: (L, batch) bool or None.
        """
        n, batch, _, q = self.J.shape
        G = np.zeros(n * q, self.J.dtype)  # sum_t (C^T e_t)^T J_t, theta's rows flattened
        term = np.empty_like(G)
        resets = reset is not None and reset.any()
        for t in range(len(fprime)):
            J, nxt = self.J, self._next
            if resets and reset is not None and reset[t].any():
                J[:, reset[t]] = 0  # the stream restarted from a constant h_0
            np.matmul(A, J.reshape(n, -1), out=nxt.reshape(n, -1))  # A J_{t-1}  (8.3)
            diagonal(nxt)[...] += U[t]  # + M_t: unit k's own row of theta gets u_t  (8.2)
            nxt *= fprime[t].T[:, :, None, None]  # J_t = D_t (...)
            np.dot(dh[t].T.reshape(-1), nxt.reshape(n * batch, n * q), out=term)  # (8.4)
            G += term
            self.J, self._next = nxt, J
        return G.reshape(n, q)


def diagonal(J: Array) -> Array:
    """The writable view J[k, :, k, :] over k: (n, batch, q)."""
    s = J.strides
    return np.lib.stride_tricks.as_strided(
        J, shape=(J.shape[0], J.shape[1], J.shape[3]), strides=(s[0] + s[2], s[1], s[3])
    )


def piece_gradients(
    model: ElmanRNN, influence: Influence, traj: Trajectory, e: Array
) -> dict[str, Array]:
    """(8.3)-(8.4) over the steps of one trajectory: every parameter's summed contribution."""
    dh = project(e, model.C)  # (L, batch, n) C^T e_t
    U = theta_inputs(traj, model.b is not None)  # (L, batch, q)
    G = influence.advance(model.A, traj.fprime, dh, U, traj.reset)
    return {**split_theta(G, model), **output_gradients(e, traj.h, model.c is not None)}


def rtrl_gradients(
    model: ElmanRNN,
    x: Array,
    y: Array,
    h0: Array | None = None,
    loss: str = "l2",
    *,
    mask: Array | None = None,
    reset: Array | None = None,
    max_bytes: float = MAX_BYTES,
) -> dict[str, Array]:
    """The gradient of L = sum_t l_t by RTRL (8.1)-(8.4), parameters fixed over the sequence.

    The arguments are those of tbptt.gradients (x (T, [batch,] m), y, h0, loss, mask, reset);
    the result equals its exact gradient to rounding. Returns {"A", "B", "C"[, "b", "c"]}.
    max_bytes: the largest memory allowed for J (an InputError giving the size when more is needed).
    """
    r = run(model, x, y, h0, loss, mask, reset, dense=True)
    batch = r.data.x.shape[1]
    check_influence_size(model, batch, max_bytes)
    return piece_gradients(model, Influence(model, batch), r.traj, r.e)


def RTRL(
    model: ElmanRNN,
    optimizer: SGD | Adam,
    *,
    k1: int = 1,
    loss: str = "l2",
    clip: float | None = None,
    h0: Array | None = None,
    reduction: str = "sum",
    max_bytes: float = MAX_BYTES,
) -> TBPTT:
    """Train an ElmanRNN online with RTRL (Williams and Zipser 1989), updating every k1 steps: a
    tbptt.TBPTT trainer holding RTRL's rule.

    Args:
        model: the ElmanRNN, trained in place (after each update model.A ... are the new values).
        optimizer: tbptt.SGD or tbptt.Adam.
        k1: steps between updates (1: every step, Williams and Zipser's real-time learning).
        loss, clip, h0, reduction: as tbptt.TBPTT.
        max_bytes: the largest memory allowed for the influence matrix J and its buffer; the first
            chunk raises an InputError giving the size when more is needed (nothing trained).

    Each step costs about 2 n^2 |theta| flops per stream (|theta| = n (n + m + 1)).
    """
    rule = RTRLRule(k1=k1, max_bytes=max_bytes)
    return TBPTT(model, rule, optimizer, loss=loss, clip=clip, h0=h0, reduction=reduction)


class RTRLRule(ForwardRule):
    """RTRL's rule: J carried forward (8.3), each piece's contributions (8.4) summed."""

    name = "RTRL"

    def __init__(self, *, k1: int = 1, max_bytes: float = MAX_BYTES) -> None:
        super().__init__(k1)
        self.max_bytes = max_bytes  # checked against the model by bind

    def bind(self, model: ElmanRNN) -> None:
        check_influence_size(model, 1, self.max_bytes)  # a model too large for one stream

    def allocate(self, model: ElmanRNN, batch: int) -> Influence:
        check_influence_size(model, batch, self.max_bytes)
        return Influence(model, batch)

    def contributions(self, model: ElmanRNN, traj: Trajectory, e: Array) -> dict[str, Array]:
        assert isinstance(self.kernel, Influence)  # start() made it
        return piece_gradients(model, self.kernel, traj, e)
