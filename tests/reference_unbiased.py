"""Independent references for RTRL, UORO and ARTBP (SEMANTICS.md 8), written from the contract's
formulas step by step and stream by stream, with none of the engine's arithmetic.

    rtrl_direct      RTRL with the dense influence matrix J_t (n x |theta|) per stream, theta
                     flattened as (A.ravel(), B.ravel(), b), built entry by entry
    uoro_direct      UORO with explicit vectors s~ and theta~ per stream and the contract's rho0,
                     rho1 (the same signs: nu_t = -1 where rng.random((T, batch, n)) < 0.5)
    artbp_torch      ARTBP by torch autograd for given cut times: one graph per window, the state
                     gradient scaled by 1 / (1 - c_L) where the window crosses an uncut boundary
    OnlineDirect     online training with any of the three (the update every k1 steps, or at every
                     cut), torch.optim applying the updates

Arrays follow the engine's layout (reference.Data); gradients come back keyed like the engine's.
"""

from __future__ import annotations

import numpy as np
import torch
from reference import DTYPE, Data, leaves, restart, state_step, step_loss, tensor, torch_optimizer

ACT = {
    "tanh": (np.tanh, lambda h: 1 - h * h),
    "sigmoid": (lambda a: 1 / (1 + np.exp(-a)), lambda h: h * (1 - h)),
    "relu": (lambda a: np.maximum(a, 0), lambda h: (h > 0).astype(float)),
    "identity": (lambda a: a, lambda h: np.ones_like(h)),
}


def _errors(model, z, y, loss, mask_t):
    """e_t = dl_t/dz_t for one stream and step, by the contract's formulas (section 2)."""
    if loss == "cross_entropy":
        p = np.exp(z - z.max())
        p /= p.sum()
        e = p.copy()
        e[int(y)] -= 1
    else:
        g = model.g
        if g == "softmax":
            yh = np.exp(z - z.max())
            yh /= yh.sum()
            r = yh - y
            e = yh * (r - yh @ r)
        else:
            yh = ACT[g][0](z)
            e = (yh - y) * ACT[g][1](yh)
    return e * (1.0 if mask_t is None else mask_t)


def _stream(x, y, mask, reset, batch_axis):
    x = np.asarray(x, float)
    single = x.ndim == 2
    T = x.shape[0]
    x3 = x[:, None] if single else x
    batch = x3.shape[1]
    y3 = (
        np.asarray(y).reshape(T, batch, -1)
        if np.ndim(y) > (1 if single else 2)
        else np.asarray(y).reshape(T, batch)
    )
    m3 = None if mask is None else np.reshape(mask, (T, batch))
    r3 = None if reset is None else np.reshape(reset, (T, batch))
    return x3, y3, m3, r3


def _immediate(n, m, bias, fp, h_prev, x_t):
    """dF/dtheta|_t = D_t da_t/dtheta, (n, |theta|), theta = (A.ravel(), B.ravel(), b)."""
    M = np.zeros((n, n * n + n * m + (n if bias else 0)))
    for k in range(n):
        M[k, k * n : (k + 1) * n] = h_prev
        M[k, n * n + k * m : n * n + (k + 1) * m] = x_t
        if bias:
            M[k, n * n + n * m + k] = 1.0
    return fp[:, None] * M


def _unflatten(g, model):
    n, m = model.n, model.m
    out = {"A": g[: n * n].reshape(n, n), "B": g[n * n : n * n + n * m].reshape(n, m)}
    if model.b is not None:
        out["b"] = g[n * n + n * m :]
    return out


def _trajectory(model, x3, h0, r3, s):
    """States and f'(a_t) of stream s, plain loops."""
    f, fgrad = ACT[model.f]
    A, B = model.A, model.B
    b = 0 if model.b is None else model.b
    h = h0.copy()
    hp, hs, fps = [], [], []
    for t in range(len(x3)):
        if r3 is not None and r3[t, s]:
            h = h0.copy()
        hp.append(h)
        h = f(A @ h + B @ x3[t, s] + b)
        hs.append(h)
        fps.append(fgrad(h))
    return hp, hs, fps


def rtrl_direct(model, x, y, h0=None, loss="l2", *, mask=None, reset=None):
    """Frozen RTRL, dense J per stream (section 8)."""
    x3, y3, m3, r3 = _stream(x, y, mask, reset, True)
    n, m = model.n, model.m
    bias = model.b is not None
    P = n * n + n * m + (n if bias else 0)
    gt = np.zeros(P)
    gC = np.zeros_like(model.C)
    gc = np.zeros(model.p)
    for s in range(x3.shape[1]):
        start = (
            np.zeros(n)
            if h0 is None
            else np.broadcast_to(np.asarray(h0, float), (x3.shape[1], n))[s]
        )
        hp, hs, fps = _trajectory(model, x3, start, r3, s)
        J = np.zeros((n, P))
        for t in range(len(x3)):
            if r3 is not None and r3[t, s]:
                J = np.zeros((n, P))
            J = fps[t][:, None] * (model.A @ J) + _immediate(n, m, bias, fps[t], hp[t], x3[t, s])
            z = model.C @ hs[t] + (0 if model.c is None else model.c)
            e = _errors(model, z, y3[t, s], loss, None if m3 is None else m3[t, s])
            gt += (model.C.T @ e) @ J
            gC += np.outer(e, hs[t])
            gc += e
    out = {**_unflatten(gt, model), "C": gC}
    if model.c is not None:
        out["c"] = gc
    return out


