"""UORO (SEMANTICS.md 8): the estimate against a direct reference, unbiasedness, online training."""

from __future__ import annotations

import numpy as np
import pytest
from reference import Problem, assert_close
from reference_unbiased import OnlineDirect, uoro_direct
from unbiased_checks import check_unbiased

import tbptt
from tbptt import SGD, Adam, InputError
from tbptt.analysis.estimators import flatten


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"h0": True, "mask": True, "reset": True},
        {"p": 3, "loss": "cross_entropy", "mask": True},
        {"f": "relu", "g": "sigmoid", "bias": False},
        {"f": "sigmoid", "g": "softmax", "T": 40},
        {"f": "identity", "g": "tanh", "reset": True, "T": 40},
        {"T": 400, "batch": 2, "scale": 0.5},  # kappa falls below 1e-100 and is folded
    ],
)
def test_uoro_equals_direct_reference(opts):
    """The kappa-scaled theta~ and the summed products (8.10) give the contract's estimate
    (explicit s~, theta~ per stream and step, the same signs) to rounding."""
    P = Problem(**{"T": 12, "batch": 3, "seed": 6, **opts})
    got = tbptt.uoro_gradients(P.model, P.x, P.y, rng=5, **P.kw)
    want = uoro_direct(P.model, P.x, P.y, np.random.default_rng(5), **P.kw)
    assert_close(got, want, rtol=1e-9)


def test_uoro_kappa_folds_keep_the_estimate():
    """A long stream where kappa leaves its range (float32: 1e15) and is folded into Theta: the same
    estimate as the float64 computation, within float32's rounding."""
    P = Problem(T=120, batch=2, seed=7, scale=1.5)
    m32 = tbptt.ElmanRNN(**{k: v.astype(np.float32) for k, v in P.model.params.items()})
    got = tbptt.uoro_gradients(m32, P.x, P.y, rng=3)  # kappa reaches 1e-15 near step 110
    want = tbptt.uoro_gradients(P.model, P.x, P.y, rng=3)
    assert all(v.dtype == np.float32 for v in got.values())
    assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_uoro_is_unbiased_with_error_falling_like_one_over_sqrt_n():
    """The mean of N UORO estimates approaches exact BPTT, its squared error V / N
    (tests/statistics.py: false-alarm rate about 1e-3, fixed seed)."""
    P = Problem(T=8, batch=2, h0=True, reset=True, seed=11)
    exact = flatten(tbptt.gradients(P.model, P.x, P.y, **P.kw))
    rng = np.random.default_rng(0)
    check_unbiased(lambda: flatten(tbptt.uoro_gradients(P.model, P.x, P.y, rng=rng, **P.kw)), exact)


@pytest.mark.parametrize("k1", [1, 4])
@pytest.mark.parametrize("opt", [SGD(lr=0.05, nesterov=True, momentum=0.5), Adam(lr=0.01)])
def test_online_uoro_against_direct_reference(k1, opt):
    """Online UORO (s~, theta~ carried across updates, an update every k1 steps) equals the
    per-step reference with torch.optim and the same signs, in chunks, with clipping."""
    P = Problem(T=14, batch=2, mask=True, reset=True, seed=8)
    ref = OnlineDirect("uoro", P.model, opt, k1=k1, rng=np.random.default_rng(9), clip=1.0)
    ref.run(P.x, P.y, mask=P.mask, reset=P.reset)
    eng = tbptt.UORO(P.model, opt, k1=k1, rng=9, clip=1.0)
    for lo, hi in ((0, 3), (3, 9), (9, 14)):
        eng.feed(P.x[lo:hi], P.y[lo:hi], mask=P.mask[lo:hi], reset=P.reset[lo:hi])
    eng.finish()
    assert_close(eng.model.params, ref.params, rtol=1e-8)


def test_online_uoro_chunking_does_not_matter():
    """The signs are drawn per step, so any chunking of a stream trains to the same parameters."""
    P = Problem(T=20, batch=2, mask=True, reset=True, seed=10)
    results = []
    for chunks in ([20], [1] * 20, [7, 6, 7]):
        eng = tbptt.UORO(P.model, Adam(lr=0.01), k1=3, rng=1)
        t = 0
        for c in chunks:
            eng.feed(
                P.x[t : t + c], P.y[t : t + c], mask=P.mask[t : t + c], reset=P.reset[t : t + c]
            )
            t += c
        eng.finish()
        results.append(eng.model.params)
    for other in results[1:]:
        assert_close(other, results[0], rtol=1e-12)


def test_uoro_bad_input():
    """rng and eps are checked: a one-line InputError, nothing built."""
    P = Problem(T=3, seed=1)
    for bad in (-1, 1.5, "seed", True):
        with pytest.raises(InputError, match="rng"):
            tbptt.uoro_gradients(P.model, P.x, P.y, rng=bad)
    with pytest.raises(InputError, match="eps"):
        tbptt.UORO(P.model, SGD(), eps=0)
    with pytest.raises(InputError, match="k1"):
        tbptt.UORO(P.model, SGD(), k1=0)
