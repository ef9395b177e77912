"""ARTBP (SEMANTICS.md 8): the estimate against autograd, its special cases, unbiasedness,
online."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from reference import OnlineTBPTT, Problem, assert_close
from reference_unbiased import OnlineDirect, artbp_cuts, artbp_torch
from unbiased_checks import check_unbiased

import tbptt
from tbptt import SGD, Adam, InputError, Truncation
from tbptt.analysis.estimators import flatten
from tbptt.numpy.artbp import window_gradients
from tbptt.numpy.elman import forward
from tbptt.numpy.functions import loss_and_error

SCHEDULES = {
    "constant": (0.3, 1),
    "every-3": (0.5, 3),
    "growing": (lambda L: min(1.0, 0.15 * L), 1),
    "falling": (lambda L: 1 / (L + 1), 2),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"h0": True, "mask": True, "reset": True},
        {"p": 3, "loss": "cross_entropy"},
        {"f": "relu", "g": "sigmoid", "bias": False},
        {"batch": None, "g": "softmax"},
    ],
)
def test_artbp_equals_autograd_with_the_same_cuts(schedule, opts):
    """With the cuts drawn as the contract says (one uniform per possible boundary), the estimate
    equals autograd through each window with the state gradient scaled by 1 / (1 - c_L) at every
    uncut boundary, to 1e-10."""
    c, b = SCHEDULES[schedule]
    P = Problem(**{"T": 14, "batch": 3, "seed": 12, **opts})
    got = tbptt.artbp_gradients(P.model, P.x, P.y, c=c, b=b, rng=7, **P.kw)
    cuts, weights = artbp_cuts(P.T - 1, c, b, np.random.default_rng(7))
    want = artbp_torch(P.model, P.x, P.y, cuts, weights, **P.kw)
    assert_close(got, want, rtol=1e-10)


def test_artbp_c0_is_exact_and_c1_is_tbptt_1_1():
    """c = 0 never cuts: exact BPTT. c = 1, b = 1 cuts everywhere: TBPTT(1, 1)."""
    P = Problem(T=12, batch=2, h0=True, mask=True, reset=True, seed=13)
    exact = tbptt.gradients(P.model, P.x, P.y, **P.kw)
    tb11 = tbptt.gradients(P.model, P.x, P.y, Truncation(1, 1), **P.kw)
    for g in (exact, tb11):
        g.pop("h0")
    assert_close(tbptt.artbp_gradients(P.model, P.x, P.y, c=0, rng=1, **P.kw), exact, rtol=1e-12)
    assert_close(tbptt.artbp_gradients(P.model, P.x, P.y, c=1, rng=1, **P.kw), tb11, rtol=1e-12)
    every4 = tbptt.gradients(P.model, P.x, P.y, Truncation(4, 4, flush=True), **P.kw)
    every4.pop("h0")
    assert_close(tbptt.artbp_gradients(P.model, P.x, P.y, c=1, b=4, rng=1, **P.kw), every4)


def test_artbp_is_unbiased_with_error_falling_like_one_over_sqrt_n():
    """The mean of N ARTBP estimates approaches exact BPTT, its squared error V / N
    (tests/unbiased_checks.py: false-alarm rate about 1e-3, fixed seed)."""
    P = Problem(T=8, batch=2, reset=True, seed=11)
    exact = flatten(tbptt.gradients(P.model, P.x, P.y, **P.kw))
    rng = np.random.default_rng(0)
    c = lambda L: min(1.0, 0.2 * L)  # noqa: E731
    check_unbiased(
        lambda: flatten(tbptt.artbp_gradients(P.model, P.x, P.y, c=c, rng=rng, **P.kw)), exact
    )


def test_forced_cut_is_biased_and_says_so():
    """biased_max_length cuts every window at that length: with c = 0 it is TBPTT(k, k), which is
    not the exact gradient."""
    P = Problem(T=12, batch=2, seed=14)
    got = tbptt.artbp_gradients(P.model, P.x, P.y, c=0, rng=1, biased_max_length=4)
    want = tbptt.gradients(P.model, P.x, P.y, Truncation(4, 4, flush=True))
    want.pop("h0")
    assert_close(got, want, rtol=1e-12)


def test_improbable_window_is_split_not_overflowed():
    """A window whose compensation Pi exceeds float32's range (log Pi = 76 > 60) is computed in
    blocks: the same gradient as float64 (one block) within float32's rounding."""
    P = Problem(T=13, batch=3, seed=3)
    weights = {t: 1e3 for t in range(1, 12)}
    out = []
    for dtype in (np.float64, np.float32):
        m = tbptt.ElmanRNN(**{k: v.astype(dtype) for k, v in P.model.params.items()})
        traj = forward(m, P.x.astype(dtype), np.zeros((3, m.n), dtype))
        _, e = loss_and_error(m.g, "l2", traj.z, P.y.astype(dtype), None)
        out.append(window_gradients(m, traj, e, 0, [5], weights))
    assert np.isfinite(out[1]["A"]).all()
    assert_close(out[1], out[0], rtol=1e-4)
    want = artbp_torch(P.model, P.x, P.y, [5], weights)
    assert_close(out[0], want, rtol=1e-10)


