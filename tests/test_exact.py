"""Exact BPTT (SEMANTICS.md 2, invariant 7.1): finite differences and torch autograd as oracles."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import Problem, assert_close, exact_gradient, rel_err

import tbptt

ACTS = ("tanh", "sigmoid", "relu", "identity")
OUTS = (*ACTS, "softmax")


def fd_gradient(P: Problem, eps: float = 1e-6) -> dict[str, np.ndarray]:
    """Central finite differences of tbptt.total_loss, entry by entry, for every parameter and
    h0."""
    model, kw = P.model, P.kw
    h0 = kw["h0"]
    if h0 is None:
        h0 = np.zeros(model.n if np.ndim(P.x) == 2 else (P.x.shape[1], model.n))

    def loss(name: str, value: np.ndarray) -> float:
        if name == "h0":
            return tbptt.total_loss(model, P.x, P.y, **{**kw, "h0": value})
        return tbptt.total_loss(model.replace(**{name: value}), P.x, P.y, **{**kw, "h0": h0})

    out = {}
    for name, value in {**model.params, "h0": h0}.items():
        grad = np.zeros(np.shape(value))
        for idx in np.ndindex(grad.shape):
            plus, minus = np.array(value, dtype=np.float64), np.array(value, dtype=np.float64)
            plus[idx] += eps
            minus[idx] -= eps
            grad[idx] = (loss(name, plus) - loss(name, minus)) / (2 * eps)
        out[name] = grad
    return out


def assert_fd(P: Problem) -> None:
    got = tbptt.gradients(P.model, P.x, P.y, **P.kw)
    want = fd_gradient(P)
    if P.reset is not None:
        # total_loss also uses h0 as the restart value, where the contract makes it a constant
        # (section 6), so its derivative in h0 is not the "h0" gradient; that is checked below.
        del got["h0"], want["h0"]
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape
        assert rel_err(got[k], want[k]) < 1e-6, (k, rel_err(got[k], want[k]))


@pytest.mark.parametrize("f", ACTS)
@pytest.mark.parametrize("g", OUTS)
def test_exact_matches_finite_differences(f, g):
    """Exact BPTT equals central finite differences (rel err < 1e-6), batch with h0, mask, reset."""
    assert_fd(Problem(T=6, batch=2, f=f, g=g, h0=True, mask=True, reset=True, seed=1))


@pytest.mark.parametrize("f", ACTS)
def test_exact_cross_entropy_matches_finite_differences(f):
    """Softmax cross-entropy with integer targets equals finite differences (rel err < 1e-6)."""
    assert_fd(Problem(T=6, batch=2, p=3, f=f, loss="cross_entropy", mask=True, seed=2))


@pytest.mark.parametrize("f", ACTS)
def test_exact_h0_matches_finite_differences(f):
    """Without resets the h0 gradient is the derivative of L in h0 (finite differences)."""
    assert_fd(Problem(T=6, batch=2, f=f, h0=True, mask=True, seed=12))


def test_reset_restarts_from_h0_as_a_constant():
    """With resets, the h0 gradient counts only the first step, not the restarts (section 6)."""
    P = Problem(T=6, batch=2, h0=True, seed=13)
    P.reset = np.zeros((6, 2), bool)
    P.reset[3] = True
    got = tbptt.gradients(P.model, P.x, P.y, **P.kw)["h0"]
    cut = tbptt.gradients(P.model, P.x[:3], P.y[:3], h0=P.h0)["h0"]  # L of steps 1..3
    np.testing.assert_allclose(got, cut, rtol=1e-12)
    assert rel_err(fd_gradient(P)["h0"], got) > 1e-3  # total_loss's h0 also moves the restarts


@pytest.mark.parametrize("bias", [True, False])
def test_exact_single_stream_matches_finite_differences(bias):
    """One stream (x of shape (T, m)), with and without biases, equals finite differences."""
    assert_fd(Problem(T=7, bias=bias, seed=3))


@pytest.mark.parametrize("f", ACTS)
@pytest.mark.parametrize("g", OUTS)
def test_exact_matches_autograd(f, g):
    """Exact BPTT equals torch autograd through the whole sequence (rel err < 1e-10)."""
    P = Problem(T=8, batch=3, f=f, g=g, h0=True, mask=True, reset=True, seed=4)
    L, want = exact_gradient(P.model, P.x, P.y, **P.kw)
    assert_close(tbptt.gradients(P.model, P.x, P.y, **P.kw), want, rtol=1e-10)
    assert abs(tbptt.total_loss(P.model, P.x, P.y, **P.kw) - L) <= 1e-12 * abs(L)


@pytest.mark.parametrize("single", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask", [True, False])
def test_exact_cross_entropy_matches_autograd(single, bias, mask):
    """Cross-entropy, one stream or a batch, with or without biases and mask, equals autograd."""
    P = Problem(
        T=7, p=4, batch=None if single else 2, loss="cross_entropy", bias=bias, mask=mask, seed=5
    )
    L, want = exact_gradient(P.model, P.x, P.y, **P.kw)
    assert_close(tbptt.gradients(P.model, P.x, P.y, **P.kw), want, rtol=1e-10)
    assert abs(tbptt.total_loss(P.model, P.x, P.y, **P.kw) - L) <= 1e-12 * abs(L)


@pytest.mark.parametrize(
    ("batch", "h0_shape", "want_shape"),
    [
        (None, None, (3,)),
        (2, None, (2, 3)),
        (2, (3,), (3,)),
        (2, (2, 3), (2, 3)),
        (None, (3,), (3,)),
    ],
)
def test_h0_gradient_shape_follows_h0(batch, h0_shape, want_shape):
    """The h0 gradient has h0's shape; one (n,) state shared by the streams gets their sum."""
    P = Problem(T=5, n=3, batch=batch, seed=6)
    if h0_shape is not None:
        P.h0 = np.random.default_rng(0).normal(size=h0_shape)
    _, want = exact_gradient(P.model, P.x, P.y, **P.kw)
    got = tbptt.gradients(P.model, P.x, P.y, **P.kw)
    assert got["h0"].shape == want_shape
    assert_close(got, want, rtol=1e-10)


