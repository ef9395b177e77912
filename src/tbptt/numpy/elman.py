"""The seed's recurrent network in numpy: forward pass and backward recursion (SEMANTICS.md 1-3).

Time-major arrays, a batch of independent streams on axis 1:

    (1.1)  a_t = A h_{t-1} + B x_t + b
    (1.2)  h_t = f(a_t)
    (1.3)  z_t = C h_t + c
    (1.4)  yhat_t = g(z_t)
    (1.5)  L = sum_t l_t

    (2.1)  e_t     = dl_t/dz_t
    (2.2)  delta_t = C^T e_t + A^T (f'(a_{t+1}) * delta_{t+1}),   delta_{T+1} = 0
    (2.3)  dL/dA = sum_t r_t h_{t-1}^T,  dL/dB = sum_t r_t x_t^T,  dL/db = sum_t r_t,
           where r_t = delta_t * f'(a_t)
    (2.4)  dL/dC = sum_t e_t h_t^T,  dL/dc = sum_t e_t
    (2.5)  dL/dh_0 = A^T r_1

In row form (one row per stream), A h becomes h @ A.T and A^T r becomes r @ A. Python loops only
over the recurrences (1.1) and (2.2); every sum over t is one matrix product over the stacked
(T * batch) axis. With numba installed (tbptt[fast]), a single stream's loops run compiled
instead (compiled.py, chosen in fast.py; TBPTT_NUMBA=0 switches them off): the same recurrences,
equal to these to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..checks import check_int
from ..errors import InputError
from ..inputs import OneHot, input_gradient, input_product
from . import fast
from .batch import FLOATS, Batch, as_param, check_batch, check_h0, dense_inputs
from .functions import OUTPUTS, activation, loss_and_error

Array = np.ndarray


class ElmanRNN:
    """The seed's model h_t = f(A h_{t-1} + B x_t + b), yhat_t = g(C h_t + c).

    Args:
        A: (n, n) recurrent weights.  B: (n, m) input weights.  C: (p, n) output weights.
        b: optional (n,) state bias.  c: optional (p,) output bias.
        f: state activation, one of tanh, sigmoid, relu, identity.
        g: output activation, one of tanh, sigmoid, relu, identity, softmax.

    All arrays share one dtype, float32 or float64. The arrays are never modified in place.
    tbptt.TBPTT trains the model it is given as torch.optim does: after each update its attributes
    A, B, C, b, c name the new values (fresh arrays; `replace` makes an independent copy).
    """

    def __init__(
        self,
        A: Array,
        B: Array,
        C: Array,
        b: Array | None = None,
        c: Array | None = None,
        f: str = "tanh",
        g: str = "identity",
    ) -> None:
        A = as_param("A", A, None, 2)
        n = A.shape[0]
        if A.shape != (n, n):
            raise InputError(f"A must be square (n, n), got {A.shape}")
        B = as_param("B", B, None, 2)
        if B.shape[0] != n:
            raise InputError(f"B must have shape ({n}, m) to match A, got {B.shape}")
        C = as_param("C", C, None, 2)
        if C.shape[1] != n:
            raise InputError(f"C must have shape (p, {n}) to match A, got {C.shape}")
        b = None if b is None else as_param("b", b, (n,), 1)
        c = None if c is None else as_param("c", c, (C.shape[0],), 1)
        dtypes = {arr.dtype for arr in (A, B, C, b, c) if arr is not None}
        if len(dtypes) != 1:
            raise InputError(f"A, B, C, b, c must share one dtype, got {sorted(map(str, dtypes))}")
        activation(f, "f")
        if g not in OUTPUTS:
            raise InputError(f"g must be one of {OUTPUTS}, got {g!r}")
        self.A, self.B, self.C, self.b, self.c = A, B, C, b, c
        self.f, self.g = f, g

    # -- shapes and parameters ------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.A.shape[0]

    @property
    def m(self) -> int:
        return self.B.shape[1]

    @property
    def p(self) -> int:
        return self.C.shape[0]

    @property
    def dtype(self) -> np.dtype:
        return self.A.dtype

    @property
    def params(self) -> dict[str, Array]:
        """The parameters by name: A, B, C, and b, c when the model has them."""
        out = {"A": self.A, "B": self.B, "C": self.C}
        if self.b is not None:
            out["b"] = self.b
        if self.c is not None:
            out["c"] = self.c
        return out

    def replace(self, **params: Array) -> ElmanRNN:
        """A model with some parameters replaced (the same f and g)."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise InputError(
                f"unknown parameters {sorted(unknown)}; the model has {list(self.params)}"
            )
        return ElmanRNN(**{**self.params, **params}, f=self.f, g=self.g)

    def copy(self) -> ElmanRNN:
        """An independent model with copies of the parameter arrays (the same f and g)."""
        return ElmanRNN(**{k: v.copy() for k, v in self.params.items()}, f=self.f, g=self.g)

    def rebind(self, params: dict[str, Array]) -> None:
        """Point this model at new values of the same shapes and dtype, already checked finite
        (the optimizer's output in online training, tbptt.TBPTT): the arrays it held before are
        not modified, so whatever still holds them (an overlapping window) keeps its values."""
        for k, v in params.items():
            setattr(self, k, v)

    @classmethod
    def init(
        cls,
        *,
        n: int,
        m: int,
        p: int,
        bias: bool = True,
        f: str = "tanh",
        g: str = "identity",
        dtype: type = np.float64,
        seed: int | np.random.Generator | None = 0,
        spectral_radius: float | None = None,
    ) -> ElmanRNN:
        """A random model: A, B, C uniform in +-1/sqrt(fan_in) as torch.nn.RNN does, zero biases.

        n hidden units, m inputs, p outputs: keywords, the same as tbptt.torch.ElmanRNN's.

        spectral_radius rescales A to that largest |eigenvalue| when given.
        """
        for name, v in (("n", n), ("m", m), ("p", p)):
            check_int(name, v)
        if np.dtype(dtype).type not in FLOATS:
            raise InputError(f"dtype must be float32 or float64, got {dtype!r}")
        rng = np.random.default_rng(seed)
        k = 1 / np.sqrt(n)
        A = rng.uniform(-k, k, (n, n))
        if spectral_radius is not None:
            A *= spectral_radius / max(np.abs(np.linalg.eigvals(A)).max(), 1e-12)
        B = rng.uniform(-k, k, (n, m))
        C = rng.uniform(-k, k, (p, n))
        A, B, C = (W.astype(dtype) for W in (A, B, C))
        zb, zc = (np.zeros(n, dtype), np.zeros(p, dtype)) if bias else (None, None)
        return cls(A, B, C, zb, zc, f=f, g=g)

    def __repr__(self) -> str:
        bias = "" if self.b is None and self.c is None else ", with biases"
        return (
            f"ElmanRNN(n={self.n}, m={self.m}, p={self.p}, f={self.f!r}, g={self.g!r}, "
            f"dtype={self.dtype}{bias})"
        )


