"""Truncation windows and the frozen TBPTT estimate (SEMANTICS.md 3-5, invariants 7.2-7.5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    Problem,
    assert_close,
    bptt_h,
    detach_every_k,
    exact_gradient,
    exact_state_gradients,
    frozen_gradient,
    rel_err,
    theano_truncated,
    window_gradient,
)

import tbptt
from tbptt import Truncation

ACTS = ("tanh", "sigmoid", "relu", "identity")

# (k1, k2, T): k1 | T, k1 not dividing T, k2 = k1, k2 > k1 not a multiple, k2 >= T, k1 > T
SCHEDULES = [
    (1, 1, 7),
    (2, 3, 8),
    (3, 5, 8),
    (3, 3, 7),
    (2, 9, 7),
    (4, 6, 9),
    (9, 9, 7),
    (9, 11, 7),
]


def estimate(P: Problem, tr: Truncation | None) -> dict[str, np.ndarray]:
    return tbptt.gradients(P.model, P.x, P.y, tr, **P.kw)


def oracle(P: Problem, tr: Truncation) -> dict[str, np.ndarray]:
    return frozen_gradient(P.model, P.x, P.y, tr.windows(P.T), **P.kw)


def prefix(P: Problem, u: int) -> Problem:
    """The same problem cut after step u."""
    cut = Problem.__new__(Problem)
    cut.__dict__.update(P.__dict__)
    cut.T = u
    cut.x, cut.y = P.x[:u], P.y[:u]
    cut.mask = None if P.mask is None else P.mask[:u]
    cut.reset = None if P.reset is None else P.reset[:u]
    return cut


def engine_window_gradients(P: Problem, tr: Truncation) -> list[dict[str, np.ndarray]]:
    """Each window's g^W from the public API: the estimate on x[:u_j] minus that on x[:u_{j-1}],
    and the flush window as the estimate with flush minus the one without."""
    plain = Truncation(tr.k1, tr.k2, tr.inject, flush=False)
    out, before = [], None
    for w in plain.windows(P.T):
        now = estimate(prefix(P, w.u), plain)
        out.append(now if before is None else {k: now[k] - before[k] for k in now})
        before = now
    if tr.flush and P.T % tr.k1:
        full, cut = estimate(P, tr), estimate(P, plain)
        out.append({k: full[k] - cut[k] for k in full})
    return out


# -- 7.2: the frozen estimate and each window against autograd ------------------------------------
@pytest.mark.parametrize(("k1", "k2", "T"), SCHEDULES)
@pytest.mark.parametrize("inject", tbptt.INJECT_MODES)
@pytest.mark.parametrize("flush", [False, True])
def test_frozen_estimate_matches_autograd(k1, k2, T, inject, flush):
    """Every inject mode and schedule: the estimate is the sum of autograd window gradients."""
    P = Problem(T=T, batch=2, h0=True, mask=True, reset=True, seed=k1 + 10 * k2 + T)
    tr = Truncation(k1, k2, inject, flush)
    assert_close(estimate(P, tr), oracle(P, tr), rtol=1e-10)


@pytest.mark.parametrize(
    "kind",
    ["single", "no-bias", "single-no-bias", "cross-entropy", "ce-single-mask", "softmax-l2"],
)
@pytest.mark.parametrize("inject", tbptt.INJECT_MODES)
def test_frozen_estimate_variants_match_autograd(kind, inject):
    """One stream or a batch, with or without biases, cross-entropy and softmax with L2."""
    opts = {
        "single": {},
        "no-bias": {"batch": 2, "bias": False},
        "single-no-bias": {"bias": False},
        "cross-entropy": {"batch": 3, "p": 3, "loss": "cross_entropy", "reset": True},
        "ce-single-mask": {"p": 3, "loss": "cross_entropy", "mask": True},
        "softmax-l2": {"batch": 2, "p": 3, "g": "softmax", "mask": True},
    }[kind]
    P = Problem(T=9, seed=21, **opts)
    tr = Truncation(2, 5, inject, flush=True)
    assert_close(estimate(P, tr), oracle(P, tr), rtol=1e-10)


@pytest.mark.parametrize("f", ACTS)
@pytest.mark.parametrize("g", (*ACTS, "softmax"))
def test_frozen_estimate_activations_match_autograd(f, g):
    """Every f and g: the overlapping-window estimate equals the autograd window sum."""
    P = Problem(T=8, batch=2, f=f, g=g, h0=True, reset=True, seed=22)
    tr = Truncation(3, 5, "window", flush=True)
    assert_close(estimate(P, tr), oracle(P, tr), rtol=1e-10)


@pytest.mark.parametrize("inject", tbptt.INJECT_MODES)
@pytest.mark.parametrize(("k1", "k2", "T"), [(2, 3, 7), (3, 5, 8), (3, 3, 7), (2, 9, 7)])
def test_each_window_matches_autograd_with_h_detached(inject, k1, k2, T):
    """Each window's gradient equals autograd over steps s..u from a detached h_{s-1}."""
    P = Problem(T=T, batch=2, h0=True, mask=True, reset=True, seed=23)
    tr = Truncation(k1, k2, inject, flush=True)
    got = engine_window_gradients(P, tr)
    assert len(got) == len(tr.windows(T))
    for g, w in zip(got, tr.windows(T), strict=True):
        want = window_gradient(P.model, P.x, P.y, w.s, w.i, w.u, **P.kw)
        assert_close(g, want, rtol=1e-10, atol=1e-12)
        if w.s > 1:
            assert np.all(want["h0"] == 0)  # a window starting later gives h0 nothing