def uoro_direct(model, x, y, rng, h0=None, loss="l2", *, mask=None, reset=None, eps=1e-7):
    """Frozen UORO with explicit s~, theta~ per stream (section 8); signs from rng."""
    x3, y3, m3, r3 = _stream(x, y, mask, reset, True)
    T, batch = x3.shape[:2]
    n, m = model.n, model.m
    bias = model.b is not None
    P = n * n + n * m + (n if bias else 0)
    nus = np.where(rng.random((T, batch, n)) < 0.5, -1.0, 1.0)
    gt = np.zeros(P)
    gC = np.zeros_like(model.C)
    gc = np.zeros(model.p)
    for s in range(batch):
        start = np.zeros(n) if h0 is None else np.broadcast_to(np.asarray(h0, float), (batch, n))[s]
        hp, hs, fps = _trajectory(model, x3, start, r3, s)
        st, tt = np.zeros(n), np.zeros(P)
        for t in range(T):
            if r3 is not None and r3[t, s]:
                st, tt = np.zeros(n), np.zeros(P)
            z = model.C @ hs[t] + (0 if model.c is None else model.c)
            e = _errors(model, z, y3[t, s], loss, None if m3 is None else m3[t, s])
            dh = model.C.T @ e
            dl_dhprev = model.A.T @ (fps[t] * dh)
            F = _immediate(n, m, bias, fps[t], hp[t], x3[t, s])  # dF/dtheta|_t
            gt += (dl_dhprev @ st) * tt + dh @ F
            gC += np.outer(e, hs[t])
            gc += e
            nu = nus[t, s]
            DAs = fps[t] * (model.A @ st)
            nuF = nu @ F
            rho0 = np.sqrt((np.linalg.norm(tt) + eps) / (np.linalg.norm(DAs) + eps))
            rho1 = np.sqrt((np.linalg.norm(nuF) + eps) / (np.linalg.norm(nu) + eps))
            st = rho0 * DAs + rho1 * nu
            tt = tt / rho0 + nuF / rho1
    out = {**_unflatten(gt, model), "C": gC}
    if model.c is not None:
        out["c"] = gc
    return out


def artbp_torch(model, x, y, cuts, weights, h0=None, loss="l2", *, mask=None, reset=None):
    """Frozen ARTBP by autograd, for given cuts (boundaries after these steps, 1-based) and
    weights {step tau: 1 / (1 - c_L)} of the possible boundaries after tau that were not cut."""
    data = Data(x, y, loss, mask, reset)
    P = leaves(model.params)
    h0v = np.zeros(model.n) if h0 is None else h0
    h0t = tensor(h0v).expand(data.batch, model.n)
    h = h0t
    bounds = sorted(set(cuts) | {data.T})
    L = torch.zeros((), dtype=DTYPE)
    for t in range(data.T):
        h = state_step(P, model.f, restart(data, t, h, h0t), data.x[t])
        L = L + step_loss(P, model.g, data, h, t).sum()
        tau = t + 1
        if tau in bounds:
            h = h.detach()  # a cut: the gradient stops here
        elif tau in weights:
            w = weights[tau]
            h = h.detach() + w * (h - h.detach())  # forward value h, gradient times w
    grads = torch.autograd.grad(L, list(P.values()), allow_unused=True)
    return {
        k: (np.zeros(np.shape(v)) if g is None else g.numpy())
        for (k, v), g in zip(P.items(), grads, strict=True)
    }


__all__ = ["artbp_torch", "rtrl_direct", "torch_optimizer", "uoro_direct"]


def artbp_cuts(T, c, b, rng, max_length=None):
    """ARTBP's cuts among the boundaries after steps b, 2b, ... < T+1 (one uniform number each, in
    order) and the weights 1 / (1 - c_L) of the others: (cuts, {step: weight})."""
    cuts, weights, last = [], {}, 0
    taus = list(range(b, T + 1, b))
    draws = rng.random(len(taus))
    for tau, u in zip(taus, draws, strict=True):
        L = tau - last
        p = c(L) if callable(c) else c
        if (max_length is not None and L + b > max_length) or u < p:
            cuts.append(tau)
            last = tau
        else:
            weights[tau] = 1 / (1 - p)
    return cuts, weights