@dataclass
class Trajectory:
    """What the forward pass keeps for the backward pass, all time-major."""

    x: Array | OneHot  # (T, batch, m) inputs, or their ids (T, batch) when one-hot
    h_prev: Array  # (T, batch, n) the state each step started from: h_{t-1}, or h_0 after a reset
    h: Array  # (T, batch, n) states h_t
    fprime: Array  # (T, batch, n) f'(a_t)
    z: Array  # (T, batch, p) output pre-activations
    reset: Array | None  # (T, batch) bool: step t restarted from h_0, no gradient to h_{t-1}


def forward(
    model: ElmanRNN,
    x: Array | OneHot,
    h_init: Array,
    reset: Array | None = None,
    h0: Array | None = None,
    hs: Array | None = None,
) -> Trajectory:
    """Run (1.1)-(1.3) over x (T, batch, m) (or a OneHot of ids (T, batch)) from h_init (batch, n).

    Where reset[t, j] is true, stream j starts step t from h0 (a constant; default h_init).
    hs: optional (T + 1, batch, n) C-contiguous buffer for h_init, h_1, ..., h_T (the online
    driver's history); the trajectory's h and h_prev are then views of it.
    Inputs are assumed checked (see batch.py).
    """
    A, C = model.A, model.C
    T, batch, _ = x.shape
    n = A.shape[0]
    if hs is None:
        hs = np.empty((T + 1, batch, n), A.dtype)  # h_0, h_1, ..., h_T
    h = hs[1:]  # (T, batch, n), a view: B x_t + b first, overwritten by h_t step by step
    input_product(x, model.B, model.b, out=stacked(h))  # B x_t + b: one product, or a lookup
    hs[0] = h_init
    restart = h_init if h0 is None else h0
    cut = reset if reset is not None and reset.any() else None
    steps = fast.forward_loop(batch) or forward_steps  # the loop below, or compiled (tbptt[fast])
    fprime = steps(hs, A, model.f, cut, restart)  # (T, batch, n) f'(a_t)
    h_prev = hs[:-1]  # (T, batch, n), a view: h_{t-1}
    if cut is not None:
        h_prev = np.where(cut[:, :, None], restart, h_prev)  # h_0 where a stream restarted
    z = project(h, C.T)  # (T, batch, p) (1.3)
    if model.c is not None:
        z += model.c
    return Trajectory(x=x, h_prev=h_prev, h=h, fprime=fprime, z=z, reset=cut)


