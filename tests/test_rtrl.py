"""RTRL (SEMANTICS.md 8): frozen equals exact BPTT; online against a direct per-step reference."""

from __future__ import annotations

import numpy as np
import pytest
from reference import Problem, assert_close, exact_gradient
from reference_unbiased import OnlineDirect, rtrl_direct

import tbptt
from tbptt import SGD, Adam, InputError

ACTS = ["tanh", "sigmoid", "relu", "identity"]
OUTS = ["identity", "tanh", "sigmoid", "relu", "softmax"]


def exact(P):
    _, g = exact_gradient(P.model, P.x, P.y, **P.kw)
    g.pop("h0")
    return g


@pytest.mark.parametrize("f", ACTS)
@pytest.mark.parametrize("g", OUTS)
def test_rtrl_equals_exact_bptt_every_f_and_g(f, g):
    """Frozen RTRL equals autograd's exact gradient to 1e-10, batched, with resets and masks."""
    P = Problem(T=9, batch=3, f=f, g=g, h0=True, mask=True, reset=True, seed=1)
    assert_close(tbptt.rtrl_gradients(P.model, P.x, P.y, **P.kw), exact(P), rtol=1e-10)


@pytest.mark.parametrize(
    "kind", ["single", "no-bias", "cross-entropy", "ce-single", "long-resets", "float32"]
)
def test_rtrl_variants(kind):
    """One stream, no biases, cross-entropy, many resets: equal to tbptt.gradients; float32 within
    its rounding."""
    opts = {
        "single": {},
        "no-bias": {"batch": 2, "bias": False},
        "cross-entropy": {"batch": 2, "p": 3, "loss": "cross_entropy", "mask": True},
        "ce-single": {"p": 3, "loss": "cross_entropy", "reset": True},
        "long-resets": {"T": 40, "batch": 4, "reset": True, "h0": True},
        "float32": {"batch": 2},
    }[kind]
    P = Problem(**{"T": 11, "seed": 2, **opts})
    want = tbptt.gradients(P.model, P.x, P.y, **P.kw)
    want.pop("h0")
    if kind == "float32":
        m32 = tbptt.ElmanRNN(**{k: v.astype(np.float32) for k, v in P.model.params.items()})
        got = tbptt.rtrl_gradients(m32, P.x, P.y)
        assert all(v.dtype == np.float32 for v in got.values())
        assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert_close(tbptt.rtrl_gradients(P.model, P.x, P.y, **P.kw), want, rtol=1e-10)


def test_rtrl_equals_dense_reference():
    """The structured influence (one product per step) equals a dense J per stream built entry by
    entry."""
    P = Problem(T=8, batch=2, n=4, m=3, h0=True, reset=True, seed=3)
    assert_close(
        tbptt.rtrl_gradients(P.model, P.x, P.y, **P.kw), rtrl_direct(P.model, P.x, P.y, **P.kw)
    )


@pytest.mark.parametrize("k1", [1, 3])
@pytest.mark.parametrize("opt", [SGD(lr=0.1, momentum=0.5), Adam(lr=0.01)])
def test_online_rtrl_against_direct_reference(k1, opt):
    """Online RTRL (J carried across updates, an update every k1 steps) equals the per-step
    reference with torch.optim, chunk by chunk, with clipping, resets and masks."""
    P = Problem(T=13, batch=2, h0=True, mask=True, reset=True, seed=4)
    ref = OnlineDirect("rtrl", P.model, opt, k1=k1, clip=0.5, h0=P.h0)
    ref.run(P.x, P.y, mask=P.mask, reset=P.reset)
    eng = tbptt.RTRL(P.model, opt, k1=k1, clip=0.5, h0=P.h0)
    for lo, hi in ((0, 4), (4, 5), (5, 13)):
        eng.feed(P.x[lo:hi], P.y[lo:hi], mask=P.mask[lo:hi], reset=P.reset[lo:hi])
    eng.finish()
    assert eng.updates == -(-13 // k1)
    assert_close(eng.model.params, ref.params, rtol=1e-9)


def test_online_rtrl_one_update_is_exact_bptt():
    """k1 beyond the stream: finish() applies one update, the exact BPTT gradient."""
    P = Problem(T=10, batch=2, reset=True, seed=5)
    eng = tbptt.RTRL(P.model, SGD(lr=0.1), k1=50)
    eng.feed(P.x[:6], P.y[:6], reset=P.reset[:6])
    eng.feed(P.x[6:], P.y[6:], reset=P.reset[6:])
    eng.finish()
    g = tbptt.gradients(P.model, P.x, P.y, reset=P.reset)
    assert_close(eng.model.params, {k: v - 0.1 * g[k] for k, v in P.model.params.items()})


def test_rtrl_too_large_is_refused_with_its_size():
    """A model whose influence matrix exceeds max_bytes: a one-line InputError with the size,
    before anything is computed or trained."""
    model = tbptt.ElmanRNN.init(n=64, m=8, p=2)
    x, y = np.zeros((5, 4, 8)), np.zeros((5, 4, 2))
    with pytest.raises(InputError, match=r"4 x 64 x 4,672 = 1,196,032 entries") as err:
        tbptt.rtrl_gradients(model, x, y, max_bytes=2**20)
    assert "\n" not in str(err.value)
    before = {k: v.copy() for k, v in model.params.items()}
    trainer = tbptt.RTRL(model, SGD(lr=0.1), max_bytes=2**24)  # one stream fits, four do not
    with pytest.raises(InputError, match="max_bytes"):
        trainer.feed(x, y)
    assert trainer.t == 0 and trainer.updates == 0
    for k, v in before.items():
        assert np.array_equal(model.params[k], v)
    with pytest.raises(InputError, match="entries"):
        tbptt.RTRL(model, SGD(lr=0.1), max_bytes=1000)
