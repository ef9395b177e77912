"""Validation at the public boundary: every error names the argument, its value and the expectation.

Arrays are time-major: x is (T, m) for one stream or (T, batch, m) for a batch of streams. Inside
the engine everything is promoted to the batched form (T, batch, ...).

A batch-first array (batch, T, m), as torch.nn.LSTM(batch_first=True) takes, is read as T = batch
steps of T streams: its shape alone cannot tell. Where another argument's shape tells (it is the
time-major one with T and batch swapped, or h0 has a row per step rather than per stream), the
error says that the array looks batch-first; every message about shapes names the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import InputError
from ..inputs import OneHot
from .functions import LOSSES

Array = np.ndarray
FLOATS = (np.float32, np.float64)
LEAD = {1: "(T,)", 2: "(T, batch)"}  # the layout of a per-step array, one stream or a batch


def batch_first(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """A clause for an error when `got` is the time-major shape `want` with its first two axes
    (T and batch) swapped: the array looks batch-first."""
    if len(got) == len(want) >= 2 and want[0] != want[1] and got == (want[1], want[0], *want[2:]):
        return (
            f": {name} has x's steps and streams swapped, so one of them is batch-first (batch, "
            "T, ...) while tbptt's arrays are time-major (T, batch, ...); np.swapaxes(a, 0, 1) "
            "turns a batch-first array a time-major"
        )
    return ""


def as_float_array(
    name: str, value: object, dtype: np.dtype | None = None, keep: Array | None = None
) -> Array:
    """A real, finite array; converted to dtype (the model's) when given. keep: a bool array over
    the leading axes, where the entries must be finite (the others are set to 0: masked steps)."""
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise InputError(
            f"{name} must be an array of real numbers, got {type(value).__name__}"
        ) from exc
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or arr.dtype == bool
    ):
        raise InputError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        if keep is not None and arr.shape[: keep.ndim] == keep.shape:  # masked steps: never
            keep = keep.reshape(keep.shape + (1,) * (arr.ndim - keep.ndim))
            arr = np.where(keep, arr, arr.dtype.type(0))  # read, 0 there
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise InputError(
            f"{name} must be finite, got {arr[tuple(bad)]} at index {tuple(int(i) for i in bad)}"
        )
    return arr


def as_param(name: str, value: object, shape: tuple[int, ...] | None, ndim: int) -> Array:
    arr = np.asarray(value) if value is not None else None
    if arr is None or arr.dtype.type not in FLOATS:
        got = "None" if arr is None else f"dtype {arr.dtype}"
        raise InputError(f"{name} must be a float32 or float64 array, got {got}")
    if arr.ndim != ndim or (shape is not None and arr.shape != shape):
        want = shape if shape is not None else f"{ndim} dimensions"
        raise InputError(f"{name} must have shape {want}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} must be finite, got a non-finite entry")
    return arr


@dataclass(frozen=True)
class Batch:
    """Inputs checked and promoted to the batched, time-major layout."""

    x: Array | OneHot  # (T, batch, m), or the ids (T, batch) of one-hot inputs
    y: Array  # (T, batch, p) float for L2, (T, batch) int for cross-entropy
    mask: Array | None  # (T, batch) in the model's dtype
    reset: Array | None  # (T, batch) bool
    single: bool  # the caller passed one stream (no batch axis)


def dense_inputs(data: Batch, dtype: np.dtype) -> Batch:
    """data with a OneHot x as its one-hot rows (T, batch, m): for the estimators that stack
    u_t = (h_{t-1}, x_t, 1) (RTRL, UORO, online ARTBP); their per-step work dwarfs the lookup's
    saving."""
    return replace(data, x=data.x.dense(dtype.type)) if isinstance(data.x, OneHot) else data


def check_batch(
    x: object,
    y: object,
    *,
    m: int,
    p: int,
    dtype: np.dtype,
    loss: str,
    g: str,
    mask: object = None,
    reset: object = None,
) -> Batch:
    """Check x, y, mask and reset against the model (m inputs, p outputs) and the loss.

    x is an array (T, [batch,] m) or a tbptt.OneHot of m inputs (ids (T, [batch])).
    """
    if loss not in LOSSES:
        raise InputError(f"loss must be 'l2' or 'cross_entropy', got {loss!r}")
    if loss == "cross_entropy" and g != "softmax":
        raise InputError(f"loss='cross_entropy' needs the model's g='softmax', got g={g!r}")
    xa, single = _check_x(x, m, dtype)
    T, batch, _ = xa.shape
    lead = (T,) if single else (T, batch)
    maska = None
    if mask is not None:
        maska = as_float_array("mask", mask, dtype)
        if maska.shape != lead:
            raise InputError(
                f"mask must have shape {lead}, time-major {LEAD[len(lead)]} (one weight per step), "
                f"got {maska.shape}{batch_first('mask', maska.shape, lead)}"
            )
        if (maska < 0).any():
            bad = tuple(int(i) for i in np.argwhere(maska < 0)[0])
            raise InputError(
                f"mask must hold finite weights >= 0 (0 switches a loss off), got "
                f"{maska[bad]} at index {bad}"
            )
    keep = None if maska is None else maska > 0  # the steps whose targets are read
    ya = _check_y(y, lead, batch, p, dtype, loss, keep)
    if maska is not None:
        maska = maska.reshape(T, batch)
    reseta = None
    if reset is not None:
        reseta = np.asarray(reset)
        if reseta.dtype != bool:
            raise InputError(f"reset must be a bool array, got dtype {reseta.dtype}")
        if reseta.shape != lead:
            raise InputError(
                f"reset must have shape {lead}, time-major {LEAD[len(lead)]} (one flag per step), "
                f"got {reseta.shape}{batch_first('reset', reseta.shape, lead)}"
            )
        reseta = reseta.reshape(T, batch)
    return Batch(xa, ya, maska, reseta, single)


def _check_x(x: object, m: int, dtype: np.dtype) -> tuple[Array | OneHot, bool]:
    """x as (T, batch, m) (or OneHot ids (T, batch)), and whether it was one stream."""
    if isinstance(x, OneHot):  # integer inputs: the ids, (T, batch)
        if x.m != m:
            raise InputError(f"x is a OneHot of m={x.m} inputs, but the model has m={m}")
        single = x.ids.ndim == 1
        return OneHot.checked(x.ids[:, None] if single else x.ids, m), single
    xa = as_float_array("x", x, dtype)
    if xa.ndim not in (2, 3) or xa.shape[-1] != m:
        raise InputError(
            f"x must have shape (T, {m}) or (T, batch, {m}), time-major (T, batch, m) with m={m} "
            f"inputs, got {xa.shape}"
        )
    single = xa.ndim == 2
    return (xa[:, None, :] if single else xa), single


def _check_y(
    y: object,
    lead: tuple[int, ...],
    batch: int,
    p: int,
    dtype: np.dtype,
    loss: str,
    keep: Array | None = None,
) -> Array:
    """y as (T, batch) class indices for cross-entropy, (T, batch, p) targets for L2. keep (lead):
    the unmasked steps; a masked step's target is never read (0 there, whatever it was)."""
    T = lead[0]
    if loss == "cross_entropy":
        ya = np.asarray(y)
        if not np.issubdtype(ya.dtype, np.integer):
            raise InputError(
                f"y must hold integer class indices for loss='cross_entropy', got dtype {ya.dtype}"
            )
        if ya.shape != lead:
            raise InputError(
                f"y must have shape {lead}, time-major {LEAD[len(lead)]} like x (one class index "
                f"per step), got {ya.shape}{batch_first('y', ya.shape, lead)}"
            )
        if keep is not None and keep.shape == ya.shape:
            ya = np.where(keep, ya, 0)
        if ya.size and (ya.min() < 0 or ya.max() >= p):
            bad = ya.min() if ya.min() < 0 else ya.max()
            raise InputError(
                f"y holds class index {int(bad)}, expected 0 <= y < {p} (the model's p)"
            )
        return ya.reshape(T, batch).astype(np.intp, copy=False)
    ya = as_float_array("y", y, dtype, keep)
    if ya.shape != (*lead, p):
        raise InputError(
            f"y must have shape {(*lead, p)}, time-major {LEAD[len(lead)][:-1].rstrip(',')}, p) "
            f"like x with "
            f"p={p} outputs, got {ya.shape}{batch_first('y', ya.shape, (*lead, p))}"
        )
    return ya.reshape(T, batch, p)


def check_h0(h0: object, n: int, batch: int, dtype: np.dtype, T: int | None = None) -> Array:
    """The initial state as (batch, n); None means zeros. h0 may be (n,) or (batch, n), batch
    being x's second axis (x is time-major (T, batch, m), T given for the error's sake)."""
    if h0 is None:
        return np.zeros((batch, n), dtype)
    arr = as_float_array("h0", h0, dtype)
    if arr.shape == (n,):
        return np.broadcast_to(arr, (batch, n))
    if arr.shape != (batch, n):
        hint = ""
        if T is not None and T != batch and arr.shape == (T, n):
            hint = (
                f": one row per step of x, not per stream; is x batch-first? x is read "
                f"time-major (T, batch, m), as T={T} steps of {batch} streams "
                "(np.swapaxes(x, 0, 1) turns a batch-first array time-major)"
            )
        raise InputError(
            f"h0 must have shape ({n},) or ({batch}, {n}), one row per stream of x (time-major "
            f"(T, batch, m)), got {arr.shape}{hint}"
        )
    return arr
