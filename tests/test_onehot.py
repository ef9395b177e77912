"""Integer inputs (tbptt.OneHot): the lookup and the scatter-add against the one-hot products.

Every engine must give what it gives for the dense one-hot x (SEMANTICS.md 1, 2): the forward
pass exactly, the gradients to rounding (1e-12 relative in float64). Each case runs on both paths
of the numpy engine (the numpy loops and scatter, and the compiled ones when numba is there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import exact_gradient, rel_err

import tbptt
from tbptt.numpy import fast
from tbptt.torch import TBPTT as TorchTBPTT
from tbptt.torch import ElmanRNN as TorchElman
from tbptt.torch import cross_entropy_loss

PATHS = ["numpy", "numba"]


def use(path: str, monkeypatch) -> None:
    if path == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv(fast.ENV, "1" if path == "numba" else "0")


def problem(T=30, batch=3, m=5, n=4, p=3, f="tanh", seed=0):
    rng = np.random.default_rng(seed)
    model = tbptt.ElmanRNN.init(n=n, m=m, p=p, f=f, g="softmax", seed=seed + 1)
    model = model.replace(b=rng.normal(0, 0.3, n), c=rng.normal(0, 0.3, p))
    lead = (T,) if batch is None else (T, batch)
    ids = rng.integers(0, m, lead)
    ids[0] = m - 1  # the last column is used
    y = rng.integers(0, p, lead)
    mask = (rng.random(lead) < 0.8).astype(float)
    reset = rng.random(lead) < 0.1
    return model, tbptt.OneHot(ids, m), y, mask, reset


def assert_same(got: dict, want: dict, tol: float = 1e-12) -> None:
    assert set(got) == set(want)
    for k in want:
        assert np.shape(got[k]) == np.shape(want[k])
        assert rel_err(got[k], want[k]) < tol, (k, rel_err(got[k], want[k]))


def test_onehot_checks_its_arguments():
    """Non-integer ids, ids out of range, a bad m or shape, or the wrong m for the model:
    InputError."""
    for ids, m in (
        ([0.0, 1.0], 3),
        ([True, False], 3),
        ([0, 3], 3),
        ([-1, 0], 3),
        ([0], 0),
        (np.zeros((2, 2, 2), int), 3),
    ):
        with pytest.raises(tbptt.InputError):
            tbptt.OneHot(ids, m)
    model = tbptt.ElmanRNN.init(n=3, m=4, p=2)
    with pytest.raises(tbptt.InputError, match="m=3"):
        tbptt.gradients(model, tbptt.OneHot([0, 1], 3), np.zeros((2, 2)))


def test_onehot_dense_and_slicing():
    """dense() is the one-hot array; slicing slices the steps."""
    x = tbptt.OneHot([[0, 2], [1, 1], [2, 0]], 3)
    np.testing.assert_array_equal(x.dense()[1], [[0, 1, 0], [0, 1, 0]])
    assert x.shape == (3, 2, 3) and len(x) == 3
    np.testing.assert_array_equal(x[1:].dense(), x.dense()[1:])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batch", [None, 1, 3])
@pytest.mark.parametrize("f", ["tanh", "relu"])
def test_gradients_equal_the_onehot_products(monkeypatch, path, batch, f):
    """Exact BPTT and a frozen truncation with ids equal those with one-hot x; and autograd."""
    use(path, monkeypatch)
    model, x, y, mask, reset = problem(batch=batch, f=f)
    kw = {"loss": "cross_entropy", "mask": mask, "reset": reset}
    for tr in (None, tbptt.Truncation(4, 9, flush=True)):
        got = tbptt.gradients(model, x, y, truncation=tr, **kw)
        want = tbptt.gradients(model, x.dense(), y, truncation=tr, **kw)
        assert_same(got, want)
    assert tbptt.total_loss(model, x, y, **kw) == tbptt.total_loss(model, x.dense(), y, **kw)
    _, auto = exact_gradient(model, x.dense(), y, **kw)
    got = tbptt.gradients(model, x, y, **kw)
    for k in ("A", "B", "C", "b", "c"):
        assert rel_err(got[k], auto[k]) < 1e-10, k


def train(model, x, y, reset, chunks, save_at=None, tmp_path=None):
    model = model.copy()  # tbptt.TBPTT trains the model it is given: each run from the same values
    d = tbptt.TBPTT(
        model,
        tbptt.Truncation(3, 8, flush=True),
        tbptt.Adam(lr=0.05),
        clip=1.0,
        loss="cross_entropy",
    )
    i = 0
    for j, L in enumerate(chunks):
        if j == save_at:
            d.save(tmp_path / "s.npz")
            d = tbptt.TBPTT(model, d.truncation, d.optimizer, clip=1.0, loss="cross_entropy")
            d.load(tmp_path / "s.npz")
        d.feed(x[i : i + L], y[i : i + L], reset=reset[i : i + L])
        i += L
    d.finish()
    return {**d.model.params, "h": d.h}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batch", [None, 3])
def test_online_training_equals_onehot_products(monkeypatch, path, batch, tmp_path):
    """Online TBPTT (ragged chunks, resets, flush, Adam, clipping) and save/load mid-stream."""
    use(path, monkeypatch)
    model, x, y, _, reset = problem(T=40, batch=batch, seed=2)
    chunks = (1, 6, 2, 9, 5, 7, 10)
    want = train(model, x.dense(), y, reset, chunks)
    assert_same(train(model, x, y, reset, chunks), want)
    assert_same(train(model, x, y, reset, chunks, save_at=3, tmp_path=tmp_path), want)


def test_online_refuses_to_switch_kinds_while_steps_are_kept():
    """A dense chunk after OneHot ones (with kept steps) is an InputError, not a silent mix."""
    model, x, y, _, _ = problem(T=10, batch=2)
    d = tbptt.TBPTT(model, tbptt.Truncation(4, 8), tbptt.SGD(lr=0.1), loss="cross_entropy")
    d.feed(x[:5], y[:5])
    with pytest.raises(tbptt.InputError, match="OneHot"):
        d.feed(x[5:].dense(), y[5:])


@pytest.mark.parametrize("f", ["tanh", "sigmoid"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_ids_equal_the_onehot_product(f, batch_first):
    """tbptt.torch.ElmanRNN on ids: the same outputs and autograd gradients as on one-hot x."""
    model, x, _, _, _ = problem(f=f)
    net = TorchElman.from_numpy(model, batch_first=batch_first)
    ids = torch.as_tensor(x.ids)
    dense = torch.as_tensor(x.dense())
    if batch_first:
        ids, dense = ids.T, dense.transpose(0, 1)
    h0 = torch.randn(3, 4, dtype=torch.float64)
    res = []
    for inp in (ids, dense, tbptt.OneHot(ids.numpy(), 5)):
        out, h = net(inp, h0)
        L = (out**2).sum() + h.sum()
        res.append([out, *torch.autograd.grad(L, list(net.parameters()))])
    for got in res[1:]:
        for a, b in zip(got, res[0], strict=True):
            assert rel_err(a.detach().numpy(), b.detach().numpy()) < 1e-12


@pytest.mark.parametrize("k2", [4, 10])
def test_torch_driver_with_ids_equals_numpy_engine(k2):
    """The torch driver fed OneHot chunks (k2 > k1: parameter copies; resets) trains like numpy."""
    model, x, y, _, reset = problem(T=30, batch=3, seed=3)
    trunc = tbptt.Truncation(4, k2)
    ref = tbptt.TBPTT(model, trunc, tbptt.SGD(lr=0.1, momentum=0.5), loss="cross_entropy")
    net = TorchElman.from_numpy(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)
    drv = TorchTBPTT(net, trunc, opt, loss_fn=cross_entropy_loss)
    for i in range(0, 30, 7):
        ref.feed(x[i : i + 7], y[i : i + 7], reset=reset[i : i + 7])
        drv.feed(
            x[i : i + 7], torch.as_tensor(y[i : i + 7]), reset=torch.as_tensor(reset[i : i + 7])
        )
    got = net.to_numpy().params
    assert_same(got, ref.model.params, tol=1e-10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["rtrl", "uoro", "artbp"])
def test_unbiased_methods_take_onehot_inputs(monkeypatch, path, method, tmp_path):
    """RTRL, UORO and ARTBP with ids give what they give with the one-hot rows: frozen estimates
    and online training (ragged chunks, resets, save/load mid-stream), the same draws."""
    use(path, monkeypatch)
    model, x, y, mask, reset = problem(T=30, batch=3, seed=4)
    kw = {"loss": "cross_entropy", "mask": mask, "reset": reset}
    draws = {"rtrl": {}, "uoro": {"rng": 5}, "artbp": {"c": 0.3, "rng": 5}}[method]
    frozen = getattr(tbptt, f"{method}_gradients")
    assert_same(frozen(model, x, y, **kw, **draws), frozen(model, x.dense(), y, **kw, **draws))
    options = {"rtrl": {"k1": 3}, "uoro": {"k1": 3, "rng": 5}, "artbp": {"c": 0.3, "rng": 5}}

    def online(xs, save_at=None):
        make = tbptt.methods.make_trainer
        args = (method, model.copy(), tbptt.Adam(lr=0.05))
        d = make(*args, loss="cross_entropy", clip=1.0, **options[method])
        i = 0
        for j, L in enumerate((1, 6, 2, 9, 5, 7)):
            if j == save_at:
                d.save(tmp_path / f"{method}.npz")
                d = make(*args, loss="cross_entropy", clip=1.0, **options[method])
                d.load(tmp_path / f"{method}.npz")
            d.feed(xs[i : i + L], y[i : i + L], reset=reset[i : i + L])
            i += L
        d.finish()
        return d.model.params

    want = online(x.dense())
    assert_same(online(x), want)
    assert_same(online(x, save_at=3), want)
