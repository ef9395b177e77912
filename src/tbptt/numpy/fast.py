"""Which per-step loops run compiled: the optional numba kernels of the `tbptt[fast]` extra.

The numpy code in elman.py, optim.py and trainer.py is the reference. When numba is installed
(`pip install tbptt[fast]`), a single stream's work runs as compiled loops instead (compiled.py):
at batch 1 every numpy call handles one row of n numbers and the work is a count of calls, which
the compiled loops remove. With several streams each step is a matrix product that BLAS does
better, so the numpy code keeps them. Each function below returns the compiled twin of one
reference function, with its signature, or None (the reference runs):

    forward_loop     elman.forward_steps      (1.1), (1.2)
    backward_loop    elman.backward_steps     (3.1)
    forward_piece    elman.forward_loss's     a piece of online training: (1.1)-(1.4), l_t and
                     numpy branch             e_t (2.1) and section 6's check, in one call
    error_loop       elman.backprop_errors's  (5.2) over a segment, C^T e_t inside the loop
                     numpy branch
    gradient_sums    elman.parameter_gradients  (2.3), (2.4) over a window's few stacked rows
    optimizer_step   optim.clipped_step       the update: (5)'s mean, the norm, clipping, the
                                              SGD or Adam step and section 6's checks, one call

So online TBPTT of one stream (tbptt.TBPTT at batch 1) runs a piece in one compiled call and an
update in a few, where the numpy code makes about 25 calls.

    TBPTT_NUMBA=0     switch the compiled loops off (read at every call; tests use both paths)

The results agree with the numpy code to rounding (1e-12 relative in float64). numba is
imported on the first loop that would use it, never by `import tbptt`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from types import ModuleType

import numpy as np

from .optim import SGD, Adam

ENV = "TBPTT_NUMBA"
ACTIVATION_CODES = {"tanh": 0, "sigmoid": 1, "relu": 2, "identity": 3}  # f in compiled.py
OUTPUT_CODES = {**ACTIVATION_CODES, "softmax": 4}  # g in compiled.py
MAX_BATCH = 1  # streams up to which the compiled loops run (measured: BLAS wins from 2 on)
MAX_SUM_ROWS = 64  # stacked rows up to which compiled.gradient_sums runs (BLAS wins beyond)


OFF = ("0", "false", "no", "off")
# os.environ's own mapping (encoded keys and values), which os.environ[...] = and monkeypatch
# update: a read of it costs 0.1 us where os.environ.get costs about 1 us, and a batch-1 update
# asks four times. None where os.environ is not CPython's _Environ (then os.environ.get).
_RAW = getattr(os.environ, "_data", None)
_KEY = getattr(os.environ, "encodekey", lambda k: k)(ENV)


def _switched_off() -> bool:
    raw = os.environ.get(ENV) if _RAW is None else _RAW.get(_KEY)
    if raw is None:
        return False
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return text.strip().lower() in OFF


def compiled() -> ModuleType | None:
    """tbptt.compiled when numba is installed and TBPTT_NUMBA=0 does not switch it off."""
    if _switched_off():
        return None
    return _load()


def kernels(batch: int) -> ModuleType | None:
    """tbptt.compiled when it should run the loops of `batch` streams, else None (numpy)."""
    return None if batch > MAX_BATCH else compiled()


@functools.cache
def _load() -> ModuleType | None:
    try:
        from . import compiled
    except ImportError:  # numba is not installed: the numpy loops run
        return None
    return compiled


def forward_loop(batch: int) -> Callable | None:
    """The compiled forward loop for `batch` streams, called as elman.forward_steps(hs, A, f,
    reset, restart) -> f'(a_t), or None (the numpy loop runs)."""
    k = kernels(batch)
    if k is None:
        return None

    def steps(hs, A, f: str, reset, restart):
        fprime = np.empty_like(hs[1:])  # (T, batch, n), written with h_t
        cut = None if reset is None else np.ascontiguousarray(reset)
        A, restart = np.ascontiguousarray(A), np.ascontiguousarray(restart)
        k.forward_steps(hs, A, ACTIVATION_CODES[f], fprime, cut, restart)
        return fprime

    return steps


def backward_loop(batch: int) -> Callable | None:
    """The compiled backward loop for `batch` streams, called as elman.backward_steps(R, fprime,
    A, dh, back, cut), or None (the numpy loop runs)."""
    k = kernels(batch)
    if k is None:
        return None

    def steps(R, fprime, A, dh, back, cut):
        cut = None if cut is None else np.ascontiguousarray(cut)
        k.backward_steps(R, fprime, np.ascontiguousarray(A), dh, back, cut)

    return steps


