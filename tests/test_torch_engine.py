"""The torch driver against the numpy engine: the seed's model trained online, float64 (issue 3,
item 7).

Both engines get the same ElmanRNN values, data, chunks, schedule and optimizer (tbptt.SGD/Adam and
their torch.optim twins); after training they must hold the same parameters to 1e-10, and report
the same mean losses per chunk.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from reference import OnlineTBPTT

import tbptt
from tbptt.torch import TBPTT, ElmanRNN, cross_entropy_loss, l2_loss

TOL = 1e-10


def train_both(
    trunc: tbptt.Truncation,
    *,
    opt: str = "sgd",
    clip: float | None = None,
    loss: str = "l2",
    resets: bool = False,
    masks: bool = False,
    chunks: tuple[int, ...] = (5, 3, 7, 8),
    batch: int = 3,
    f: str = "tanh",
    bias: bool = True,
    seed: int = 0,
    batch_first: bool = False,
    reduction: str = "sum",
) -> tuple[tbptt.TBPTT, TBPTT, list[tuple[float, float]]]:
    """Feed the same chunks to both engines; return them and the (numpy, torch) chunk losses."""
    rng = np.random.default_rng(seed)
    m, n, p, T = 2, 4, 3, sum(chunks)
    g = "softmax" if loss == "cross_entropy" else "tanh"
    model = tbptt.ElmanRNN.init(n=n, m=m, p=p, f=f, g=g, bias=bias, seed=seed + 1)
    x = rng.normal(size=(T, batch, m))
    y = (
        rng.integers(0, p, (T, batch))
        if loss == "cross_entropy"
        else rng.normal(size=(T, batch, p))
    )
    reset = rng.random((T, batch)) < 0.15 if resets else None
    mask = (rng.random((T, batch)) < 0.7) * rng.uniform(0.3, 1, (T, batch)) if masks else None
    if opt == "sgd":
        np_opt = tbptt.SGD(lr=0.1, momentum=0.5)
    else:
        np_opt = tbptt.Adam(lr=0.02)
    engine = tbptt.TBPTT(model.copy(), trunc, np_opt, loss=loss, clip=clip, reduction=reduction)
    module = ElmanRNN.from_numpy(model, batch_first=batch_first)
    if opt == "sgd":
        t_opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.5)
    else:
        t_opt = torch.optim.Adam(module.parameters(), lr=0.02)
    loss_fn = cross_entropy_loss if loss == "cross_entropy" else l2_loss
    driver = TBPTT(
        module,
        trunc,
        t_opt,
        loss_fn=loss_fn,
        clip=clip,
        batch_first=batch_first,
        reduction=reduction,
    )
    losses, a = [], 0
    for L in chunks:
        sl = slice(a, a + L)
        a += L
        cut = lambda v: None if v is None else v[sl]  # noqa: E731, B023
        l_np = engine.feed(x[sl], y[sl], mask=cut(mask), reset=cut(reset))
        tx = lambda v: None if v is None else torch.tensor(v)  # noqa: E731
        args = [tx(x[sl]), tx(y[sl]), tx(cut(mask)), tx(cut(reset))]
        if batch_first:
            args = [None if v is None else v.transpose(0, 1) for v in args]
        l_t = driver.feed(*args)
        losses.append((l_np, l_t))
    engine.finish()
    driver.finish()
    return engine, driver, losses


def max_diff(engine: tbptt.TBPTT, driver: TBPTT) -> float:
    return max(
        float(np.abs(v - getattr(driver.model, k).detach().numpy()).max())
        for k, v in engine.model.params.items()
    )


CASES = [
    # (k1, k2, inject, flush): k1 = k2; k2 > k1 not a multiple; every inject; k2 < k1; k1 = 1
    (3, 3, "new", False),
    (3, 3, "new", True),
    (2, 5, "new", False),
    (3, 5, "new", True),
    (2, 5, "window", True),
    (2, 5, "last", False),
    (4, 2, "window", True),
    (5, 2, "last", True),
    (1, 3, "new", False),
    (23, 23, "new", False),
]


@pytest.mark.parametrize("k1, k2, inject, flush", CASES)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_same_parameters_as_numpy_engine(
    k1: int, k2: int, inject: str, flush: bool, opt: str
) -> None:
    """After online training, torch and numpy engines hold the same parameters and chunk losses."""
    trunc = tbptt.Truncation(k1, k2, inject, flush)
    engine, driver, losses = train_both(trunc, opt=opt)
    assert driver.updates == engine.updates == len(trunc.update_times(23))
    assert max_diff(engine, driver) < TOL
    for l_np, l_t in losses:
        assert abs(l_np - l_t) < TOL


@pytest.mark.parametrize(
    "k1, k2, inject", [(3, 3, "new"), (2, 5, "new"), (2, 7, "window"), (3, 5, "last")]
)
def test_same_parameters_with_resets_masks_and_clipping(k1: int, k2: int, inject: str) -> None:
    """Resets, masks and gradient-norm clipping give the numpy engine's parameters too."""
    trunc = tbptt.Truncation(k1, k2, inject, flush=True)
    engine, driver, losses = train_both(trunc, opt="adam", clip=0.3, resets=True, masks=True)
    assert max_diff(engine, driver) < TOL
    assert all(abs(a - b) < TOL for a, b in losses)