@pytest.mark.parametrize("inject", tbptt.INJECT_MODES)
def test_k1_beyond_T_gives_zero_gradients(inject):
    """k1 > T without flush: no window, every gradient (h0 included) exactly zero."""
    P = Problem(T=5, batch=2, h0=True, seed=24)
    got = estimate(P, Truncation(6, 8, inject))
    assert set(got) == {"A", "B", "C", "b", "c", "h0"}
    assert all(np.all(v == 0) for v in got.values())
    assert got["h0"].shape == (2, 3)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 10),
    n=st.integers(1, 3),
    m=st.integers(1, 3),
    p=st.integers(1, 3),
    batch=st.sampled_from([None, 2]),
    k1=st.integers(1, 6),
    k2=st.integers(1, 12),
    inject=st.sampled_from(tbptt.INJECT_MODES),
    flush=st.booleans(),
    f=st.sampled_from(ACTS),
    loss=st.sampled_from(["l2", "cross_entropy"]),
    extras=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_schedules_match_autograd(
    T, n, m, p, batch, k1, k2, inject, flush, f, loss, extras, seed
):
    """Random shapes and schedules: the frozen estimate equals the autograd window sum."""
    if inject == "new":
        k2 = max(k1, k2)
    P = Problem(T, n, m, p, batch, f=f, loss=loss, h0=extras, mask=extras, reset=extras, seed=seed)
    tr = Truncation(k1, k2, inject, flush)
    assert_close(estimate(P, tr), oracle(P, tr), rtol=1e-10, atol=1e-12)


# -- 7.3: the special cases of section 4 -----------------------------------------------------------
@pytest.mark.parametrize("T", [5, 8])
@pytest.mark.parametrize("k1", [1, 3, 5, 8])
def test_k2_at_least_k1_ceil_T_over_k1_new_flush_is_exact(T, k1):
    """k2 >= k1 ceil(T / k1) with inject='new' and flush equals exact BPTT, h0 included; so does
    k1 >= T with k2 >= k1 (one window)."""
    P = Problem(T=T, batch=2, h0=True, mask=True, reset=True, seed=30)
    exact = exact_gradient(P.model, P.x, P.y, **P.kw)[1]
    least = k1 * math.ceil(T / k1)
    for k2 in (least, least + 3):
        assert_close(estimate(P, Truncation(k1, k2, "new", flush=True)), exact, rtol=1e-10)
    if T % k1 and least - 1 >= k1:  # one step less: the flush window no longer reaches step 1
        Q = Problem(T=T, batch=2, seed=30)  # no resets, which could cut there anyway
        got = estimate(Q, Truncation(k1, least - 1, "new", flush=True))
        assert rel_err(flat(got), flat(estimate(Q, None))) > 1e-8