def forward_piece(batch: int) -> Callable | None:
    """The compiled piece for `batch` streams, called as piece(model, loss, x, y, mask, cut,
    restart, hs) -> (fprime, z, l, e, bad) (elman.forward_loss), or None (the numpy code runs)."""
    k = kernels(batch)
    if k is None:
        return None

    def steps(model, loss: str, x, y, mask, cut, restart, hs):
        T, p = len(hs) - 1, model.p
        fprime = np.empty_like(hs[1:])  # (T, batch, n)
        z = np.empty((T, batch, p), hs.dtype)
        e = np.empty((T, batch, p), hs.dtype)
        l = np.empty((T, batch), hs.dtype)
        ids = getattr(x, "ids", None)  # a OneHot's ids (T, batch), or None
        xent = loss == "cross_entropy"
        bad = k.forward_piece(
            hs,
            x if ids is None else ids,
            np.ascontiguousarray(model.B),
            model.b,
            np.ascontiguousarray(model.A),
            ACTIVATION_CODES[model.f],
            fprime,
            None if cut is None else np.ascontiguousarray(cut),
            np.ascontiguousarray(restart),
            np.ascontiguousarray(model.C),
            model.c,
            OUTPUT_CODES[model.g],
            None if xent else y,
            y if xent else None,
            mask,
            z,
            l,
            e,
        )
        return fprime, z, l, e, bad

    return steps


def error_loop(batch: int) -> Callable | None:
    """The compiled window recursion with its injected C^T e_t, called as steps(R, fprime, A, C,
    e, back, cut) (elman.backprop_errors), or None (the numpy code runs)."""
    k = kernels(batch)
    if k is None:
        return None

    def steps(R, fprime, A, C, e, back, cut):
        cut = None if cut is None else np.ascontiguousarray(cut)
        k.backward_errors(R, fprime, np.ascontiguousarray(A), np.ascontiguousarray(C), e, back, cut)

    return steps


def gradient_sums(batch: int, rows: int) -> Callable | None:
    """The compiled sums (2.3), (2.4) over `rows` stacked rows of `batch` streams, called as
    elman.parameter_gradients(R, h_prev, x, e, h, bias_b, bias_c), or None (BLAS's products)."""
    k = kernels(batch)
    if k is None or rows > MAX_SUM_ROWS:
        return None

    def sums(R, h_prev, x, e, h, bias_b: bool, bias_c: bool) -> dict[str, np.ndarray]:
        n, p, dt = R.shape[-1], e.shape[-1], R.dtype
        ids = getattr(x, "ids", None)  # a OneHot's ids, or None
        m = x.m if ids is not None else x.shape[-1]
        g = {"A": np.empty((n, n), dt), "B": np.empty((n, m), dt), "C": np.empty((p, n), dt)}
        if bias_b:
            g["b"] = np.empty(n, dt)
        if bias_c:
            g["c"] = np.empty(p, dt)
        k.gradient_sums(
            _rows(R),
            _rows(h_prev),
            _rows(x) if ids is None else ids.reshape(-1),
            _rows(e),
            _rows(h),
            g["A"],
            g["B"],
            g["C"],
            g.get("b"),
            g.get("c"),
        )
        return g

    return sums


def optimizer_step(batch: int) -> Callable | None:
    """The compiled update, called as optim.clipped_step(optimizer, params, grads, state, clip,
    divisor) -> (norm, new params or None, new state), or None (the numpy code runs)."""
    k = kernels(batch)
    if k is None:
        return None

    def step(optimizer, params: dict, grads: dict, state: dict, clip, divisor: float):
        names = list(params)
        new = {q: np.ascontiguousarray(grads[q]) for q in names}  # written with the new values
        ps, gs = _flat(params.values()), _flat(new.values())
        limit = 0.0 if clip is None else float(clip)
        if isinstance(optimizer, Adam):
            k_step = int(state["step"]) + 1
            new_state = {"step": np.asarray(k_step, np.int64)}
            for q in names:
                new_state["m." + q] = np.empty_like(new[q])
                new_state["v." + q] = np.empty_like(new[q])
            norm, ok = k.adam_update(
                ps,
                gs,
                _flat(state["m." + q] for q in names),
                _flat(state["v." + q] for q in names),
                _flat(new_state["m." + q] for q in names),
                _flat(new_state["v." + q] for q in names),
                optimizer.lr,
                optimizer.beta1,
                optimizer.beta2,
                optimizer.eps,
                1 - optimizer.beta1**k_step,
                math.sqrt(1 - optimizer.beta2**k_step),
                float(divisor),
                limit,
            )
        else:
            assert isinstance(optimizer, SGD)
            mu, first = optimizer.momentum, not state
            new_state = {q: np.empty_like(new[q]) for q in names} if mu else {}
            v1s = _flat(new_state.values()) if mu else gs
            v0s = v1s if first or not mu else _flat(state[q] for q in names)
            norm, ok = k.sgd_update(
                ps, gs, v0s, v1s, first, optimizer.lr, mu, optimizer.nesterov, float(divisor), limit
            )
        if not math.isfinite(norm):
            return norm, None, state
        return norm, (new if ok else None), new_state

    return step


def _rows(a: np.ndarray) -> np.ndarray:
    """(T, batch, k) -> (T * batch, k), C-contiguous (a view when a is)."""
    return np.ascontiguousarray(a).reshape(-1, a.shape[-1])


def _flat(arrays) -> tuple[np.ndarray, ...]:
    """Each array as a C-contiguous 1-d array (a view when it is C-contiguous)."""
    return tuple(np.ascontiguousarray(a).reshape(-1) for a in arrays)