@pytest.mark.parametrize("c", [0.35, lambda L: min(1.0, 0.2 * L)])
@pytest.mark.parametrize("opt", [SGD(lr=0.1, momentum=0.9), Adam(lr=0.01)])
def test_online_artbp_against_autograd_reference(c, opt):
    """Online ARTBP (an update at every cut, each window through the steps as computed) equals
    the torch reference with the same cut draws, in chunks, with clipping."""
    P = Problem(T=17, batch=2, h0=True, mask=True, reset=True, seed=15)
    ref = OnlineDirect(
        "artbp", P.model, opt, c=c, b=2, rng=np.random.default_rng(4), clip=1.0, h0=P.h0
    )
    ref.run(P.x, P.y, mask=P.mask, reset=P.reset)
    eng = tbptt.ARTBP(P.model, opt, c=c, b=2, rng=4, clip=1.0, h0=P.h0)
    for lo, hi in ((0, 5), (5, 6), (6, 17)):
        eng.feed(P.x[lo:hi], P.y[lo:hi], mask=P.mask[lo:hi], reset=P.reset[lo:hi])
    eng.finish()
    assert_close(eng.model.params, ref.params, rtol=1e-10)


@pytest.mark.parametrize("opt", [SGD(lr=0.1), Adam(lr=0.01)])
def test_online_artbp_special_cases(opt):
    """Online: c = 1, b = 1 is online TBPTT(1, 1) update by update (the same losses too); c = 0
    makes one update at finish(), the exact gradient."""
    P = Problem(T=13, batch=2, mask=True, reset=True, seed=16)
    a = tbptt.ARTBP(P.model, opt, c=1, rng=0)
    ref = OnlineTBPTT(P.model, Truncation(1, 1), opt)
    for lo, hi in ((0, 4), (4, 13)):
        args = (P.x[lo:hi], P.y[lo:hi])
        kw = {"mask": P.mask[lo:hi], "reset": P.reset[lo:hi]}
        assert abs(a.feed(*args, **kw) - ref.feed(*args, **kw)) < 1e-12
        assert a.updates == ref.updates
        assert_close(a.model.params, ref.params)
    once = tbptt.ARTBP(P.model, SGD(lr=0.1), c=0, rng=0)
    once.feed(P.x, P.y, mask=P.mask, reset=P.reset)
    assert once.updates == 0
    once.finish()
    g = tbptt.gradients(P.model, P.x, P.y, mask=P.mask, reset=P.reset)
    assert once.updates == 1
    assert_close(once.model.params, {k: v - 0.1 * g[k] for k, v in P.model.params.items()})


def test_online_artbp_draws_the_frozen_cuts_and_any_chunking_agrees():
    """The online trainer draws the same cuts as artbp_gradients with the same seed (c = 0.3:
    with a tiny learning rate the updates sum to the frozen estimate), whatever the chunks."""
    P = Problem(T=20, batch=2, reset=True, seed=17)
    results = []
    for chunks in ([20], [1] * 20, [7, 6, 7]):
        eng = tbptt.ARTBP(P.model, SGD(lr=1e-9), c=0.3, rng=2)
        t = 0
        for n in chunks:
            eng.feed(P.x[t : t + n], P.y[t : t + n], reset=P.reset[t : t + n])
            t += n
        eng.finish()
        results.append(eng.model.params)
    for other in results[1:]:
        assert_close(other, results[0], rtol=1e-14)
    frozen = tbptt.artbp_gradients(P.model, P.x, P.y, c=0.3, rng=2, reset=P.reset)
    moved = {k: (P.model.params[k] - v) / 1e-9 for k, v in results[0].items()}
    assert_close(moved, frozen, rtol=1e-5)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"c": 1.5}, r"c must be a probability in \[0, 1\], got 1.5"),
        ({"c": -0.1}, "c must be a probability"),
        ({"c": "0.1"}, "c must be a probability"),
        ({"c": lambda L: 2.0}, r"c\(1\) returned 2.0"),
        ({"c": 0.1, "b": 0}, "b must be an integer >= 1"),
        ({"c": 0.1, "b": 3, "biased_max_length": 2}, "biased_max_length must be at least b = 3"),
        ({"c": 0.1, "rng": "x"}, "rng must be a seed"),
    ],
)
def test_artbp_bad_input(kw, match):
    """c outside [0, 1], a callable returning a non-probability, a bad b, rng or maximum length:
    a one-line InputError before anything is computed or trained."""
    P = Problem(T=5, batch=2, seed=1)
    with pytest.raises(InputError, match=match) as err:
        tbptt.artbp_gradients(P.model, P.x, P.y, **{"rng": 0, **kw})
    assert "\n" not in str(err.value)
    before = P.model
    with pytest.raises(InputError, match=match):
        tbptt.ARTBP(before, SGD(), **{"rng": 0, **kw})
    assert_close(before.params, P.model.params, rtol=0)


@pytest.mark.parametrize("c", [1.0, lambda L: min(1.0, L / 4)], ids=["one", "reaching-one"])
def test_a_cut_probability_reaching_one_is_warned_once(c) -> None:
    """SEMANTICS.md 8: c_L = 1 forces a cut, a truncation; the estimate is then biased, and the
    engine says so (once), while c < 1 says nothing."""
    model = tbptt.ElmanRNN.init(n=3, m=2, p=2, seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 2, 2)), rng.normal(size=(20, 2, 2))
    with pytest.warns(UserWarning, match="biased") as record:
        tbptt.artbp_gradients(model, x, y, c=c, rng=0)
    assert len([w for w in record if "reached 1" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tbptt.artbp_gradients(model, x, y, c=0.5, rng=0)