def forward_loss(
    model: ElmanRNN,
    loss: str,
    x: Array | OneHot,
    y: Array,
    mask: Array | None,
    h_init: Array,
    reset: Array | None = None,
    h0: Array | None = None,
    hs: Array | None = None,
) -> tuple[Trajectory, Array, Array, int]:
    """A piece of online training from h_init: (1.1)-(1.5) and e_t (2.1), and section 6's check.

    Arguments as forward's, with the loss, y and mask as functions.loss_and_error's. Returns the
    trajectory, l_t (T, batch), e_t (T, batch, p) and -1, or, when the last state or some loss is
    not finite, the first step (0-based) whose state or loss is not. With numba installed, one
    stream's piece is one compiled call (fast.forward_piece) instead of about fifteen.
    """
    T, batch = x.shape[:2]
    piece = fast.forward_piece(batch)  # all of the below, compiled (tbptt[fast]), or None
    if piece is None:
        traj = forward(model, x, h_init, reset, h0, hs)
        l, e = loss_and_error(model.g, loss, traj.z, y, mask)  # (T, batch), (T, batch, p)
        return traj, l, e, first_non_finite(traj.h, l)
    if hs is None:
        hs = np.empty((T + 1, batch, model.n), model.dtype)  # h_0, h_1, ..., h_T
    hs[0] = h_init
    restart = h_init if h0 is None else h0
    cut = reset if reset is not None and reset.any() else None
    fprime, z, l, e, bad = piece(model, loss, x, y, mask, cut, restart, hs)
    h_prev = hs[:-1] if cut is None else np.where(cut[:, :, None], restart, hs[:-1])
    return Trajectory(x=x, h_prev=h_prev, h=hs[1:], fprime=fprime, z=z, reset=cut), l, e, bad


def first_non_finite(h: Array, l: Array) -> int:
    """-1 when the last state h[-1] and every loss l_t are finite; else the first step whose
    state or loss is not (h (T, batch, n), l (T, batch))."""
    if np.isfinite(h[-1]).all() and np.isfinite(l).all():
        return -1
    return int(np.argmax(~(np.isfinite(h).all(axis=(1, 2)) & np.isfinite(l).all(axis=1))))


