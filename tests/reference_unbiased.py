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
    y3 = np.asarray(y).reshape(T, batch, -1) if np.ndim(y) > (1 if single else 2) else np.asarray(y).reshape(T, batch)
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
    n, m, p = model.n, model.m, model.p
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
        start = np.zeros(n) if h0 is None else np.broadcast_to(np.asarray(h0, float), (x3.shape[1], n))[s]
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
    return {k: (np.zeros(np.shape(v)) if g is None else g.numpy()) for (k, v), g in zip(P.items(), grads, strict=True)}


__all__ = ["artbp_torch", "rtrl_direct", "torch_optimizer", "uoro_direct"]