def test_batch_is_independent_streams():
    """A batch's gradient is the sum of its streams' gradients, each from its own h0."""
    P = Problem(T=6, batch=3, h0=True, mask=True, reset=True, seed=7)
    whole = tbptt.gradients(P.model, P.x, P.y, **P.kw)
    for k in P.model.params:
        parts = [
            tbptt.gradients(
                P.model, P.x[:, j], P.y[:, j], h0=P.h0[j], mask=P.mask[:, j], reset=P.reset[:, j]
            )[k]
            for j in range(3)
        ]
        np.testing.assert_allclose(whole[k], sum(parts), rtol=1e-12, atol=1e-14)
    for j in range(3):
        one = tbptt.gradients(
            P.model, P.x[:, j], P.y[:, j], h0=P.h0[j], mask=P.mask[:, j], reset=P.reset[:, j]
        )
        np.testing.assert_allclose(whole["h0"][j], one["h0"], rtol=1e-12, atol=1e-14)


def test_reset_at_first_step_cuts_h0():
    """A reset at step 1 makes h0 a constant for that stream: its h0 gradient is zero."""
    P = Problem(T=5, batch=2, h0=True, seed=8)
    P.reset = np.zeros((5, 2), bool)
    P.reset[0, 1] = True
    got = tbptt.gradients(P.model, P.x, P.y, **P.kw)
    assert np.all(got["h0"][1] == 0) and np.any(got["h0"][0] != 0)
    assert_close(got, exact_gradient(P.model, P.x, P.y, **P.kw)[1], rtol=1e-10)


def test_fully_masked_loss_has_zero_gradient():
    """With every step masked out, L = 0 and every gradient is exactly zero."""
    P = Problem(T=5, batch=2, h0=True, mask=True, seed=9)
    P.mask = np.zeros_like(P.mask)
    got = tbptt.gradients(P.model, P.x, P.y, **P.kw)
    assert tbptt.total_loss(P.model, P.x, P.y, **P.kw) == 0
    assert all(np.all(v == 0) for v in got.values())


def test_exact_is_truncation_k1_k2_T():
    """Exact BPTT is the truncation k1 = k2 = T (Truncation.exact(T) likewise)."""
    P = Problem(T=9, batch=2, h0=True, mask=True, reset=True, seed=10)
    exact = tbptt.gradients(P.model, P.x, P.y, **P.kw)
    for tr in (tbptt.Truncation(9, 9), tbptt.Truncation.exact(9), tbptt.Truncation(9, 9, "window")):
        assert_close(tbptt.gradients(P.model, P.x, P.y, tr, **P.kw), exact, rtol=1e-13)


def test_float32_model_gives_float32_gradients():
    """A float32 model returns float32 gradients close to the float64 ones."""
    P = Problem(T=6, batch=2, seed=11)
    m32 = tbptt.ElmanRNN(**{k: v.astype(np.float32) for k, v in P.model.params.items()})
    got = tbptt.gradients(m32, P.x, P.y)
    want = tbptt.gradients(P.model, P.x, P.y)
    for k in want:
        assert got[k].dtype == np.float32
        assert rel_err(got[k], want[k]) < 1e-5


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(1, 9),
    n=st.integers(1, 4),
    m=st.integers(1, 3),
    p=st.integers(1, 3),
    batch=st.sampled_from([None, 1, 3]),
    f=st.sampled_from(ACTS),
    g=st.sampled_from((*OUTS, "cross_entropy")),
    bias=st.booleans(),
    extras=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_exact_random_shapes_match_autograd(T, n, m, p, batch, f, g, bias, extras, seed):
    """Random shapes, activations, losses, masks and resets: exact BPTT equals autograd."""
    loss = "cross_entropy" if g == "cross_entropy" else "l2"
    P = Problem(
        T,
        n,
        m,
        p,
        batch,
        f=f,
        g=g,
        loss=loss,
        bias=bias,
        h0=extras,
        mask=extras,
        reset=extras,
        seed=seed,
    )
    _, want = exact_gradient(P.model, P.x, P.y, **P.kw)
    assert_close(tbptt.gradients(P.model, P.x, P.y, **P.kw), want, rtol=1e-10, atol=1e-12)
