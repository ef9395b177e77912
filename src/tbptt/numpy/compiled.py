"""Compiled per-step loops of the seed's model (numba, the `tbptt[fast]` extra).

The same recurrences as the numpy reference in elman.py, one compiled call for all the steps:

    forward_steps   (1.1), (1.2)  a_t = A h_{t-1} + (B x_t + b),  h_t = f(a_t),  and f'(a_t)
    backward_steps  (3.1)         r_t = ([t in I] C^T e_t + A^T r_{t+1}) * f'(a_t)
    scatter_rows    (2.3)         dL/dB = sum_t r_t x_t^T for one-hot x_t:
                                  row ids[t] of (dL/dB)^T gets r_t

At batch 1 the numpy loop is a count of calls (three per step each way, about 1 us each) while the
arithmetic of a step at n = 128 is about 16,000 multiply-adds. Here each step is one pass over A,
read in place (row i of A for (A h)_i in the forward pass, row k of A scaled by r_k for A^T r in
the backward pass: no transposed copy), with the nonlinearity and its derivative fused into the
same pass over the state. Every inner loop vectorizes: numba's tanh calls the scalar libm, so f
uses the vectorizable tanh below (Cephes' rational and exp-based forms; at most 2 ulp in float64
and 1 ulp in float32, against about 1 ulp for numpy's).

fastmath allows reassociation and contraction (the dot products vectorize, multiply-adds fuse),
never the no-NaN/no-inf assumptions: a NaN or infinity propagates as in the numpy loop, so the
callers' finiteness checks see it. Results equal the numpy reference to rounding (1e-12 relative
in float64 over a sequence; the tests check it).

Import this module only through tbptt.fast, which decides whether it is used.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import overload

FASTMATH = {"contract", "reassoc", "nsz", "arcp"}  # no nnan / ninf: NaN and inf must propagate
OPTIONS = {"fastmath": FASTMATH, "error_model": "numpy", "nogil": True, "cache": True}
TANH, SIGMOID, RELU, IDENTITY = 0, 1, 2, 3  # codes of f, as fast.ACTIVATION_CODES lists them

f32 = np.float32
# Cephes tanhf / expf (float32): tanh x = x + x^3 P(x^2) for |x| < 0.625,
# else 1 - 2 / (e^{2|x|} + 1)
_TP = (
    f32(-5.70498872745e-3),
    f32(2.06390887954e-2),
    f32(-5.37397155531e-2),
    f32(1.33314422036e-1),
    f32(-3.33332819422e-1),
)
_EP = (
    f32(1.9875691500e-4),
    f32(1.3981999507e-3),
    f32(8.3334519073e-3),
    f32(4.1665795894e-2),
    f32(1.6666665459e-1),
    f32(5.0000001201e-1),
)
_LOG2E32, _LN2HI32, _LN2LO32 = f32(1.44269504088896341), f32(0.693359375), f32(-2.12194440e-4)
_ONE32, _TWO32, _HALF32, _CUT32, _CLAMP32 = f32(1), f32(2), f32(0.5), f32(0.625), f32(10)


@numba.njit(**OPTIONS)
def _tanh32(x):
    z = abs(x)
    z = _CLAMP32 if z > _CLAMP32 else z  # tanh = 1 in float32 beyond 9; a NaN passes through
    s = x * x
    small = ((((_TP[0] * s + _TP[1]) * s + _TP[2]) * s + _TP[3]) * s + _TP[4]) * s * x + x
    y = z + z
    k = np.floor(y * _LOG2E32 + _HALF32)  # e^y = 2^k e^r, |r| <= ln(2) / 2
    r = y - k * _LN2HI32 - k * _LN2LO32
    p = (((((_EP[0] * r + _EP[1]) * r + _EP[2]) * r + _EP[3]) * r + _EP[4]) * r + _EP[5]) * (r * r)
    e = (p + r + _ONE32) * f32(np.int32(1) << np.int32(k))
    big = _ONE32 - _TWO32 / (e + _ONE32)
    big = big if x >= 0 else -big
    return small if z < _CUT32 else big


@numba.njit(**OPTIONS)
def _tanh64(x):
    z = abs(x)
    z = 20.0 if z > 20.0 else z  # tanh = 1 in float64 beyond 19.1; 2^k fits int64; NaN passes
    s = x * x
    P = (-9.64399179425052238628e-1 * s - 9.92877231001918586564e1) * s - 1.61468768441708447952e3
    Q = (
        (s + 1.12811678491632931402e2) * s + 2.23548839060100448583e3
    ) * s + 4.84406305325125486048e3
    small = x + x * s * (P / Q)
    y = z + z
    k = np.floor(y * 1.4426950408889634073599 + 0.5)  # e^y = 2^k e^r, |r| <= ln(2) / 2
    r = y - k * 6.93145751953125e-1 - k * 1.42860682030941723212e-6
    rr = r * r
    px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr + 1.0)
    qx = (
        (3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr
        + 2.27265548208155028766e-1
    ) * rr + 2.0
    e = (1.0 + 2.0 * px / (qx - px)) * float(np.int64(1) << np.int64(k))
    big = 1.0 - 2.0 / (e + 1.0)
    big = big if x >= 0 else -big
    return small if z < 0.625 else big


def tanh(x):  # pragma: no cover - replaced by the overload inside compiled code
    """tanh of a float32 or float64 scalar, vectorizable (compiled code only)."""
    raise NotImplementedError


@overload(tanh, fastmath=FASTMATH, error_model="numpy")  # pyright: ignore[reportCallIssue]
def _tanh_overload(x):
    if x == types.float32:
        return lambda x: _tanh32(x)
    return lambda x: _tanh64(x)


def _const(x, v):  # pragma: no cover - replaced by the overload inside compiled code
    """The number v in x's type, so float32 stays float32."""
    raise NotImplementedError


