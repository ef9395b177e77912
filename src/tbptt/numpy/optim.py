"""Optimizers for the numpy engine, as pure functions of (params, grads, state).

Each follows torch.optim's update exactly, so both engines train to the same parameters:

    SGD:       v <- mu v + g (v = g at the first step);  p <- p - lr v
               (momentum mu; v = g when mu = 0)
               nesterov: p <- p - lr (g + mu v)
    Adam:      m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
               p <- p - lr/(1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)
    clipping:  g <- g * min(1, max_norm / (||g|| + 1e-6))   (Pascanu, Mikolov and Bengio 2013,
               Algorithm 1, with the 1e-6 that torch.nn.utils.clip_grad_norm_ adds)

An optimizer never modifies parameters or state in place: it returns new arrays, so a graph that
still holds the old values (an overlapping window, SEMANTICS.md 5) stays valid. A caller that owns
its gradient arrays may pass reuse_grads=True: the new parameters are then written into them (the
same values, bit for bit), which saves an allocation and a pass per parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..checks import check_real
from ..errors import InputError

Array = np.ndarray
Params = dict[str, Array]


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent with optional (Nesterov) momentum, like torch.optim.SGD."""

    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        check_real("lr", self.lr, low=0, open_low=True)
        check_real("momentum", self.momentum, low=0)
        if self.nesterov and self.momentum == 0:
            raise InputError(
                "nesterov=True needs momentum > 0, got momentum=0 (as torch.optim.SGD)"
            )

    def init(self, params: Params) -> dict[str, Array]:
        return {}

    def step(
        self, params: Params, grads: Params, state: dict[str, Array], *, reuse_grads: bool = False
    ) -> tuple[Params, dict]:
        new, state = {}, dict(state)
        for k, p in params.items():
            g = grads[k]
            if self.momentum:
                v = g.copy() if k not in state else self.momentum * state[k] + g
                state[k] = v
                g = g + self.momentum * v if self.nesterov else v
            if reuse_grads and not self.momentum:
                out = np.multiply(g, -self.lr, out=g)  # -(lr g), exactly
                new[k] = np.add(out, p, out=out)  # p - lr g, the same bits
            else:
                new[k] = p - self.lr * g
        return new, state


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma and Ba 2015), like torch.optim.Adam with its default eps."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_real("lr", self.lr, low=0, open_low=True)
        for name in ("beta1", "beta2"):
            b = getattr(self, name)
            if not 0 <= b < 1:
                raise InputError(f"{name} must be in [0, 1), got {b!r}")
        check_real("eps", self.eps, low=0, open_low=True)

    def init(self, params: Params) -> dict[str, Array]:
        state = {"step": np.zeros((), np.int64)}
        for k, p in params.items():
            state["m." + k] = np.zeros_like(p)
            state["v." + k] = np.zeros_like(p)
        return state

    def step(
        self, params: Params, grads: Params, state: dict[str, Array], *, reuse_grads: bool = False
    ) -> tuple[Params, dict]:
        k_step = int(state["step"]) + 1
        new_state = {"step": np.asarray(k_step, np.int64)}
        new = {}
        c1 = 1 - self.beta1**k_step
        c2 = math.sqrt(1 - self.beta2**k_step)
        for k, p in params.items():
            g = grads[k]
            # each line evaluates as b1 m + (1 - b1) g, b2 v + ((1 - b2) g) g and
            # p - ((lr / c1) m) / (sqrt(v) / c2 + eps), with two temporaries instead of eight
            t = np.multiply(g, 1 - self.beta1)
            m = np.multiply(state["m." + k], self.beta1)
            m += t
            np.multiply(g, 1 - self.beta2, out=t)
            t *= g
            v = np.multiply(state["v." + k], self.beta2)
            v += t
            new_state["m." + k], new_state["v." + k] = m, v
            d = np.sqrt(v, out=g if reuse_grads else None)
            d /= c2
            d += self.eps
            np.multiply(m, self.lr / c1, out=t)
            t /= d
            new[k] = np.subtract(p, t, out=t)
        return new, new_state


Optimizer = SGD | Adam


def grad_norm(grads: Params) -> float:
    """The global L2 norm over every gradient array."""
    return math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))


def all_finite(arrays) -> bool:
    """Whether every element of every array is finite: one pass each through BLAS's dot product
    (a sum of squares of finite values is finite unless it overflows, and then the exact
    elementwise test decides)."""
    arrays = list(arrays)
    if math.isfinite(sum(float(np.vdot(a, a)) for a in arrays)):
        return True
    return all(bool(np.isfinite(a).all()) for a in arrays)


def clip_coefficient(norm: float, max_norm: float) -> float:
    """The factor clipping applies to every gradient (it clips only when below 1)."""
    return max_norm / (norm + 1e-6)


def clipped_step(
    optimizer: Optimizer,
    params: Params,
    grads: Params,
    state: dict[str, Array],
    clip: float | None,
    divisor: float = 1.0,
) -> tuple[float, Params | None, dict]:
    """One update from fresh gradient arrays, which it overwrites: the gradients divided by
    divisor ((5)'s mean), their global norm, then, if the norm is finite, clipping and the
    optimizer's step. Returns the norm, the new parameters (None when one is not finite) and the
    new state (the old one when the norm is not finite). fast.optimizer_step is the same in one
    compiled call."""
    if divisor != 1:
        for g in grads.values():
            g /= divisor
    norm = grad_norm(grads)  # one pass
    if not math.isfinite(norm):
        return norm, None, state
    coef = 1.0 if clip is None else clip_coefficient(norm, clip)
    if coef < 1:  # clip_grad_norm, in place: the arrays are ours
        for g in grads.values():
            g *= coef
    new, state = optimizer.step(params, grads, state, reuse_grads=True)
    return norm, (new if all_finite(new.values()) else None), state


def clip_grad_norm(grads: Params, max_norm: float) -> tuple[Params, float]:
    """Rescale all gradients together when their global norm exceeds max_norm; returns the norm."""
    norm = grad_norm(grads)
    coef = clip_coefficient(norm, max_norm)
    if coef < 1:
        grads = {k: g * coef for k, g in grads.items()}
    return grads, norm
