"""Which per-step loops run compiled: the optional numba kernels of the `tbptt[fast]` extra.

The numpy loops in elman.py are the reference. When numba is installed (`pip install
tbptt[fast]`), the recurrences (1.1)-(1.2) and (3.1) of a single stream run as compiled loops
instead (compiled.py): at batch 1 every numpy call handles one row of n numbers and the loop is
a count of calls, which the compiled loop removes. With several streams each step is a matrix
product that BLAS does better, so the numpy loop keeps them.

    TBPTT_NUMBA=0     switch the compiled loops off (read at every call; tests use both paths)

The results agree with the numpy loops to rounding (1e-12 relative in float64). numba is
imported on the first loop that would use it, never by `import tbptt`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from types import ModuleType

import numpy as np

ENV = "TBPTT_NUMBA"
ACTIVATION_CODES = {"tanh": 0, "sigmoid": 1, "relu": 2, "identity": 3}  # f in compiled.py
MAX_BATCH = 1  # streams up to which the compiled loops run (measured: BLAS wins from 2 on)


def compiled() -> ModuleType | None:
    """tbptt.compiled when numba is installed and TBPTT_NUMBA=0 does not switch it off."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
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
