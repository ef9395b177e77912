"""Activations f, g with their derivatives, and the per-step losses l_t with their errors e_t:
SEMANTICS.md 1 (f, g, the L2 and cross-entropy losses) and 2 (e_t = dl_t/dz_t, for an elementwise
g and for softmax), numbered (1.2), (1.4), (1.5) and (2.1) in elman.py.

Each derivative is written in terms of the activation's output where that is cheaper and exact
(tanh' = 1 - h^2, sigmoid' = h (1 - h)), so the forward pass need not keep a_t.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

Array = np.ndarray


@dataclass(frozen=True)
class Activation:
    """An elementwise function h = fn(a) and its derivative f'(a), written in terms of h.

    fn(a, out) may write into out (which may be a itself); grad(h) returns f'(a) from h = fn(a),
    which all four activations allow, so the forward pass keeps h and never a.
    """

    name: str
    fn: Callable[[Array, Array | None], Array]
    grad: Callable[[Array], Array]


def _sigmoid(a: Array, out: Array | None = None) -> Array:
    # 1 / (1 + exp(-a)) = (1 + tanh(a / 2)) / 2: no overflow for large |a|, and in place
    out = np.multiply(a, 0.5, out=out)
    np.tanh(out, out=out)
    out += 1
    out *= 0.5
    return out


def _tanh_grad(h: Array) -> Array:
    fp = h * h
    return np.subtract(1, fp, out=fp)  # tanh'(a) = 1 - h^2, one temporary


def _identity(a: Array, out: Array | None = None) -> Array:
    if out is None:
        return a.copy()
    if out is not a:
        out[...] = a
    return out


ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation("tanh", np.tanh, _tanh_grad),
    "sigmoid": Activation("sigmoid", _sigmoid, lambda h: h * (1 - h)),
    # relu: h > 0 exactly where a > 0
    "relu": Activation(
        "relu", lambda a, out=None: np.maximum(a, 0, out=out), lambda h: (h > 0).astype(h.dtype)
    ),
    "identity": Activation("identity", _identity, lambda h: np.ones_like(h)),
}
OUTPUTS = (*ACTIVATIONS, "softmax")
LOSSES = ("l2", "cross_entropy")


def activation(name: object, argument: str = "f") -> Activation:
    """Look up an elementwise activation by name, with an error that says what exists."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise InputError(f"{argument} must be one of {tuple(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def softmax(z: Array) -> Array:
    """softmax over the last axis, shifted by the max for stability."""
    ez = np.exp(z - z.max(axis=-1, keepdims=True))
    return ez / ez.sum(axis=-1, keepdims=True)


def log_softmax(z: Array) -> Array:
    zs = z - z.max(axis=-1, keepdims=True)
    return zs - np.log(np.exp(zs).sum(axis=-1, keepdims=True))


def output(g: str, z: Array) -> Array:
    """yhat = g(z) (1.4)."""
    return softmax(z) if g == "softmax" else ACTIVATIONS[g].fn(z, None)


def loss_and_error(
    g: str, loss: str, z: Array, y: Array, mask: Array | None
) -> tuple[Array, Array]:
    """Per-step losses l_t (T, batch) and their errors e_t = dl_t/dz_t (T, batch, p).

    z: (T, batch, p). y: (T, batch, p) for "l2", integer (T, batch) for "cross_entropy".
    mask: (T, batch) of 0/1 weights or None; a masked step has l_t = 0 and e_t = 0.
    """
    if loss == "cross_entropy":
        logp = log_softmax(z)  # (T, batch, p)
        l = -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]  # (T, batch)
        e = np.exp(logp)  # softmax(z_t)
        np.put_along_axis(e, y[..., None], np.take_along_axis(e, y[..., None], -1) - 1, axis=-1)
    else:
        yhat = z if g == "identity" else output(g, z)  # (T, batch, p); z is not modified
        r = yhat - y  # residual
        l = 0.5 * np.einsum("tbp,tbp->tb", r, r)
        if g == "softmax":
            # vector-Jacobian product of softmax: J^T r = yhat * (r - <yhat, r>)
            e = yhat * (r - np.einsum("tbp,tbp->tb", yhat, r)[..., None])
        elif g == "identity":
            e = r  # (2.1) with g' = 1
        else:
            e = r * ACTIVATIONS[g].grad(yhat)  # (2.1)
    if mask is not None:
        l = l * mask
        e = e * mask[..., None]
    return l, e
