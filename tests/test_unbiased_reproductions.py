"""The conclusions of the issue-14 reproductions (docs/results.md), checked at small sizes:
influence balancing (examples/influence_balancing_unbiased.py), copy memory with ARTBP
(examples/copy_memory_artbp.py) and the estimator table (examples/estimators_table.py)."""

from __future__ import annotations

import numpy as np

import tbptt
from tbptt import Truncation
from tbptt.analysis import influence as ib
from tbptt.analysis import influence_methods as im
from tbptt.analysis.estimators import Method, compare
from tbptt.app.tasks import COPY_LENGTH, copy_memory

STEPS, LR = 50000, 1e-5  # the example's settings


def test_influence_rtrl_and_artbp_special_cases_match_tbptt():
    """On the influence system: online RTRL equals exact online BPTT (Truncation(1, steps));
    ARTBP with c = 1 equals BPTT(1); ARTBP with c = 0 makes one update, the exact gradient."""
    steps = 300
    exact = ib.train(Truncation(1, steps), steps, lr=1e-3)
    np.testing.assert_allclose(im.train_rtrl(steps, lr=1e-3).theta, exact.theta, rtol=1e-12)
    one = ib.train(Truncation(1, 1), steps, lr=1e-3)
    np.testing.assert_allclose(
        im.train_artbp(steps, lr=1e-3, c=1, rng=0).theta, one.theta, rtol=1e-12
    )
    once = im.train_artbp(steps, lr=1e-3, c=0, rng=0)
    want = ib.THETA0 - 1e-3 * ib.gradient(ib.THETA0, steps)
    assert abs(once.final - want) < 1e-12 * max(1, abs(want))


def test_influence_unbiased_methods_converge_where_truncation_diverges():
    """The example's conclusion at its settings (lr 1e-5, 50,000 steps, seed 0): BPTT(10) blows up,
    BPTT(40) moves away from theta* = -1/6; UORO and ARTBP with windows of mean length 10 end
    within 1e-3 of it."""
    star = ib.optimum()
    assert np.isinf(ib.train(Truncation(1, 10), STEPS, lr=LR).final)
    away = ib.train(Truncation(1, 40), STEPS, lr=LR)
    assert abs(away.final - star) > 4 * abs(ib.THETA0 - star)
    assert abs(im.train_uoro(STEPS, lr=LR, rng=0).final - star) < 1e-3
    assert abs(im.train_artbp(STEPS, lr=LR, c=0.1, rng=0).final - star) < 1e-3


def test_copy_memory_tbptt_never_sees_the_symbols_artbp_does_in_expectation():
    """Why TBPTT(10, 10) stays at chance and ARTBP(c = 1/10) learns (lag 5, recall 15 steps after
    the symbol): the gradient of the recall losses with respect to the symbols' input weights
    B[:, :8] is exactly 0 for TBPTT (no window holds a symbol and its recall), and the mean of
    ARTBP estimates approaches the exact, nonzero one (within 3 standard errors per entry on
    average, a chance of failure below 1e-2 under the normal approximation)."""
    x, y, _ = copy_memory(5, 16, np.random.default_rng(0))
    T = len(x)
    mask = np.zeros((T, 16))
    mask[-COPY_LENGTH:] = 1.0  # the recall steps only
    model = tbptt.ElmanRNN.init(n=16, m=10, p=10, g="softmax", seed=0)
    kw = {"loss": "cross_entropy", "mask": mask}
    trunc = tbptt.gradients(model, x, y, Truncation(10, 10, flush=True), **kw)
    assert np.abs(trunc["B"][:, :8]).max() == 0.0
    exact = tbptt.gradients(model, x, y, **kw)["B"][:, :8]
    assert np.abs(exact).max() > 1e-3
    rng = np.random.default_rng(1)
    draws = np.array(
        [tbptt.artbp_gradients(model, x, y, c=0.1, rng=rng, **kw)["B"][:, :8] for _ in range(400)]
    )
    se = draws.std(axis=0, ddof=1) / np.sqrt(len(draws))
    z = (draws.mean(axis=0) - exact) / np.maximum(se, 1e-300)
    assert np.sqrt(np.mean(z**2)) < 1.5  # RMS z near 1 for an unbiased mean
    assert (np.abs(draws).max(axis=(1, 2)) > 0).mean() > 0.1  # some windows reach the symbols


def test_estimator_table_conclusions():
    """On a small fresh tanh network: TBPTT biased without variance, RTRL exact, UORO and ARTBP
    unbiased (bias within 3 noise floors), UORO's variance far above ARTBP's at a mean window of
    10, and one ARTBP estimate's error of the order of TBPTT(10, 10)'s bias."""
    rng = np.random.default_rng(1)
    model = tbptt.ElmanRNN.init(n=8, m=4, p=2, seed=0, spectral_radius=1.0)
    x, y = rng.normal(size=(60, 2, 4)), rng.normal(size=(60, 2, 2))
    methods = [
        Method("tbptt", {"k1": 10, "k2": 10}),
        Method("rtrl"),
        Method("uoro"),
        Method("artbp", {"c": 0.1}),
    ]
    rows = {r.method: r for r in compare(model, x, y, methods, draws=300, seed=0)}
    tb, rt, uo, ar = (rows[m.label()] for m in methods)
    assert tb.bias > 0.05 and tb.variance == 0
    assert rt.bias < 1e-12
    for r in (uo, ar):
        assert r.bias < 3 * r.noise
    assert uo.variance > 10 * ar.variance
    assert 0.2 * tb.bias < ar.error < 5 * tb.bias
