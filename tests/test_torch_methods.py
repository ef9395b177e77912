"""ARTBP, UORO and RTRL in the torch engine (SEMANTICS.md 8) against independent references,
float64.

- the numpy engine (tbptt.ARTBP, UORO, RTRL) on the seed's model: the same parameters after online
  training to 1e-10, given the same draws. Both engines draw from a numpy Generator in the same
  order (draws.py): ARTBP one uniform number per possible boundary, UORO one per sign, step by
  step and stream by stream; so the same seed gives the same cuts and the same signs nu_t;
- autograd through a plain step-by-step loop (exact BPTT): ARTBP with c = 0 on a whole stream and
  RTRL frozen, on nn.LSTM and nn.GRU;
- exact BPTT again for UORO's and ARTBP's mean over many draws on an nn.LSTM (statistical).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from unbiased_checks import z_threshold

import tbptt
from tbptt.torch import ARTBP, ElmanRNN, Recurrent, cross_entropy_loss, l2_loss
from tbptt.torch.methods import Summed, frozen_gradients

DT = torch.float64
TOL = 1e-10
CHUNKS = (5, 3, 7, 1, 8)


def train_both(
    method: str,
    options: dict,
    *,
    opt: str = "sgd",
    loss: str = "l2",
    clip: float | None = None,
    resets: bool = False,
    masks: bool = False,
    reduction: str = "sum",
    batch_first: bool = False,
    seed: int = 0,
):
    """The same seed's model, data, chunks, optimizer and draws in both engines: the trainers
    after finish(), and the chunks' mean losses (numpy, torch)."""
    rng = np.random.default_rng(seed)
    m, n, p, batch, T = 2, 4, 3, 3, sum(CHUNKS)
    g = "softmax" if loss == "cross_entropy" else "tanh"
    model = tbptt.ElmanRNN.init(n=n, m=m, p=p, g=g, seed=seed + 1)
    x = rng.normal(size=(T, batch, m))
    ce = loss == "cross_entropy"
    y = rng.integers(0, p, (T, batch)) if ce else rng.normal(size=(T, batch, p))
    reset = rng.random((T, batch)) < 0.15 if resets else None
    mask = (rng.random((T, batch)) < 0.7) * rng.uniform(0.3, 1, (T, batch)) if masks else None
    np_opt = tbptt.SGD(lr=0.1, momentum=0.5) if opt == "sgd" else tbptt.Adam(lr=0.02)
    kw = {"clip": clip, "reduction": reduction}
    engine = tbptt.methods.make_trainer(method, model.copy(), np_opt, loss=loss, **kw, **options)
    module = ElmanRNN.from_numpy(model, batch_first=batch_first)
    if opt == "sgd":
        t_opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.5)
    else:
        t_opt = torch.optim.Adam(module.parameters(), lr=0.02)
    loss_fn = cross_entropy_loss if ce else l2_loss
    driver = tbptt.torch.methods.make_trainer(
        method, module, t_opt, loss_fn=loss_fn, batch_first=batch_first, **kw, **options
    )
    losses, a = [], 0
    for L in CHUNKS:
        sl = slice(a, a + L)
        a += L
        cut = lambda v: None if v is None else v[sl]  # noqa: E731, B023
        l_np = engine.feed(x[sl], y[sl], mask=cut(mask), reset=cut(reset))
        args = [None if v is None else torch.tensor(cut(v)) for v in (x, y, mask, reset)]
        if batch_first:
            args = [None if v is None else v.transpose(0, 1) for v in args]
        losses.append((l_np, driver.feed(*args)))
    engine.finish()
    driver.finish()
    return engine, driver, losses


def assert_same(engine, driver, losses) -> None:
    assert driver.updates == engine.updates > 0
    for k, v in engine.model.params.items():
        got = getattr(driver.model, k).detach().numpy()
        assert np.abs(got - v).max() <= TOL * max(1.0, np.abs(v).max()), k
    for l_np, l_t in losses:
        assert abs(l_np - l_t) <= TOL * max(1.0, abs(l_np))


ARTBP_CASES = {
    "c=0.3 b=2": {"c": 0.3, "b": 2, "rng": 5},
    "c=0.5 b=1": {"c": 0.5, "rng": 6},
    "c=1 b=3 (TBPTT(3, 3))": {"c": 1.0, "b": 3, "rng": 7},
    "c(L) callable": {"c": lambda L: min(1.0, 0.08 * L), "rng": 8},
    "c=0.2 max length 4": {"c": 0.2, "rng": 9, "biased_max_length": 4},
}


@pytest.mark.parametrize("options", ARTBP_CASES.values(), ids=ARTBP_CASES)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_artbp_equals_numpy_engine(options: dict, opt: str) -> None:
    """Online ARTBP: the cuts, compensated windows and updates of tbptt.ARTBP, to 1e-10."""
    assert_same(*train_both("artbp", options, opt=opt))