def forward_steps(hs: Array, A: Array, f: str, reset: Array | None, restart: Array) -> Array:
    """(1.1), (1.2) in place over hs (T + 1, batch, n), one step at a time: the reference loop.

    On entry hs[0] holds h_0 and hs[t] (t >= 1) holds B x_t + b; on exit hs[t] holds h_t.
    reset: None or (T, batch) bool, where stream j starts step t from restart[j] (batch, n).
    Returns f'(a_t) (T, batch, n). compiled.forward_steps is the same loop compiled.
    """
    batch, n = hs.shape[1:]
    act = activation(f)
    one = batch == 1  # one stream: A h_{t-1} as A @ h, a matrix-vector product on A itself
    AT = A if one else np.ascontiguousarray(A.T)  # (n, n): a transposed view copied per step
    Ah = np.empty(n if one else (batch, n), A.dtype)  # A h_{t-1}
    rows = list(hs[:, 0] if one else hs)  # views h_0, ..., h_T: indexed once, not in the loop
    fn = act.fn
    for t, (prev, cur) in enumerate(zip(rows[:-1], rows[1:], strict=True)):  # (1.1), (1.2)
        if reset is not None and reset[t].any():
            prev = restart[0] if one else np.where(reset[t][:, None], restart, prev)
        if one:
            np.dot(A, prev, out=Ah)  # A h_{t-1}  (np.dot: less per-call overhead than matmul)
        else:
            np.dot(prev, AT, out=Ah)
        np.add(Ah, cur, out=cur)  # a_t = A h_{t-1} + B x_t + b
        fn(cur, cur)  # h_t = f(a_t), in place
    return act.grad(hs[1:])  # f'(a_t), from h_t


def backprop(
    fprime: Array,
    A: Array,
    dh: Array,
    carry: Array | None = None,
    cut: Array | None = None,
    out: Array | None = None,
) -> tuple[Array, Array]:
    """The window recursion (3.1) over L steps s..u: r_t = delta_t * f'(a_t) and dL/dh_{s-1}.

    fprime: (L, batch, n) f'(a_t) for t = s..u.
    dh: (K, batch, n) injected C^T e_t for the last K steps u-K+1..u (the set I), K <= L.
    carry: (batch, n) A^T r_{u+1} flowing in from a later segment (None: delta_{u+1} = 0).
    cut: (L, batch) bool, where a stream restarted from a constant at step t.
    out: optional (L, batch, n) array, C-contiguous rows, to hold R; it may be dh itself when
    every step is injected (K = L): step t reads dh_t before it writes r_t.
    Returns R (L, batch, n) and A^T r_s (batch, n), the gradient reaching h_{s-1}.
    """
    L, batch, n = fprime.shape
    R = np.empty_like(fprime) if out is None else out  # (L, batch, n)
    back = np.zeros((batch, n), fprime.dtype) if carry is None else carry.copy()  # A^T r_{t+1}
    cut = cut if cut is not None and cut.any() else None
    steps = fast.backward_loop(batch) or backward_steps  # the loop below, or compiled
    steps(R, fprime, A, dh, back, cut)
    return R, back


def backprop_errors(
    fprime: Array,
    A: Array,
    C: Array,
    e: Array,
    carry: Array | None = None,
    cut: Array | None = None,
    out: Array | None = None,
) -> tuple[Array, Array]:
    """backprop with the injected C^T e_t computed from e (K, batch, p), the errors of the last K
    steps, and C (p, n): (5.2) over one segment. With numba installed, one stream's product and
    recursion are one compiled loop (fast.error_loop)."""
    steps = fast.error_loop(fprime.shape[1])  # the product inside the loop (tbptt[fast]), or None
    if steps is None:
        return backprop(fprime, A, project(e, C), carry, cut, out)
    R = np.empty_like(fprime) if out is None else out  # (L, batch, n)
    back = np.zeros(fprime.shape[1:], fprime.dtype) if carry is None else carry.copy()
    steps(R, fprime, A, C, e, back, cut if cut is not None and cut.any() else None)
    return R, back


