"""UORO (Tallec and Ollivier 2017, "Unbiased Online Recurrent Optimization") for the seed's model:
the frozen estimate and the online rule (forward.py, an update every k1 steps).

SEMANTICS.md 8, in the paper's form: the loss of step t is differentiated through step t. With
theta = (A, B, b) in the row order of rtrl.py (8.1)-(8.2), u_t = (h_{t-1}, x_t, 1) and
D_t = diag(f'(a_t)), each stream carries a rank-one J_{t-1} ~ s~_{t-1} theta~_{t-1}^T:

    (8.5)  step t contributes  (dl_t/dh_{t-1} . s~_{t-1}) theta~_{t-1} + dl_t/dtheta|_(h_{t-1})
           dl_t/dh_{t-1} = A^T D_t C^T e_t,   dl_t/dtheta|_{h_{t-1} fixed} = (D_t C^T e_t) u_t^T
    (8.6)  nu_t in {-1, +1}^n fresh signs;  nu_t^T dF/dtheta|_t = (D_t nu_t) u_t^T
    (8.7)  s~_t = rho0 D_t A s~_{t-1} + rho1 nu_t,
           theta~_t = theta~_{t-1} / rho0 + (D_t nu_t) u_t^T / rho1
    (8.8)  rho0 = sqrt((||theta~_{t-1}|| + eps) / (||D_t A s~_{t-1}|| + eps))
    (8.9)  rho1 = sqrt((||D_t nu_t|| ||u_t|| + eps) / (||nu_t|| + eps)),   eps = 1e-7

s~_0 = 0, theta~_0 = 0, and a reset zeroes that stream's. E[s~_t theta~_t^T] = J_t of (8.3), so the
summed contributions are an unbiased estimate of exact BPTT; C and c get (8.4).

How it is computed. theta~ is kept as kappa Theta with a scalar kappa per stream, so that (8.7)'s
division by rho0 is a scalar update (kappa <- kappa / rho0) and Theta changes by one rank-one term
per step, Theta += beta (D_t nu_t) u_t^T with beta = 1 / (rho1 kappa_t); ||Theta||^2 is updated
from <Theta, (D_t nu_t) u_t^T> = (D_t nu_t)^T Theta u_t. The rank-one terms are added to Theta
FLUSH = 32 at a time, as one product per stream; until then Theta u_t adds their share,
sum_j beta_j (D_j nu_j) (u_j . u_t). The sum of the first terms of (8.5),

    (8.10) sum_t c_t theta~_{t-1} = S_0 Theta_0 + sum_j beta_j S_j (D_j nu_j) u_j^T,
           c_t = dl_t/dh_{t-1} . s~_{t-1},   S_j = sum_{t > j} c_t kappa_{t-1}   (to the next reset)

is then one product over the stacked steps, added to the second terms' (the same u_j). Per step
and stream the loop reads Theta once (Theta u_t) and does O(n + q) work on s~ and the pending
terms; Theta is rescaled (Theta <- kappa Theta, kappa <- 1) when kappa leaves a safe range.
"""

from __future__ import annotations

import numpy as np

from ..checks import check_real
from ..generators import as_generator, rng_state, set_rng_state
from .elman import ElmanRNN, Trajectory, project, run, stacked
from .forward import ForwardRule
from .optim import SGD, Adam
from .rtrl import output_gradients, split_theta, theta_inputs
from .rule import Shell
from .trainer import TBPTT

Array = np.ndarray

EPS = 1e-7
KAPPA_RANGE = {np.dtype(np.float64): 1e100, np.dtype(np.float32): 1e15}  # fold kappa beyond


FLUSH = 32  # rank-one terms added to Theta together, as one product


def dot_rows(a: Array, b: Array) -> Array:
    """Row-wise dot products over the last axis (broadcasting)."""
    return np.vecdot(a, b) if hasattr(np, "vecdot") else np.einsum("...i,...i->...", a, b)


