"""The compiled loops (tbptt[fast], numba) against the numpy reference loops and torch autograd.

Both paths run the same recurrences (1.1)-(1.2) and (3.1); TBPTT_NUMBA=0 switches the compiled
one off. They must agree to 1e-12 relative in float64 (the compiled loop sums in another order
and uses its own tanh, within 2 ulp of numpy's), and each must match autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import Problem, exact_gradient, rel_err

import tbptt
from tbptt.numpy import fast

pytest.importorskip("numba")
from tbptt.numpy import compiled  # noqa: E402

ACTS = ("tanh", "sigmoid", "relu", "identity")


def both_paths(monkeypatch, fn):
    """fn() on the numpy loops, then on the compiled loops."""
    monkeypatch.setenv(fast.ENV, "0")
    assert fast.kernels(1) is None
    ref = fn()
    monkeypatch.setenv(fast.ENV, "1")
    assert fast.kernels(1) is compiled
    return ref, fn()


def assert_same(ref: dict, got: dict, tol: float = 1e-12) -> None:
    assert set(ref) == set(got)
    for k in ref:
        assert rel_err(got[k], ref[k]) <= tol, (k, rel_err(got[k], ref[k]))


def test_switch_and_batch_rule(monkeypatch):
    """TBPTT_NUMBA=0 switches the compiled loops off; they serve one stream only."""
    monkeypatch.setenv(fast.ENV, "0")
    assert fast.compiled() is None and fast.kernels(1) is None
    monkeypatch.delenv(fast.ENV)
    assert fast.compiled() is compiled and fast.kernels(1) is compiled
    assert fast.kernels(fast.MAX_BATCH + 1) is None


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("f", ACTS)
def test_activation_and_derivative(f, dtype):
    """With A = 0 one step is h = f(a), f'(a): numpy's values within 2 ulp, NaN and inf kept."""
    a = np.concatenate(
        [
            np.linspace(-25, 25, 4001),
            np.geomspace(1e-30, 1, 200),
            -np.geomspace(1e-30, 1, 200),
            [0.0, 0.6249, 0.625, 0.6251, 9.0, 19.0, 20.0, 21.0, 1e30, -1e30],
        ]
    ).astype(dtype)
    hs = np.stack([np.zeros_like(a), a])[:, None, :]  # (2, 1, N): h_0 = 0, then a_1 = a
    fprime = np.empty_like(hs[1:])
    A = np.zeros((len(a), len(a)), dtype)
    compiled.forward_steps(hs, A, fast.ACTIVATION_CODES[f], fprime, None, hs[0])
    act = tbptt.numpy.functions.activation(f)
    want = act.fn(a.astype(np.float64), None)
    ulp = np.spacing(np.maximum(np.abs(want), np.finfo(dtype).tiny).astype(dtype)).astype(float)
    if f == "sigmoid":  # (1 + tanh(a / 2)) / 2 cancels near 0: an ulp of 1, for numpy's too
        ulp += np.finfo(dtype).eps
    assert np.all(np.abs(hs[1, 0] - want) <= 2 * ulp)
    want_fp = act.grad(want)
    assert np.all(np.abs(fprime[0, 0] - want_fp) <= 4 * np.spacing(np.ones(1, dtype)) + 4 * ulp)
    special = np.array([np.nan, np.inf, -np.inf], dtype)
    hs = np.stack([np.zeros_like(special), special])[:, None, :]
    fprime = np.empty_like(hs[1:])
    compiled.forward_steps(
        hs, np.zeros((3, 3), dtype), fast.ACTIVATION_CODES[f], fprime, None, hs[0]
    )
    np.testing.assert_array_equal(hs[1, 0], act.fn(special, None))  # NaN stays NaN


@pytest.mark.parametrize("f", ACTS)
@pytest.mark.parametrize("g", ["identity", "tanh", "softmax"])
def test_exact_gradient_equals_numpy_loops_and_autograd(monkeypatch, f, g):
    """Exact BPTT of one stream, with h0, biases, mask and resets: both paths, and autograd."""
    P = Problem(T=40, batch=None, f=f, g=g, h0=True, mask=True, reset=True, seed=3)
    ref, got = both_paths(monkeypatch, lambda: tbptt.gradients(P.model, P.x, P.y, **P.kw))
    assert_same(ref, got)
    _, want = exact_gradient(P.model, P.x, P.y, **P.kw)
    for k in ("A", "B", "C", "b", "c"):
        assert rel_err(got[k], want[k]) < 1e-10, k


@pytest.mark.parametrize("inject", ["new", "window", "last"])
def test_frozen_windows_equal_numpy_loops(monkeypatch, inject):
    """The frozen TBPTT estimate (windows with carries and cuts) agrees on both paths."""
    P = Problem(T=50, batch=None, f="tanh", h0=True, reset=True, seed=4)
    k2 = 3 if inject == "new" else 2
    tr = tbptt.Truncation(3, 3 * k2, inject=inject, flush=True)
    ref, got = both_paths(
        monkeypatch, lambda: tbptt.gradients(P.model, P.x, P.y, truncation=tr, **P.kw)
    )
    assert_same(ref, got)


def train_online(xs, ys, resets, f, opt):
    model = tbptt.ElmanRNN.init(n=6, m=3, p=2, f=f, seed=5)
    d = tbptt.TBPTT(model, tbptt.Truncation(4, 10, flush=True), opt, clip=2.0)
    i = 0
    for L in (1, 7, 3, 12, 5, 9, 2, 11):
        d.feed(xs[i : i + L], ys[i : i + L], reset=resets[i : i + L])
        i += L
    d.finish()
    return {**d.model.params, "h": d.h}


@pytest.mark.parametrize("f", ACTS)
def test_online_training_equals_numpy_loops(monkeypatch, f):
    """Online TBPTT of one stream (ragged chunks, resets, flush, Adam, clipping): same
    parameters."""
    rng = np.random.default_rng(6)
    xs, ys = rng.normal(size=(50, 3)), rng.normal(size=(50, 2))
    resets = rng.random(50) < 0.1
    ref, got = both_paths(monkeypatch, lambda: train_online(xs, ys, resets, f, tbptt.Adam(lr=0.05)))
    assert_same(ref, got)


def test_float32_agrees_with_numpy_loops(monkeypatch):
    """float32 stays float32 and agrees with the numpy loops to float32 rounding."""
    P = Problem(T=60, batch=None, f="tanh", seed=7)
    model = P.model.replace(**{k: v.astype(np.float32) for k, v in P.model.params.items()})
    ref, got = both_paths(monkeypatch, lambda: tbptt.gradients(model, P.x, P.y))
    for k in ref:
        assert got[k].dtype == np.float32
        assert rel_err(got[k], ref[k]) < 1e-5, k


def test_overflow_is_reported_on_both_paths(monkeypatch):
    """An infinity made inside the compiled loop stops online training as the numpy loop does."""
    model = tbptt.ElmanRNN.init(n=3, m=2, p=2, f="identity", seed=8)
    model = model.replace(A=np.eye(3) * 1e80)
    x, y = np.ones((8, 2)), np.zeros((8, 2))

    def run():
        d = tbptt.TBPTT(model, tbptt.Truncation(4, 4), tbptt.SGD(lr=0.1))
        with pytest.raises(tbptt.NonFiniteError) as err:
            d.feed(x, y)
        return {"step": np.array(float(err.value.step)), "A": d.model.A}

    ref, got = both_paths(monkeypatch, run)
    assert_same(ref, got, tol=0)


OPTIMIZERS = {
    "sgd": lambda: tbptt.SGD(lr=0.02),
    "nesterov": lambda: tbptt.SGD(lr=0.02, momentum=0.9, nesterov=True),
    "adam": lambda: tbptt.Adam(lr=0.01),
}


def train_long(P, opt: str, k1: int, k2: int, reduction: str, onehot: bool = False) -> dict:
    """Online TBPTT of one stream over many updates: ragged chunks, resets, a mask, clipping."""
    d = tbptt.TBPTT(
        P.model,
        tbptt.Truncation(k1, k2),
        OPTIMIZERS[opt](),
        loss=P.loss,
        clip=1.5,
        h0=P.h0,
        reduction=reduction,
    )
    x = tbptt.OneHot(np.argmax(P.x, axis=-1), P.x.shape[-1]) if onehot else P.x
    losses, i, sizes = [], 0, (13, 1, 29, 7, 40, 3)
    while i < P.T:
        L = sizes[len(losses) % len(sizes)]
        sl = slice(i, i + L)
        losses.append(d.feed(x[sl], P.y[sl], mask=P.mask[sl], reset=P.reset[sl]))
        i += L
    d.finish()
    assert d.updates >= 60
    return {**d.model.params, "h": d.h, "losses": np.array(losses), **d.opt_state}


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize(
    "f, g, loss",
    [
        ("tanh", "identity", "l2"),
        ("sigmoid", "tanh", "l2"),
        ("relu", "softmax", "l2"),
        ("tanh", "softmax", "cross_entropy"),
    ],
)
@pytest.mark.parametrize("k1, k2, reduction", [(5, 12, "sum"), (6, 6, "mean")])
def test_compiled_online_update_equals_numpy_path(monkeypatch, opt, f, g, loss, k1, k2, reduction):
    """The compiled update of one stream (the piece, the window through several segments, the
    sums, the step) gives the numpy path's parameters, losses and optimizer state to 1e-12."""
    P = Problem(T=400, n=6, m=4, p=3, f=f, g=g, loss=loss, h0=True, mask=True, reset=True, seed=9)
    ref, got = both_paths(monkeypatch, lambda: train_long(P, opt, k1, k2, reduction))
    assert_same(ref, got)