def test_same_parameters_cross_entropy() -> None:
    """Softmax cross-entropy with integer targets (the module returns logits for g=softmax)."""
    trunc = tbptt.Truncation(3, 7, "window", flush=True)
    engine, driver, losses = train_both(
        trunc, opt="adam", clip=0.5, loss="cross_entropy", resets=True
    )
    assert max_diff(engine, driver) < TOL
    assert all(abs(a - b) < TOL for a, b in losses)


def test_same_parameters_batch_first_without_biases() -> None:
    """batch_first chunks and a model without biases (the seed's) change nothing."""
    trunc = tbptt.Truncation(2, 5, "new", flush=True)
    engine, driver, _ = train_both(trunc, batch_first=True, bias=False, f="sigmoid", resets=True)
    assert max_diff(engine, driver) < TOL


@settings(max_examples=20, deadline=None)
@given(
    k1=hs.integers(1, 5),
    extra=hs.integers(-3, 6),
    inject=hs.sampled_from(["new", "window", "last"]),
    flush=hs.booleans(),
    chunks=hs.lists(hs.integers(1, 7), min_size=1, max_size=5),
)
def test_random_schedules_and_chunks(
    k1: int, extra: int, inject: str, flush: bool, chunks: list
) -> None:
    """Random schedules and chunk lengths: the engines agree (chunk ends are free)."""
    k2 = max(1, k1 + extra)
    if inject == "new" and k2 < k1:
        k2 = k1
    trunc = tbptt.Truncation(k1, k2, inject, flush)
    engine, driver, _ = train_both(trunc, chunks=tuple(chunks), batch=2, resets=True)
    assert driver.updates == engine.updates
    assert max_diff(engine, driver) < TOL


def test_elman_forward_matches_numpy() -> None:
    """ElmanRNN's forward pass is (1.1)-(1.4) as the numpy engine computes it, and converts back."""
    rng = np.random.default_rng(3)
    model = tbptt.ElmanRNN.init(n=5, m=2, p=3, f="relu", g="sigmoid", seed=2)
    module = ElmanRNN.from_numpy(model)
    x, y = rng.normal(size=(6, 4, 2)), rng.normal(size=(6, 4, 3))
    yhat, h = module(torch.tensor(x))
    z = tbptt.numpy.elman.forward(model, x, np.zeros((4, 5))).z
    assert np.abs(yhat.detach().numpy() - 1 / (1 + np.exp(-z))).max() < 1e-14
    back = module.to_numpy()
    assert all(np.array_equal(back.params[k], v) for k, v in model.params.items())
    grads = tbptt.gradients(model, x, y)  # exact BPTT of the numpy engine
    l2_loss(yhat, torch.tensor(y)).sum().backward()
    for k in ("A", "B", "C", "b", "c"):
        assert np.abs(getattr(module, k).grad.numpy() - grads[k]).max() < TOL


@pytest.mark.parametrize("inject", tbptt.INJECT_MODES)
@pytest.mark.parametrize(("k1", "k2"), [(3, 3), (2, 5), (4, 3)])
def test_mean_reduction_matches_the_numpy_engine(inject: str, k1: int, k2: int) -> None:
    """reduction="mean" in both engines: the same parameters (7.6), masks with fractional weights,
    resets and the flush window's short chunk included."""
    if inject == "new" and k2 < k1:
        return
    trunc = tbptt.Truncation(k1, k2, inject, flush=True)
    engine, driver, losses = train_both(
        trunc, opt="sgd", clip=1.0, resets=True, masks=True, reduction="mean"
    )
    assert max_diff(engine, driver) < TOL
    assert all(abs(a - b) < TOL for a, b in losses)