class UOROState:
    """s~, theta~ = kappa Theta and ||Theta||^2 of every stream (8.7), carried across pieces."""

    def __init__(self, model: ElmanRNN, batch: int, eps: float = EPS) -> None:
        n, q, dt = model.n, model.n + model.m + (model.b is not None), model.dtype
        self.s = np.zeros((batch, n), dt)  # s~
        self.Theta = np.zeros((batch, n, q), dt)  # theta~ / kappa, rows of theta
        self.kappa = np.ones(batch, dt)
        self.N2 = np.zeros(batch, dt)  # ||Theta||^2
        self.eps = eps

    def arrays(self) -> dict[str, Array]:
        return {"s": self.s, "Theta": self.Theta, "kappa": self.kappa, "N2": self.N2}

    def advance(
        self, A: Array, fprime: Array, dh: Array, U: Array, reset: Array | None, nu: Array
    ) -> tuple[Array, Array]:
        """Run (8.5)-(8.9) over L steps. Returns R (L, batch, n) and G0 (n, q) such that the
        steps' summed contribution for theta is sum_t R_t^T u_t + G0 (8.10).

        fprime, dh (C^T e_t), nu: (L, batch, n); U: (L, batch, q) u_t; reset: (L, batch) or None.
        """
        L, batch, n = fprime.shape
        eps, dt = self.eps, fprime.dtype
        R = dh * fprime  # (L, batch, n) D_t C^T e_t: the second term of (8.5) is R_t u_t^T
        back = project(R, A)  # (L, batch, n) dl_t/dh_{t-1} = A^T D_t C^T e_t, rows r_t A
        a = fprime * nu  # (L, batch, n) D_t nu_t
        na2, nu2 = dot_rows(a, a), dot_rows(U, U)  # (L, batch)
        nv2 = na2 * nu2  # ||(D_t nu_t) u_t^T||^2
        rho1 = np.sqrt((np.sqrt(nv2) + eps) / (np.sqrt(n) + eps))  # (8.9), ||nu_t|| = sqrt(n)
        omega = np.empty((L, batch), dt)  # c_t kappa_{t-1}
        beta = np.empty((L, batch), dt)
        G0 = np.zeros(self.Theta.shape[1:], dt)
        AT = np.ascontiguousarray(A.T)
        DAs, Tu = np.empty((batch, n), dt), np.empty((batch, n, 1), dt)
        bound = KAPPA_RANGE[np.dtype(dt)]
        resets = reset is not None and reset.any()
        s, Theta, kappa, N2 = self.s, self.Theta, self.kappa, self.N2
        start, Theta0 = 0, Theta.copy()
        f = 0  # steps f..t-1 have their rank-one terms pending: Theta_true = Theta + sum_j ...
        for t in range(L):
            if (
                resets and reset is not None and reset[t].any()
            ):  # the stream restarted: no influence before step t
                self._flush(a, beta, U, f, t)
                f, r = t, reset[t]
                s[r], Theta[r], kappa[r], N2[r] = 0, 0, 1, 0
            np.multiply(dot_rows(back[t], s), kappa, out=omega[t])  # c_t kappa_{t-1}  (8.5)
            np.dot(s, AT, out=DAs)
            DAs *= fprime[t]  # D_t A s~_{t-1}
            rho0 = np.sqrt((kappa * np.sqrt(N2) + eps) / (np.sqrt(dot_rows(DAs, DAs)) + eps))
            np.multiply(DAs, rho0[:, None], out=s)  # (8.7)
            s += rho1[t][:, None] * nu[t]
            np.matmul(Theta, U[t][:, :, None], out=Tu)  # Theta u_t, then the pending terms':
            ip = dot_rows(a[t], Tu[:, :, 0])  # <Theta, (D_t nu_t) u_t^T>
            if t > f:  # sum_j beta_j (a_t . a_j) (u_j . u_t)
                ip += (beta[f:t] * dot_rows(U[f:t], U[t]) * dot_rows(a[f:t], a[t])).sum(axis=0)
            kappa /= rho0  # theta~_{t-1} / rho0
            b = np.divide(1, rho1[t] * kappa, out=beta[t])  # Theta += b (D_t nu_t) u_t^T, pending
            N2 += b * (2 * ip + b * nv2[t])
            np.maximum(N2, 0, out=N2)  # rounding
            if t + 1 - f == FLUSH:
                self._flush(a, beta, U, f, t + 1)
                f = t + 1
            if kappa.max() > bound or kappa.min() < 1 / bound:  # fold kappa into Theta
                self._flush(a, beta, U, f, t + 1)
                f = t + 1
                G0 += self._close(R, a, omega, beta, reset, start, t + 1, Theta0)
                Theta *= kappa[:, None, None]
                N2[...] = dot_rows(Theta.reshape(batch, -1), Theta.reshape(batch, -1))
                kappa[...] = 1
                start, Theta0 = t + 1, Theta.copy()
        self._flush(a, beta, U, f, L)
        G0 += self._close(R, a, omega, beta, reset, start, L, Theta0)
        return R, G0

    def _flush(self, a: Array, beta: Array, U: Array, lo: int, hi: int) -> None:
        """Theta += sum_{j=lo..hi-1} beta_j (D_j nu_j) u_j^T: one product per stream (8.7)."""
        if hi > lo:
            ba = (beta[lo:hi, :, None] * a[lo:hi]).transpose(1, 2, 0)  # (batch, n, K)
            self.Theta += np.matmul(ba, U[lo:hi].transpose(1, 0, 2))  # (batch, n, q)

    @staticmethod
    def _close(R, a, omega, beta, reset, lo, hi, Theta0) -> Array:
        """(8.10) for steps lo..hi-1 run from Theta0 with kappa's scale unchanged: adds
        beta_j S_j D_j nu_j into R[j] and returns S_0 Theta0 summed over the streams."""
        if hi <= lo:
            return np.zeros(Theta0.shape[1:], Theta0.dtype)
        om = omega[lo:hi]  # (K, batch) c_t kappa_{t-1}
        K, batch = om.shape
        S = np.zeros_like(om)  # S_j: suffix sums, summed from the end (no cancellation)
        rs = None if reset is None or not reset[lo:hi].any() else reset[lo:hi]
        if rs is None:
            np.cumsum(om[:0:-1], axis=0, out=S[-2::-1])  # S_j = sum_{t > j} omega_t
            S0 = om[0] + S[0]
        else:  # a reset at step t cuts every j < t off the steps from t on (omega_t is 0 there)
            for j in range(K - 2, -1, -1):
                np.add(om[j + 1], S[j + 1], out=S[j])
                S[j][rs[j + 1]] = 0
            S0 = np.where(rs[0], 0, om[0] + S[0])
        R[lo:hi] += (beta[lo:hi] * S)[:, :, None] * a[lo:hi]
        return np.tensordot(S0, Theta0, axes=1)  # (n, q)