@pytest.mark.parametrize("k1", [1, 4])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_uoro_equals_numpy_engine(k1: int, opt: str) -> None:
    """Online UORO (torch.func's jvp and per-stream vjp): tbptt.UORO's parameters, to 1e-10."""
    assert_same(*train_both("uoro", {"k1": k1, "rng": 3}, opt=opt))


@pytest.mark.parametrize("k1", [1, 5])
def test_rtrl_equals_numpy_engine(k1: int) -> None:
    """Online RTRL: tbptt.RTRL's parameters, to 1e-10."""
    assert_same(*train_both("rtrl", {"k1": k1}, opt="adam"))


@pytest.mark.parametrize(
    "method, options",
    [("artbp", {"c": 0.3, "b": 2, "rng": 1}), ("uoro", {"k1": 3, "rng": 2}), ("rtrl", {"k1": 2})],
)
def test_resets_masks_clip_mean_batch_first_and_cross_entropy(method: str, options: dict) -> None:
    """Resets, fractional masks, clipping, reduction="mean", batch-first chunks and softmax
    cross-entropy give the numpy engine's parameters and chunk losses too."""
    common = {"resets": True, "masks": True, "reduction": "mean"}
    assert_same(*train_both(method, options, opt="adam", clip=0.3, **common, batch_first=True))
    assert_same(*train_both(method, options, loss="cross_entropy", clip=0.5, **common, seed=4))


# -- exact BPTT: ARTBP with c = 0, RTRL frozen -------------------------------------------------
def stream(T: int = 11, batch: int = 3, m: int = 2, p: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, batch, m, generator=g, dtype=DT)
    y = torch.randn(T, batch, p, generator=g, dtype=DT)
    mask = torch.rand(T, batch, generator=g, dtype=DT)
    reset = torch.rand(T, batch, generator=g) < 0.2
    return x, y, mask, reset


def exact(model: nn.Module, x, y, mask, reset, state0=None) -> dict[str, torch.Tensor]:
    """Exact BPTT by autograd through a plain loop, one module call per step, restarting a
    stream from state0 (zeros when None) where reset says; the state is (layers, batch, hidden)
    or a tuple of such tensors."""
    state, total = state0, 0.0
    for t in range(len(x)):
        if state is not None:
            r = reset[t][None, :, None]
            if isinstance(state, tuple):
                z = state0 if state0 is not None else tuple(map(torch.zeros_like, state))
                state = tuple(torch.where(r, a, b) for a, b in zip(z, state, strict=True))
            else:
                z = state0 if state0 is not None else torch.zeros_like(state)
                state = torch.where(r, z, state)
        out, state = model(x[t : t + 1], state)
        total = total + (l2_loss(out, y[t : t + 1]) * mask[t : t + 1]).sum()
    names = [k for k, _ in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(total, list(model.parameters())), strict=True))


def relative(got: dict, want: dict) -> float:
    return max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)