def test_predict_is_the_numpy_forward_with_resets() -> None:
    """predict() runs the module forward only, restarting where reset says, as tbptt.elman's
    forward pass computes it; it leaves the stream being trained untouched."""
    from tbptt.numpy.elman import forward

    rng = np.random.default_rng(3)
    model = tbptt.ElmanRNN.init(n=4, m=2, p=3, g="tanh", seed=3)
    x = rng.normal(size=(9, 3, 2))
    reset = rng.random((9, 3)) < 0.3
    h0 = rng.normal(size=(3, 4))
    want = forward(model, x, h0, reset, np.zeros((3, 4)))
    module = ElmanRNN.from_numpy(model)
    driver = TBPTT(module, tbptt.Truncation(2, 2), torch.optim.SGD(module.parameters(), lr=0.1))
    out, h = driver.predict(torch.tensor(x), torch.tensor(h0), torch.tensor(reset))
    np.testing.assert_allclose(out.numpy(), np.tanh(want.z), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h.numpy(), want.h[-1], rtol=1e-12, atol=1e-14)
    assert driver.t == 0 and driver.updates == 0 and driver.state is None


def test_grad_scaler_skipped_steps_are_counted_and_change_nothing() -> None:
    """float16 loss scaling: an update whose scaled gradient overflows is skipped by the
    GradScaler (its documented behaviour), counted in driver.skipped, and leaves the parameters."""
    module = ElmanRNN(n=4, m=2, p=2, seed=0)
    before = [p.detach().clone() for p in module.parameters()]
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    driver = TBPTT(module, tbptt.Truncation(3, 3), opt, amp=torch.float16)
    driver.scaler = torch.amp.GradScaler("cpu", init_scale=3e38)  # every scaled gradient overflows
    x, y = torch.randn(6, 2, 2), torch.randn(6, 2, 2)
    driver.feed(x, y)
    assert driver.updates == 2 and driver.skipped == 2
    for a, b in zip(before, module.parameters(), strict=True):
        assert torch.equal(a, b.detach())


# -- friction for library users (issue 13) ------------------------------------------------------
@pytest.mark.parametrize("loss", ["l2", "cross_entropy"])
def test_one_stream_may_leave_out_the_batch_axis(loss: str) -> None:
    """x (L, m) with y (L, p) or (L,), mask (L,) and reset (L,) is one stream, as in the numpy
    engine: the same chunk losses and parameters as the (L, 1, ...) chunks, bit for bit."""
    rng = np.random.default_rng(8)
    T, m, p = 12, 3, 2
    x = torch.tensor(rng.normal(size=(T, m)))
    y = torch.tensor(rng.integers(0, p, T) if loss == "cross_entropy" else rng.normal(size=(T, p)))
    mask = torch.tensor(rng.uniform(0.5, 1.0, T))
    reset = torch.tensor(rng.random(T) < 0.2)
    g, loss_fn = ("softmax", cross_entropy_loss) if loss == "cross_entropy" else ("tanh", l2_loss)
    runs = []
    for batched in (False, True):
        module = ElmanRNN(n=4, m=m, p=p, g=g, dtype=torch.float64, seed=3)
        opt = torch.optim.Adam(module.parameters(), lr=0.05)
        driver = TBPTT(module, tbptt.Truncation(2, 5), opt, loss_fn=loss_fn)
        one = (lambda a: a[:, None]) if batched else (lambda a: a)  # noqa: E731
        losses = [
            driver.feed(one(x[a:b]), one(y[a:b]), one(mask[a:b]), one(reset[a:b]))
            for a, b in ((0, 3), (3, 7), (7, 12))
        ]
        runs.append((losses, [q.detach().clone() for q in module.parameters()]))
    (losses, params), (want_losses, want_params) = runs
    assert losses == want_losses and driver.updates == 6
    assert all(torch.equal(a, b) for a, b in zip(params, want_params, strict=True))


def test_feed_returns_the_weighted_mean_loss() -> None:
    """feed() returns sum(w l) / sum(w) over the chunk for fractional mask weights, also when they
    sum to less than 1, each loss with the parameters in force at its step (the autograd twin of
    tests/reference.py computes it step by step)."""
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(9, 2, 2)), rng.normal(size=(9, 2, 3))
    w = rng.uniform(0, 0.05, (9, 2))  # every chunk's weights sum below 1
    model = tbptt.ElmanRNN.init(n=4, m=2, p=3, seed=4)
    module = ElmanRNN.from_numpy(model)
    trunc = tbptt.Truncation(3, 4)
    twin = OnlineTBPTT(model, trunc, tbptt.SGD(lr=0.1))
    driver = TBPTT(module, trunc, torch.optim.SGD(module.parameters(), lr=0.1))
    t = torch.tensor
    for a, b in [(0, 2), (2, 7), (7, 9)]:
        want = twin.feed(x[a:b], y[a:b], mask=w[a:b])
        got = driver.feed(t(x[a:b]), t(y[a:b]), t(w[a:b]))
        assert w[a:b].sum() < 1 and abs(got - want) <= 1e-12 * want