def signs(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> Array:
    """Fresh nu in {-1, +1} (8.6), one double drawn per sign (so draws do not depend on how the
    stream is cut into pieces)."""
    return np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(dtype)


def piece_gradients(
    model: ElmanRNN, state: UOROState, traj: Trajectory, e: Array, rng: np.random.Generator
) -> dict[str, Array]:
    """(8.5)-(8.10) over the steps of one trajectory: every parameter's summed contribution."""
    dh = project(e, model.C)  # (L, batch, n) C^T e_t
    U = theta_inputs(traj, model.b is not None)  # (L, batch, q)
    nu = signs(rng, traj.h.shape, model.dtype)
    R, G0 = state.advance(model.A, traj.fprime, dh, U, traj.reset, nu)
    G = stacked(R).T @ stacked(U) + G0  # (n, q)
    return {**split_theta(G, model), **output_gradients(e, traj.h, model.c is not None)}


def uoro_gradients(
    model: ElmanRNN,
    x: Array,
    y: Array,
    h0: Array | None = None,
    loss: str = "l2",
    *,
    rng: int | np.random.Generator | None,
    mask: Array | None = None,
    reset: Array | None = None,
    eps: float = EPS,
) -> dict[str, Array]:
    """One UORO estimate of the gradient of L = sum_t l_t, parameters fixed over the sequence.

    The arguments are those of tbptt.gradients, and rng: a seed, a numpy Generator or None (fresh
    entropy). E[estimate] = exact BPTT; its variance is measured by
    tbptt.analysis.estimators. Returns {"A", "B", "C"[, "b", "c"]}.
    """
    rng = as_generator(rng)
    r = run(model, x, y, h0, loss, mask, reset, dense=True)
    return piece_gradients(model, UOROState(model, r.data.x.shape[1], eps), r.traj, r.e, rng)


def UORO(
    model: ElmanRNN,
    optimizer: SGD | Adam,
    *,
    k1: int = 1,
    rng: int | np.random.Generator | None = None,
    loss: str = "l2",
    clip: float | None = None,
    h0: Array | None = None,
    reduction: str = "sum",
    eps: float = EPS,
) -> TBPTT:
    """Train an ElmanRNN online with UORO (Tallec and Ollivier 2017), updating every k1 steps: a
    tbptt.TBPTT trainer holding UORO's rule.

    Args:
        model, optimizer, loss, clip, h0, reduction: as tbptt.RTRL.
        k1: steps between updates (1: every step, as in the paper).
        rng: a seed, a numpy Generator or None (fresh entropy) for the signs nu_t; its state is
            saved with the trainer, so a resumed run draws the same signs.
        eps: the eps of rho0 and rho1 (8.8)-(8.9).

    Each step costs O(n^2 + |theta|) per stream: one pass over theta~ and O(n^2) on s~.
    """
    rule = UORORule(k1=k1, rng=rng, eps=eps)
    return TBPTT(model, rule, optimizer, loss=loss, clip=clip, h0=h0, reduction=reduction)


class UORORule(ForwardRule):
    """UORO's rule: s~ and theta~ carried forward (8.7), each piece's contributions (8.5) summed."""

    name = "UORO"

    def __init__(
        self, *, k1: int = 1, rng: int | np.random.Generator | None = None, eps: float = EPS
    ) -> None:
        super().__init__(k1)
        self.eps = check_real("eps", eps, low=0, open_low=True)
        self.rng = as_generator(rng)

    def allocate(self, model: ElmanRNN, batch: int) -> UOROState:
        return UOROState(model, batch, self.eps)

    def contributions(self, model: ElmanRNN, traj: Trajectory, e: Array) -> dict[str, Array]:
        assert isinstance(self.kernel, UOROState)  # start() made it
        return piece_gradients(model, self.kernel, traj, e, self.rng)

    def settings(self, trainer: Shell) -> dict[str, object]:
        return {**super().settings(trainer), "eps": self.eps}

    def state_dict(self, trainer: Shell) -> dict[str, Array]:
        return {**super().state_dict(trainer), "rng": rng_state(self.rng)}

    def read(self, state: dict[str, Array], trainer: Shell):
        probe = np.random.Generator(type(self.rng.bit_generator)())
        set_rng_state(probe, state.get("rng", np.asarray("")))  # refused before anything else
        u_prev, restore = super().read(state, trainer)

        def both() -> None:
            restore()
            self.rng.bit_generator.state = probe.bit_generator.state

        return u_prev, both