@overload(_const)
def _const_overload(x, v):
    if x == types.float32:
        return lambda x, v: np.float32(v)
    return lambda x, v: np.float64(v)


@numba.njit(**OPTIONS)
def _activate(code, a, fp):
    """h = f(a) in place and fp = f'(a) from h, over one state row (1.2)."""
    one, half, zero = _const(a[0], 1.0), _const(a[0], 0.5), _const(a[0], 0.0)
    n = a.shape[0]
    if code == TANH:
        for i in range(n):
            h = tanh(a[i])
            a[i] = h
            fp[i] = one - h * h  # tanh' = 1 - h^2
    elif code == SIGMOID:
        for i in range(n):
            h = (tanh(a[i] * half) + one) * half  # as functions._sigmoid: no overflow
            a[i] = h
            fp[i] = h * (one - h)
    elif code == RELU:
        for i in range(n):
            h = zero if a[i] <= zero else a[i]  # a NaN stays NaN
            a[i] = h
            fp[i] = one if h > zero else zero
    else:
        for i in range(n):
            fp[i] = one


@numba.njit(**OPTIONS)
def forward_steps(hs, A, code, fprime, reset, restart):
    """(1.1), (1.2) in place over hs (T + 1, batch, n).

    On entry hs[0] holds h_0 and hs[t] (t >= 1) holds B x_t + b; on exit hs[t] holds h_t and
    fprime[t - 1] (T, batch, n) holds f'(a_t). reset: None, or (T, batch) bool, where stream j
    starts step t from restart[j] (batch, n) instead of h_{t-1}.
    """
    T, batch, n = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    for t in range(T):
        for j in range(batch):
            prev = hs[t, j]
            if reset is not None:
                if reset[t, j]:
                    prev = restart[j]
            cur = hs[t + 1, j]
            n4 = n - n % 4
            for i in range(
                0, n4, 4
            ):  # a_t = A h_{t-1} + (B x_t + b): dot products, 4 rows of A at once
                r0, r1, r2, r3 = A[i], A[i + 1], A[i + 2], A[i + 3]
                s0, s1, s2, s3 = cur[i], cur[i + 1], cur[i + 2], cur[i + 3]
                for k in range(n):  # four independent sums hide the adds' latency
                    p = prev[k]
                    s0 += r0[k] * p
                    s1 += r1[k] * p
                    s2 += r2[k] * p
                    s3 += r3[k] * p
                cur[i], cur[i + 1], cur[i + 2], cur[i + 3] = s0, s1, s2, s3
            for i in range(n4, n):
                row, s = A[i], cur[i]
                for k in range(n):
                    s += row[k] * prev[k]
                cur[i] = s
            _activate(code, cur, fprime[t, j])


@numba.njit(**OPTIONS)
def backward_steps(R, fprime, A, dh, back, cut):
    """(3.1) from the last step down to the first, in place.

    R (L, batch, n) receives r_t = delta_t * f'(a_t); it may be dh itself (each step reads its
    dh row before writing r_t). dh (K, batch, n): C^T e_t of the last K steps (the injected ones).
    back (batch, n): A^T r_{u+1} flowing in on entry, A^T r_s (the gradient reaching h_{s-1}) on
    exit. cut: None, or (L, batch) bool where stream j restarted at step t (no gradient to h_{t-1}).
    """
    L, batch, n = R.shape
    first = L - dh.shape[0]
    for t in range(L - 1, -1, -1):
        for j in range(batch):
            r, fp, b = R[t, j], fprime[t, j], back[j]
            if t >= first:
                d = dh[t - first, j]
                for i in range(n):
                    r[i] = (d[i] + b[i]) * fp[i]  # delta_t * f'(a_t)
            else:
                for i in range(n):
                    r[i] = b[i] * fp[i]
            zero = _const(b[0], 0.0)
            for i in range(n):
                b[i] = zero
            if cut is not None:
                if cut[t, j]:
                    continue  # h_{t-1} was a constant for this stream
            n4 = n - n % 4
            for k in range(0, n4, 4):  # A^T r_t = sum_k r_k (row k of A), 4 rows per pass over b
                a0, a1, a2, a3 = A[k], A[k + 1], A[k + 2], A[k + 3]
                q0, q1, q2, q3 = r[k], r[k + 1], r[k + 2], r[k + 3]
                for i in range(n):
                    b[i] += q0 * a0[i] + q1 * a1[i] + q2 * a2[i] + q3 * a3[i]
            for k in range(n4, n):
                rk, row = r[k], A[k]
                for i in range(n):
                    b[i] += rk * row[i]


@numba.njit(**OPTIONS)
def scatter_rows(G, ids, R):
    """G[ids[i]] += R[i] for every row i: (dL/dB)^T for one-hot inputs (2.3), in place.

    G (m, n), ids (N,) integers in [0, m), R (N, n).
    """
    for i in range(ids.shape[0]):
        g, r = G[ids[i]], R[i]
        for k in range(r.shape[0]):
            g[k] += r[k]