class OnlineDirect:
    """Online RTRL / UORO (an update every k1 steps, the influence carried across updates) or
    ARTBP (an update at every cut), step by step with the contract's formulas; torch.optim
    applies the updates. One stream fed whole (x (T, [batch,] m)); finish() applies what is left.
    """

    def __init__(self, method, model, optimizer, k1=1, c=None, b=1, rng=None, clip=None, h0=None):
        self.method, self.k1, self.c, self.b, self.rng, self.clip = method, k1, c, b, rng, clip
        self.f, self.g, self.n, self.m = model.f, model.g, model.n, model.m
        self.W = leaves(model.params)
        self.opt = torch_optimizer(optimizer, list(self.W.values()))
        self.h0 = h0

    @property
    def params(self):
        return {k: v.detach().numpy().copy() for k, v in self.W.items()}

    def _step(self, grads):
        for k, v in self.W.items():
            v.grad = torch.tensor(grads[k], dtype=DTYPE)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.W.values()), self.clip)
        self.opt.step()

    def run(self, x, y, loss="l2", mask=None, reset=None):
        if self.method == "artbp":
            return self._artbp(x, y, loss, mask, reset)
        from tbptt import ElmanRNN

        x3, y3, m3, r3 = _stream(x, y, mask, reset, True)
        T, batch = x3.shape[:2]
        n, m = self.n, self.m
        bias = "b" in self.W
        P = n * n + n * m + (n if bias else 0)
        h0 = np.zeros((batch, n)) if self.h0 is None else np.broadcast_to(self.h0, (batch, n))
        h = np.array(h0, float)
        J = np.zeros((batch, n, P))
        st, tt = np.zeros((batch, n)), np.zeros((batch, P))
        nus = (
            None
            if self.method != "uoro"
            else np.where(self.rng.random((T, batch, n)) < 0.5, -1.0, 1.0)
        )
        acc = None
        f, fgrad = ACT[self.f]
        for t in range(T):
            model = ElmanRNN(**self.params, f=self.f, g=self.g)
            b_ = 0 if model.b is None else model.b
            gt, gC, gc = np.zeros(P), np.zeros_like(model.C), np.zeros(model.p)
            for s in range(batch):
                if r3 is not None and r3[t, s]:
                    h[s], J[s], st[s], tt[s] = h0[s], 0, 0, 0
                hp = h[s].copy()
                h[s] = f(model.A @ hp + model.B @ x3[t, s] + b_)
                fp = fgrad(h[s])
                F = _immediate(n, m, bias, fp, hp, x3[t, s])
                z = model.C @ h[s] + (0 if model.c is None else model.c)
                e = _errors(model, z, y3[t, s], loss, None if m3 is None else m3[t, s])
                dh = model.C.T @ e
                if self.method == "rtrl":
                    J[s] = fp[:, None] * (model.A @ J[s]) + F
                    gt += dh @ J[s]
                else:
                    gt += (model.A.T @ (fp * dh) @ st[s]) * tt[s] + dh @ F
                    nu = nus[t, s]
                    DAs = fp * (model.A @ st[s])
                    nuF = nu @ F
                    rho0 = np.sqrt((np.linalg.norm(tt[s]) + 1e-7) / (np.linalg.norm(DAs) + 1e-7))
                    rho1 = np.sqrt((np.linalg.norm(nuF) + 1e-7) / (np.linalg.norm(nu) + 1e-7))
                    st[s], tt[s] = rho0 * DAs + rho1 * nu, tt[s] / rho0 + nuF / rho1
                gC += np.outer(e, h[s])
                gc += e
            g = {**_unflatten(gt, model), "C": gC}
            if model.c is not None:
                g["c"] = gc
            acc = g if acc is None else {k: acc[k] + g[k] for k in g}
            if (t + 1) % self.k1 == 0 or t == T - 1:
                self._step(acc)
                acc = None

    def _artbp(self, x, y, loss, mask, reset):
        data = Data(x, y, loss, mask, reset)
        cuts, weights = artbp_cuts(data.T, self.c, self.b, self.rng)
        ends = sorted(set(cuts) | {data.T})
        h0t = tensor(np.zeros(self.n) if self.h0 is None else self.h0).expand(data.batch, self.n)
        h, t = h0t, 0
        for u in ends:
            if u <= t:
                continue
            h = h.detach()
            L = torch.zeros((), dtype=DTYPE)
            for r in range(t, u):
                h = state_step(self.W, self.f, restart(data, r, h, h0t), data.x[r])
                L = L + step_loss(self.W, self.g, data, h, r).sum()
                if r + 1 in weights and r + 1 < u:
                    w = weights[r + 1]
                    h = h.detach() + w * (h - h.detach())
            for v in self.W.values():
                v.grad = None
            L.backward()
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(list(self.W.values()), self.clip)
            self.opt.step()
            t = u