@pytest.mark.parametrize(("k", "T"), [(1, 6), (2, 6), (3, 7), (3, 9), (7, 7)])
def test_k1_equals_k2_is_detach_every_k(k, T):
    """k1 = k2 = k equals an autograd loop that detaches the state every k steps: with flush
    including its short last chunk, without it dropping that chunk."""
    P = Problem(T=T, batch=2, h0=True, mask=True, reset=True, seed=31)
    for flush in (False, True):
        want = detach_every_k(P.model, P.x, P.y, k, flush=flush, **P.kw)
        assert_close(estimate(P, Truncation(k, k, "new", flush)), want, rtol=1e-10)
        assert_close(estimate(P, Truncation.detach_every(k, flush)), want, rtol=1e-10)


def test_detach_every_k_flush_window_is_the_short_last_chunk():
    """With flush and k not dividing T the last window is the steps after the last chunk alone
    (contract version 2), not a window reaching k steps back into the previous chunk."""
    k, T = 3, 7
    P = Problem(T=T, batch=2, seed=32)
    got = estimate(P, Truncation(k, k, "new", flush=True))
    windows = [(1, 1, 3), (4, 4, 6), (7, 7, 7)]
    assert_close(got, frozen_gradient(P.model, P.x, P.y, [_w(*w) for w in windows]), rtol=1e-10)
    reaching_back = [(1, 1, 3), (4, 4, 6), (5, 7, 7)]  # version 1's flush window
    old = frozen_gradient(P.model, P.x, P.y, [_w(*w) for w in reaching_back])
    assert rel_err(got["A"], old["A"]) > 1e-4


def _w(s: int, i: int, u: int) -> tbptt.Window:
    return tbptt.Window(s=s, i=i, u=u)


@pytest.mark.parametrize("k2", [1, 2, 4, 9])
def test_k1_1_new_is_bptt_h(k2):
    """k1 = 1, inject='new' equals Williams and Peng's BPTT(k2): each loss backpropagated k2
    steps."""
    P = Problem(T=8, batch=2, h0=True, mask=True, reset=True, seed=33)
    want = bptt_h(P.model, P.x, P.y, k2, **P.kw)
    assert_close(estimate(P, Truncation(1, k2, "new")), want, rtol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 6, 9])
def test_single_end_window_is_theano_truncate_gradient(k):
    """k1 = T, k2 = k, inject='window' equals Theano's scan(truncate_gradient=k)."""
    P = Problem(T=9, batch=2, h0=True, seed=34)
    want = theano_truncated(P.model, P.x, P.y, k, h0=P.h0)
    assert_close(estimate(P, Truncation(9, k, "window")), want, rtol=1e-10)


@pytest.mark.parametrize("k", [0, 2, 5])
def test_seed_answer_sum_is_end_window_with_k2_k_plus_1(k):
    """The answer's sum_{t=T-k..T} (dL/dh_t * f'(a_t)) h_{t-1}^T is the end window with k2 = k+1."""
    P = Problem(T=8, bias=False, seed=35)
    T = P.T
    delta, H = exact_state_gradients(P.model, P.x, P.y)  # dL/dh_t (T, n), h_0..h_T (T+1, n)
    t = np.arange(T - k, T + 1)  # 1-based steps T-k..T
    r = delta[t - 1] * (1 - H[t] ** 2)  # dL/dh_t * tanh'(a_t)
    answer_A = r.T @ H[t - 1]  # sum_t r_t h_{t-1}^T
    answer_B = r.T @ P.x[t - 1]
    got = estimate(P, Truncation(T, k + 1, "window"))
    np.testing.assert_allclose(got["A"], answer_A, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got["B"], answer_B, rtol=1e-10, atol=1e-14)