def lstm(layers: int = 2, m: int = 2, hidden: int = 3, p: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Recurrent(nn.LSTM(m, hidden, num_layers=layers), nn.Linear(hidden, p)).to(DT)


def gru(layers: int = 2, m: int = 2, hidden: int = 3, p: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Recurrent(nn.GRU(m, hidden, num_layers=layers), nn.Linear(hidden, p)).to(DT)


@pytest.mark.parametrize("b", [1, 3])
def test_artbp_without_cuts_on_a_whole_stream_is_exact_bptt(b: int) -> None:
    """c = 0: one window from step 1 to the end (finish() is the cut), fed in chunks that do not
    align with b, on a 2-layer nn.LSTM with resets and masks: the one update is exact BPTT."""
    x, y, mask, reset = stream(T=13)
    model = lstm()
    want = exact(model, x, y, mask, reset)
    opt = Summed(model.parameters())
    driver = ARTBP(model, opt, c=0.0, b=b, rng=0)
    for a, z in ((0, 4), (4, 5), (5, 13)):
        driver.feed(x[a:z], y[a:z], mask[a:z], reset[a:z])
    assert driver.updates == 0
    driver.finish()
    assert driver.updates == 1
    got = {k: opt.state[p]["sum"] for k, p in model.named_parameters()}
    assert relative(got, want) < TOL


@pytest.mark.parametrize("make", [gru, lstm], ids=["gru", "lstm"])
def test_rtrl_frozen_is_exact_bptt(make) -> None:
    """RTRL with the parameters fixed (the summed contributions, updates every 4 steps) equals
    exact BPTT on a 2-layer nn.GRU and nn.LSTM, with resets, masks and a state0, to 1e-10."""
    x, y, mask, reset = stream(T=9)
    model = make()
    g = torch.Generator().manual_seed(5)
    h0 = torch.randn(2, 3, 3, generator=g, dtype=DT)
    state0 = (h0, h0.flip(0)) if make is lstm else h0
    want = exact(model, x, y, mask, reset, state0)
    got = frozen_gradients("rtrl", model, x, y, mask=mask, reset=reset, state0=state0, k1=4)
    assert relative(got, want) < TOL
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_artbp_and_uoro_are_unbiased_on_an_lstm() -> None:
    """The mean of many ARTBP (c = 0.4) and UORO estimates on a 2-layer nn.LSTM approaches exact
    BPTT: with M draws, every coordinate's z = (mean - exact) / (sd / sqrt(M)) lies below the
    Bonferroni threshold of a false-alarm rate of 1e-3 (normal approximation), and the squared
    error of means of N = 4 draws, averaged over M / 4 = 64 groups, is V / 4 within a factor 2
    (a mean of at least 64 unit chi-squares: false alarm below 2e-4); 1.2e-3 in all, per method.
    Each draw is one trainer on 8 copies of the same stream: the mean of 8 independent estimates
    (the signs and cuts differ; ARTBP's cuts are shared by the 8, so its copies are alike)."""
    x, y, mask, reset = stream(T=6, batch=1)
    model = lstm(hidden=2)
    want = exact(model, x, y, mask, reset)
    flat = lambda g: torch.cat([g[k].reshape(-1) for k in want]).numpy()  # noqa: E731
    rep = lambda a: a.expand(a.shape[0], 8, *a.shape[2:])  # noqa: E731
    data = [rep(x), rep(y), rep(mask), rep(reset)]
    M, exact_ = 256, flat(want)
    for method, options in (("uoro", {}), ("artbp", {"c": 0.4})):
        rng = np.random.default_rng(11)
        G = np.array(
            [
                flat(
                    frozen_gradients(
                        method, model, *data[:2], mask=data[2], reset=data[3], rng=rng, **options
                    )
                )
                / 8
                for _ in range(M)
            ]
        )
        sd = G.std(axis=0, ddof=1)
        spread = sd > 1e-9 * np.linalg.norm(exact_)
        assert np.allclose(G[:, ~spread], exact_[~spread], rtol=1e-9, atol=1e-12)
        z = (G.mean(axis=0)[spread] - exact_[spread]) / (sd[spread] / math.sqrt(M))
        assert np.abs(z).max() < z_threshold(int(spread.sum())), method
        V = float((sd**2).sum())
        means = G.reshape(M // 4, 4, -1).mean(axis=1)
        ratio = float(((means - exact_) ** 2).sum(axis=1).mean() / (V / 4))
        assert 0.5 < ratio < 2, (method, ratio)


# -- the cells (cells.py) against torch.func's path -------------------------------------------
class General(Recurrent):
    """Recurrent as a subclass, which the cells do not take: torch.func's general path."""


RNNS = {
    "lstm 2 layers": lambda: nn.LSTM(2, 3, num_layers=2),
    "gru 2 layers": lambda: nn.GRU(2, 3, num_layers=2),
    "rnn tanh": lambda: nn.RNN(2, 3),
    "rnn relu no bias, batch first": lambda: nn.RNN(
        2, 3, nonlinearity="relu", bias=False, batch_first=True
    ),
}


@pytest.mark.parametrize("make", RNNS.values(), ids=RNNS)
@pytest.mark.parametrize("method, options", [("uoro", {"k1": 3, "rng": 4}), ("rtrl", {"k1": 2})])
def test_cells_equal_the_general_path(make, method: str, options: dict) -> None:
    """UORO and RTRL on nn.LSTM, nn.GRU, nn.RNN through the written-out cells (outer products,
    the tangent beside the values) give the parameters of torch.func's path, with resets, masks
    and a frozen weight (not in theta), to 1e-10."""
    x, y, mask, reset = stream(T=10)
    results = []
    for cls in (Recurrent, General):
        torch.manual_seed(0)
        rnn = make()
        model = cls(rnn, nn.Linear(3, 2)).to(DT)
        rnn.weight_hh_l0.requires_grad_(False)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
        batch_first = getattr(rnn, "batch_first", False)
        driver = tbptt.torch.methods.make_trainer(
            method, model, opt, batch_first=batch_first, **options
        )
        for a, z in ((0, 4), (4, 10)):
            args = [v[a:z].transpose(0, 1) if batch_first else v[a:z] for v in (x, y, mask, reset)]
            driver.feed(*args)
        assert (driver.rule.cell is not None) == (cls is Recurrent)
        driver.finish()
        results.append({k: p.detach().clone() for k, p in model.named_parameters()})
    assert relative(results[0], results[1]) < TOL