def test_compiled_online_update_with_onehot_inputs(monkeypatch):
    """Integer inputs (tbptt.OneHot) through the compiled piece and sums: the numpy path's
    results to 1e-12."""
    P = Problem(T=300, n=5, m=4, p=4, loss="cross_entropy", mask=True, reset=True, seed=10)
    ref, got = both_paths(monkeypatch, lambda: train_long(P, "adam", 4, 10, "mean", onehot=True))
    assert_same(ref, got)


def test_non_finite_parameters_are_reported_on_both_paths(monkeypatch):
    """A step that overflows the parameters stops training at the same update on both paths,
    with the last finite parameters kept."""
    model = tbptt.ElmanRNN.init(n=3, m=2, p=2, seed=11)
    x, y = np.ones((8, 2)), np.full((8, 2), 1e6)

    def run():
        d = tbptt.TBPTT(model.copy(), tbptt.Truncation(4, 4), tbptt.SGD(lr=1e307))
        with (
            np.errstate(over="ignore"),
            pytest.raises(tbptt.NonFiniteError, match="parameters became non-finite") as err,
        ):
            d.feed(x, y)
        return {"step": np.array(float(err.value.step)), **d.model.params}

    ref, got = both_paths(monkeypatch, run)
    assert_same(ref, got, tol=0)
    assert_same(ref, {"step": ref["step"], **model.params}, tol=0)