# -- 7.4: A = 0 ---------------------------------------------------------------------------------
def test_A_zero_every_new_truncation_is_exact():
    """A = 0, inject='new', every loss used (flush or k1 | T): every truncation is exact."""
    T = 7
    P = Problem(T=T, batch=2, h0=True, mask=True, reset=True, seed=40)
    P.model = P.model.replace(A=np.zeros((3, 3)))
    exact = exact_gradient(P.model, P.x, P.y, **P.kw)[1]
    assert np.all(exact["h0"] == 0)
    for k1 in range(1, T + 2):
        for k2 in range(k1, T + 3):
            got = estimate(P, Truncation(k1, k2, "new", flush=True))
            assert_close(got, exact, rtol=1e-12, atol=1e-15)


def test_A_zero_without_flush_drops_only_the_tail_losses():
    """A = 0, inject='new', no flush: exact gradient of the losses up to the last update."""
    T, k1 = 8, 3
    P = Problem(T=T, batch=2, mask=True, seed=41)
    P.model = P.model.replace(A=np.zeros((3, 3)))
    kept = P.mask.copy()
    kept[(T // k1) * k1 :] = 0
    want = exact_gradient(P.model, P.x, P.y, mask=kept)[1]
    for k2 in (3, 4, 10):
        assert_close(estimate(P, Truncation(k1, k2)), want, rtol=1e-12, atol=1e-15)


# -- 7.5: convergence in k2 ---------------------------------------------------------------------
def flat(grads: dict[str, np.ndarray]) -> np.ndarray:
    """Every gradient in one vector (sorted by name)."""
    return np.concatenate([grads[k].ravel() for k in sorted(grads)])


@pytest.mark.parametrize(("k1", "flush"), [(3, True), (4, False), (5, True)])
def test_new_estimate_approaches_exact_as_k2_grows(k1, flush):
    """Frozen inject='new' (flush or k1 | T), a contractive net: the error shrinks as k2 grows
    and is 0 once every window starts at step 1 (k2 >= k1 ceil(T / k1))."""
    T = 12
    P = Problem(T=T, batch=2, scale=0.5, seed=42)
    exact = flat(estimate(P, None))
    least = k1 * math.ceil(T / k1)
    errors = [
        rel_err(flat(estimate(P, Truncation(k1, k2, "new", flush))), exact)
        for k2 in range(k1, least + 3)
    ]
    assert errors[0] > 1e-2  # the truncation bias is visible at k2 = k1
    assert all(b <= a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[least - k1 - 1] > 1e-8  # one step short is still biased
    assert max(errors[least - k1 :]) < 1e-13  # k2 >= k1 ceil(T / k1): exact


@pytest.mark.parametrize(("inject", "k1"), [("window", 3), ("window", 5), ("last", 3)])
def test_window_and_last_converge_to_something_else(inject, k1):
    """inject='window' or 'last' with every window starting at step 1 (k2 >= k1 ceil(T / k1)) is
    the exact gradient of each loss weighted by the number of windows injecting it, not the exact
    gradient."""
    T = 12
    P = Problem(T=T, batch=2, scale=0.9, seed=43)
    least = k1 * math.ceil(T / k1)
    tr = Truncation(k1, least, inject, flush=True)
    uses = np.array([c for c, _, _ in tr.loss_uses(T)], dtype=np.float64)  # n_t
    weighted = exact_gradient(P.model, P.x, P.y, mask=np.repeat(uses[:, None], 2, axis=1))[1]
    for k2 in (least, least + 4):
        assert_close(estimate(P, Truncation(k1, k2, inject, flush=True)), weighted, rtol=1e-10)
    exact = estimate(P, None)
    assert rel_err(estimate(P, tr)["A"], exact["A"]) > 0.1
    if inject == "window":
        assert uses.max() > 1  # overlapping windows count losses more than once
