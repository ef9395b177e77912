"""Compiled per-step loops of the seed's model (numba, the `tbptt[fast]` extra).

The same recurrences as the numpy reference in elman.py, one compiled call for all the steps:

    forward_steps   (1.1), (1.2)  a_t = A h_{t-1} + (B x_t + b),  h_t = f(a_t),  and f'(a_t)
    backward_steps  (3.1)         r_t = ([t in I] C^T e_t + A^T r_{t+1}) * f'(a_t)
    scatter_rows    (2.3)         dL/dB = sum_t r_t x_t^T for one-hot x_t:
                                  row ids[t] of (dL/dB)^T gets r_t

and the online update of one stream (tbptt.TBPTT at batch 1), which fast.py chooses:

    forward_piece     (1.1)-(1.4), l_t and e_t (2.1), section 6's check: a piece in one call
    backward_errors   (5.2) over a segment, with C^T e_t computed inside the loop
    gradient_sums     (2.3), (2.4) over a window's few stacked rows
    sgd_update        (5)'s mean, the norm, clipping, torch.optim.SGD's step, the checks
    adam_update       the same with torch.optim.Adam's step

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
    T, batch = hs.shape[0] - 1, hs.shape[1]
    for t in range(T):
        for j in range(batch):
            prev = hs[t, j]
            if reset is not None:
                if reset[t, j]:
                    prev = restart[j]
            cur = hs[t + 1, j]
            _matvec_add(A, prev, cur)  # a_t = A h_{t-1} + (B x_t + b)
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
            _matvec_t_add(A, r, b)  # A^T r_t


@numba.njit(**OPTIONS)
def scatter_rows(G, ids, R):
    """G[ids[i]] += R[i] for every row i: (dL/dB)^T for one-hot inputs (2.3), in place.

    G (m, n), ids (N,) integers in [0, m), R (N, n).
    """
    for i in range(ids.shape[0]):
        g, r = G[ids[i]], R[i]
        for k in range(r.shape[0]):
            g[k] += r[k]


# -- the online update of one stream: the piece, the window, the sums, the step ----------------
# (tbptt.TBPTT at batch 1, chosen in fast.py: what was about 25 numpy calls per update)
SOFTMAX = 4  # the code of g = softmax (the others as f's)


@numba.njit(**OPTIONS)
def _matvec_add(W, v, out):
    """out += W v for W (a, b), v (b,), out (a,): dot products, 4 rows of W at once."""
    a, b = W.shape
    a4 = a - a % 4
    for i in range(0, a4, 4):
        r0, r1, r2, r3 = W[i], W[i + 1], W[i + 2], W[i + 3]
        s0, s1, s2, s3 = out[i], out[i + 1], out[i + 2], out[i + 3]
        for k in range(b):  # four independent sums hide the adds' latency
            q = v[k]
            s0 += r0[k] * q
            s1 += r1[k] * q
            s2 += r2[k] * q
            s3 += r3[k] * q
        out[i], out[i + 1], out[i + 2], out[i + 3] = s0, s1, s2, s3
    for i in range(a4, a):
        row, s = W[i], out[i]
        for k in range(b):
            s += row[k] * v[k]
        out[i] = s


@numba.njit(**OPTIONS)
def _matvec_t_add(W, v, out):
    """out += W^T v for W (a, b), v (a,), out (b,): rows of W scaled by v, 4 at a time."""
    a, b = W.shape
    a4 = a - a % 4
    for k in range(0, a4, 4):
        w0, w1, w2, w3 = W[k], W[k + 1], W[k + 2], W[k + 3]
        q0, q1, q2, q3 = v[k], v[k + 1], v[k + 2], v[k + 3]
        for i in range(b):
            out[i] += q0 * w0[i] + q1 * w1[i] + q2 * w2[i] + q3 * w3[i]
    for k in range(a4, a):
        qk, row = v[k], W[k]
        for i in range(b):
            out[i] += qk * row[i]


def _input_product(B, x, t, j, out):  # pragma: no cover - replaced inside compiled code
    """out = B x_t of stream j (x dense (T, batch, m), or the ids (T, batch) of one-hot x)."""
    raise NotImplementedError


@overload(_input_product, fastmath=FASTMATH, error_model="numpy")  # pyright: ignore[reportCallIssue]
def _input_product_overload(B, x, t, j, out):
    if x.ndim == 2:  # one-hot: column ids[t, j] of B

        def lookup(B, x, t, j, out):
            col = x[t, j]
            for i in range(out.shape[0]):
                out[i] = B[i, col]

        return lookup

    def product(B, x, t, j, out):
        for i in range(out.shape[0]):
            out[i] = 0
        _matvec_add(B, x[t, j], out)

    return product


def _input_gradient(G, R, x):  # pragma: no cover - replaced inside compiled code
    """G = sum_q R[q] x_q^T (x (N, m) rows, or the ids (N,) of one-hot rows: a scatter)."""
    raise NotImplementedError


@overload(_input_gradient, fastmath=FASTMATH, error_model="numpy")  # pyright: ignore[reportCallIssue]
def _input_gradient_overload(G, R, x):
    if x.ndim == 1:  # one-hot: column ids[q] of G gets r_q

        def scatter(G, R, x):
            for k in range(G.shape[1]):
                for i in range(G.shape[0]):
                    G[i, k] = 0
            for q in range(x.shape[0]):
                col, r = x[q], R[q]
                for i in range(G.shape[0]):
                    G[i, col] += r[i]

        return scatter

    return lambda G, R, x: _outer_sum(G, R, x)


@numba.njit(**OPTIONS)
def _loss_and_error(gcode, z, y, yid, w, e):
    """l_t and e_t = dl_t/dz_t (2.1) of one stream's step, e written into e (p,); as
    functions.loss_and_error: l2 of g(z) (y (p,), yid < 0), or cross-entropy of softmax(z)
    (yid the class, y unused); w the mask weight (1 without a mask)."""
    p = z.shape[0]
    one, half, zero = _const(z[0], 1.0), _const(z[0], 0.5), _const(z[0], 0.0)
    if gcode == SOFTMAX or yid >= 0:
        mx = z[0]
        for k in range(1, p):
            mx = z[k] if z[k] > mx else mx
        s = zero
        for k in range(p):
            q = np.exp(z[k] - mx)
            e[k] = q
            s += q
        if yid >= 0:  # cross-entropy: l = -log softmax(z)[y], e = softmax(z) - onehot(y)
            lse = np.log(s)
            l = -(z[yid] - mx - lse)
            for k in range(p):
                e[k] = np.exp(z[k] - mx - lse)
            e[yid] -= one
        else:  # l2 of yhat = softmax(z): e = yhat * (r - <yhat, r>), r = yhat - y
            l, dot = zero, zero
            for k in range(p):
                yh = e[k] / s
                r = yh - y[k]
                l += r * r
                dot += yh * r
                e[k] = yh
            for k in range(p):
                e[k] = e[k] * ((e[k] - y[k]) - dot)
            l *= half
    else:  # l2 of an elementwise g: e = (g(z) - y) * g'(z), g' from g(z)
        l = zero
        for k in range(p):
            if gcode == TANH:
                yh = tanh(z[k])
                d = one - yh * yh
            elif gcode == SIGMOID:
                yh = (tanh(z[k] * half) + one) * half
                d = yh * (one - yh)
            elif gcode == RELU:
                yh = zero if z[k] <= zero else z[k]
                d = one if yh > zero else zero
            else:
                yh, d = z[k], one
            r = yh - y[k]
            l += r * r
            e[k] = r * d
        l *= half
    if w != one:  # a masked step: l_t and e_t weighted (0 switches them off)
        l *= w
        for k in range(p):
            e[k] *= w
    return l


_BIG = float(np.finfo(np.float64).max)


@numba.njit(**OPTIONS)
def _isfinite(x):
    """Whether the scalar x is finite. Not math.isfinite: under reassoc, LLVM folds the x - x it
    tests to 0 inside vectorized loops, so an infinity would pass; an ordered comparison (false
    for NaN) survives every flag of FASTMATH."""
    return abs(x) <= _BIG


@numba.njit(**OPTIONS)
def _finite(v):
    """Whether every element of v is finite."""
    for i in range(v.shape[0]):
        if not _isfinite(v[i]):
            return False
    return True


@numba.njit(**OPTIONS)
def forward_piece(hs, x, B, b, A, code, fprime, reset, restart, C, c, gcode, y, yids, w, z, l, e):
    """(1.1)-(1.4), l_t and e_t (2.1) of a piece of the stream, and section 6's check, in one pass.

    hs (T + 1, batch, n): hs[0] holds h_{t-1} on entry, hs[t] receives h_t. x (T, batch, m) dense
    inputs, or the ids (T, batch) of one-hot inputs. b, c: biases or None. reset (T, batch)
    bool or None, restart (batch, n) the state a restarting stream starts from. y (T, batch, p)
    targets (l2) or None, yids (T, batch) classes (cross-entropy) or None; w (T, batch) mask
    weights or None. Writes fprime (T, batch, n), z (T, batch, p), l (T, batch), e (T, batch, p).

    Returns -1, or (as the numpy trainer) when the last state or some loss is not finite, the
    first step (0-based) whose state or loss is not finite.
    """
    T, batch, n = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    one = _const(hs[0, 0, 0], 1.0)
    first_bad, bad_l = -1, False
    for t in range(T):
        step_bad = False
        for j in range(batch):
            prev = hs[t, j]
            if reset is not None:
                if reset[t, j]:
                    prev = restart[j]
            cur = hs[t + 1, j]
            _input_product(B, x, t, j, cur)  # B x_t: a product, or column ids[t, j] of B
            if b is not None:
                for i in range(n):
                    cur[i] += b[i]
            _matvec_add(A, prev, cur)  # a_t = A h_{t-1} + B x_t + b (1.1)
            _activate(code, cur, fprime[t, j])  # h_t = f(a_t) (1.2)
            zt = z[t, j]
            for k in range(zt.shape[0]):
                zt[k] = 0 if c is None else c[k]
            _matvec_add(C, cur, zt)  # z_t = C h_t + c (1.3)
            wt = one if w is None else w[t, j]
            yid = -1 if yids is None else yids[t, j]
            yt = zt if y is None else y[t, j]
            lt = _loss_and_error(gcode, zt, yt, yid, wt, e[t, j])
            l[t, j] = lt
            if not _isfinite(lt):
                bad_l, step_bad = True, True
            if not _finite(cur):
                step_bad = True
        if step_bad and first_bad < 0:
            first_bad = t
    last_ok = True
    for j in range(batch):
        last_ok = last_ok and _finite(hs[T, j])
    return first_bad if (bad_l or not last_ok) else -1


@numba.njit(**OPTIONS)
def backward_errors(R, fprime, A, C, e, back, cut):
    """(5.2) over one segment, from its last step down to its first, with C^T e_t inline.

    As backward_steps, but the injected term C^T e_t is computed here from e (K, batch, p), the
    errors of the last K steps, and C (p, n): no dh array, no separate product.
    """
    L, batch, n = R.shape
    first = L - e.shape[0]
    for t in range(L - 1, -1, -1):
        for j in range(batch):
            r, fp, bk = R[t, j], fprime[t, j], back[j]
            for i in range(n):
                r[i] = bk[i]  # A^T r_{t+1}
            if t >= first:
                _matvec_t_add(C, e[t - first, j], r)  # + C^T e_t: delta_t
            for i in range(n):
                r[i] *= fp[i]  # r_t = delta_t * f'(a_t)
                bk[i] = 0
            if cut is not None:
                if cut[t, j]:
                    continue  # h_{t-1} was a constant for this stream
            _matvec_t_add(A, r, bk)  # A^T r_t


@numba.njit(**OPTIONS)
def _outer_sum(G, U, V):
    """G = sum_q U[q] V[q]^T over the N rows of U (N, a) and V (N, b); G (a, b).

    Blocks of 4 rows of G by 4 rows q: each pass over a row of V feeds 16 multiply-adds, so the
    loop is bound by arithmetic, not by loads and stores of G (BLAS's rate at N = 20 rows).
    """
    N, a = U.shape
    b = V.shape[1]
    for i in range(a):
        for k in range(b):
            G[i, k] = 0
    a4, N4 = a - a % 4, N - N % 4
    for i in range(0, a4, 4):
        g0, g1, g2, g3 = G[i], G[i + 1], G[i + 2], G[i + 3]
        for q in range(0, N4, 4):
            v0, v1, v2, v3 = V[q], V[q + 1], V[q + 2], V[q + 3]
            u0, u1, u2, u3 = (
                U[q, i : i + 4],
                U[q + 1, i : i + 4],
                U[q + 2, i : i + 4],
                U[q + 3, i : i + 4],
            )
            for k in range(b):
                w0, w1, w2, w3 = v0[k], v1[k], v2[k], v3[k]
                g0[k] += u0[0] * w0 + u1[0] * w1 + u2[0] * w2 + u3[0] * w3
                g1[k] += u0[1] * w0 + u1[1] * w1 + u2[1] * w2 + u3[1] * w3
                g2[k] += u0[2] * w0 + u1[2] * w1 + u2[2] * w2 + u3[2] * w3
                g3[k] += u0[3] * w0 + u1[3] * w1 + u2[3] * w2 + u3[3] * w3
        for q in range(N4, N):
            vq = V[q]
            for r in range(4):
                g, uq = G[i + r], U[q, i + r]
                for k in range(b):
                    g[k] += uq * vq[k]
    for i in range(a4, a):
        g = G[i]
        for q in range(N):
            uq, vq = U[q, i], V[q]
            for k in range(b):
                g[k] += uq * vq[k]


@numba.njit(**OPTIONS)
def _column_sum(g, U):
    """g = sum_r U[r] over the rows of U (N, a)."""
    for k in range(g.shape[0]):
        g[k] = 0
    for q in range(U.shape[0]):
        for k in range(g.shape[0]):
            g[k] += U[q, k]


@numba.njit(**OPTIONS)
def gradient_sums(R, h_prev, x, e, h, gA, gB, gC, gb, gc):
    """(2.3) and (2.4) over stacked rows: gA = sum r h_prev^T, gB = sum r x^T (x (N, m) rows, or
    the ids (N,) of one-hot rows), gC = sum e h^T, gb = sum r, gc = sum e (gb, gc None without
    biases). R, h_prev (N, n); e, h (K, p) and (K, n)."""
    _outer_sum(gA, R, h_prev)
    _input_gradient(gB, R, x)
    _outer_sum(gC, e, h)
    if gb is not None:
        _column_sum(gb, R)
    if gc is not None:
        _column_sum(gc, e)


@numba.njit(**OPTIONS)
def _sum_squares(gs):
    """sum of g^2 over a tuple of 1-d arrays, accumulated in float64."""
    s = 0.0
    for g in gs:
        for i in range(g.shape[0]):
            q = np.float64(g[i])
            s += q * q
    return s


@numba.njit(**OPTIONS)
def _divide(gs, divisor):
    """g /= divisor for each g of a tuple, in g's type ((5)'s mean)."""
    if divisor != 1.0:
        for g in gs:
            d = _const(g[0], divisor)
            for i in range(g.shape[0]):
                g[i] /= d


@numba.njit(**OPTIONS)
def sgd_update(ps, gs, v0s, v1s, first, lr, mu, nesterov, divisor, clip):
    """The gradient norm, clipping and torch.optim.SGD's step over tuples of 1-d arrays: the new
    parameters written into gs, the new momentum into v1s (v0s the old one, unless first).

    gs are divided by divisor first ((5)'s mean); clip <= 0: no clipping. Returns (norm, finite):
    with a non-finite norm nothing is stepped; finite says whether every new parameter is.
    """
    _divide(gs, divisor)
    norm = np.sqrt(_sum_squares(gs))
    if not _isfinite(norm):
        return norm, False
    coef = clip / (norm + 1e-6) if clip > 0 else 1.0
    scale = coef if coef < 1 else 1.0
    ok = True
    for a in range(len(ps)):
        p, g, v0, v1 = ps[a], gs[a], v0s[a], v1s[a]
        c, neg, m = _const(p[0], scale), _const(p[0], -lr), _const(p[0], mu)
        for i in range(p.shape[0]):
            gi = g[i] * c if scale < 1 else g[i]  # clip_grad_norm
            if mu != 0:
                vi = gi if first else m * v0[i] + gi  # v <- mu v + g (v = g at the first step)
                v1[i] = vi
                gi = gi + m * vi if nesterov else vi
            q = p[i] + neg * gi  # p - lr g
            g[i] = q
            if not _isfinite(q):
                ok = False
    return norm, ok


@numba.njit(**OPTIONS)
def adam_update(ps, gs, ms, vs, new_ms, new_vs, lr, b1, b2, eps, c1, c2, divisor, clip):
    """The gradient norm, clipping and torch.optim.Adam's step over tuples of 1-d arrays: the new
    parameters into gs, the new moments into new_ms, new_vs (c1 = 1 - b1^k, c2 = sqrt(1 - b2^k)).
    Returns (norm, finite) as sgd_update."""
    _divide(gs, divisor)
    norm = np.sqrt(_sum_squares(gs))
    if not _isfinite(norm):
        return norm, False
    coef = clip / (norm + 1e-6) if clip > 0 else 1.0
    scale = coef if coef < 1 else 1.0
    ok = True
    for a in range(len(ps)):
        p, g, m0, v0, m1, v1 = ps[a], gs[a], ms[a], vs[a], new_ms[a], new_vs[a]
        c = _const(p[0], scale)
        B1, B2, oB1, oB2 = (
            _const(p[0], b1),
            _const(p[0], b2),
            _const(p[0], 1 - b1),
            _const(p[0], 1 - b2),
        )
        step, C2, E = _const(p[0], lr / c1), _const(p[0], c2), _const(p[0], eps)
        for i in range(p.shape[0]):
            gi = g[i] * c if scale < 1 else g[i]
            mi = m0[i] * B1 + gi * oB1
            vi = v0[i] * B2 + (gi * oB2) * gi
            m1[i], v1[i] = mi, vi
            q = p[i] - (mi * step) / (np.sqrt(vi) / C2 + E)
            g[i] = q
            if not _isfinite(q):
                ok = False
    return norm, ok