def backward_steps(
    R: Array, fprime: Array, A: Array, dh: Array, back: Array, cut: Array | None
) -> None:
    """(3.1) from u down to s, one step at a time: the reference loop. Writes r_t into R and
    leaves A^T r_s in back (batch, n), which holds A^T r_{u+1} on entry. dh holds C^T e_t for the
    last len(dh) steps (the injected ones). compiled.backward_steps is the same loop compiled."""
    first_injected = len(fprime) - len(dh)
    rows = list(zip(R, fprime, strict=True))  # views, indexed once
    for t in range(len(fprime) - 1, -1, -1):  # (3.1), from u down to s
        r, fp = rows[t]
        if t >= first_injected:
            np.add(dh[t - first_injected], back, out=r)  # delta_t
            r *= fp  # r_t = delta_t * f'(a_t)
        else:
            np.multiply(back, fp, out=r)
        np.dot(r, A, out=back)  # A^T r_t, the recurrent part of delta_{t-1}
        if cut is not None and cut[t].any():
            back[cut[t]] = 0  # h_{t-1} was a constant for these streams


def project(arr: Array, W: Array) -> Array:
    """(T, batch, k) @ (k, j) -> (T, batch, j) as one matrix product over the stacked time axis.

    np.matmul on the 3-d array would run T small products instead of one large one.
    """
    return (stacked(arr) @ W).reshape(*arr.shape[:-1], W.shape[1])


def stacked(arr: Array) -> Array:
    """(T, batch, k) -> (T * batch, k): the stacked time axis, a sum over t as one product."""
    return arr.reshape(-1, arr.shape[-1])


def parameter_gradients(
    R: Array, h_prev: Array, x: Array | OneHot, e: Array, h: Array, bias_b: bool, bias_c: bool
) -> dict[str, Array]:
    """(2.3) and (2.4) as one matrix product each over the stacked time axis.

    R, h_prev: (L, batch, n); x: (L, batch, m) or a OneHot; e: (K, batch, p) and h: (K, batch, n)
    for the injected steps (e already weighted by how many windows inject each step). With numba
    installed, a window of one stream's few rows is one compiled call (fast.gradient_sums).
    """
    sums = fast.gradient_sums(R.shape[1], R.shape[0] * R.shape[1])  # compiled, or None (BLAS)
    if sums is not None:
        return sums(R, h_prev, x, e, h, bias_b, bias_c)
    grads = {
        "A": stacked(R).T @ stacked(h_prev),  # sum_t r_t h_{t-1}^T
        "B": input_gradient(stacked(R), x),  # sum_t r_t x_t^T: a product, or a scatter-add
        "C": stacked(e).T @ stacked(h),  # sum_t e_t h_t^T
    }
    if bias_b:
        grads["b"] = R.sum(axis=(0, 1))
    if bias_c:
        grads["c"] = e.sum(axis=(0, 1))
    return grads


@dataclass
class Run:
    """A sequence run forward with fixed parameters, for a frozen estimate: the checked data, the
    trajectory, l_t (T, batch) and e_t (T, batch, p)."""

    data: Batch
    traj: Trajectory
    l: Array
    e: Array


def run(model: ElmanRNN, x, y, h0, loss: str, mask, reset, *, dense: bool = False) -> Run:
    """Check (x, y, h0, mask, reset) against the model and the loss (batch.py), run (1.1)-(1.4)
    from h0 and take the losses and e_t (2.1): what every frozen estimate starts with. dense:
    OneHot inputs as their one-hot rows (the estimators that stack u_t = (h_{t-1}, x_t, 1))."""
    if not isinstance(model, ElmanRNN):
        raise InputError(f"model must be a tbptt.ElmanRNN, got {type(model).__name__}")
    data = check_batch(
        x, y, m=model.m, p=model.p, dtype=model.dtype, loss=loss, g=model.g, mask=mask, reset=reset
    )
    if dense:
        data = dense_inputs(data, model.dtype)
    h_init = check_h0(h0, model.n, data.x.shape[1], model.dtype, T=data.x.shape[0])
    traj = forward(model, data.x, h_init, data.reset)
    l, e = loss_and_error(model.g, loss, traj.z, data.y, data.mask)  # (T, batch), (T, batch, p)
    return Run(data, traj, l, e)
