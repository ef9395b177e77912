"""Bias of truncation against exact BPTT, the per-lag decomposition, and Aicher et al.'s K."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

import tbptt
from tbptt.analysis import bias
from tbptt.app import bias_commands
from tbptt.app.cli import main

ACT = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda a: a}


def problem(T=14, batch=3, n=5, m=2, p=2, f="tanh", seed=0, rho=1.2):
    """A small float64 model and random data with a reset and a mask."""
    rng = np.random.default_rng(seed)
    model = tbptt.ElmanRNN.init(n=n, m=m, p=p, f=f, seed=seed, spectral_radius=rho)
    model = model.replace(b=rng.normal(size=n) * 0.1, c=rng.normal(size=p) * 0.1)
    x, y = rng.normal(size=(T, batch, m)), rng.normal(size=(T, batch, p))
    reset = np.zeros((T, batch), bool)
    reset[6, 1] = True  # stream 1 restarts at step 7
    mask = np.ones((T, batch))
    mask[3, 2] = mask[T - 2, 0] = 0.0  # two steps without a target
    h0 = rng.normal(size=(batch, n)) * 0.3
    return model, x, y, h0, mask, reset


def torch_state_gradients(model, x, y, h0, mask, reset) -> np.ndarray:
    """dl_t/dh_k for every loss step t and state k = 0..T by torch autograd: (T, T + 1, batch,
    n)."""
    P = {k: torch.tensor(v) for k, v in model.params.items()}
    f = ACT[model.f]
    X, Y = torch.tensor(x), torch.tensor(y)
    H0 = torch.tensor(h0)
    T, batch, _ = x.shape
    hs = [H0.clone().requires_grad_(True)]  # h_0
    losses = []
    for t in range(T):
        prev = hs[-1]
        if reset[t].any():  # restart from a constant h0: no gradient to h_{t-1}
            prev = torch.where(torch.tensor(reset[t])[:, None], H0, prev)
        h = f(prev @ P["A"].T + X[t] @ P["B"].T + P["b"])
        h.retain_grad()
        hs.append(h)
        z = h @ P["C"].T + P["c"]
        losses.append(0.5 * ((z - Y[t]) ** 2).sum(-1) * torch.tensor(mask[t]))  # (batch,)
    out = np.zeros((T, T + 1, batch, model.n))
    for t in range(T):
        grads = torch.autograd.grad(
            losses[t].sum(), hs[: t + 2], retain_graph=True, allow_unused=True
        )
        for k, g in enumerate(grads):
            if g is not None:
                out[t, k] = g.numpy()
    return out


def test_rows_match_tbptt_gradients():
    """Cosine and relative error, overall and per parameter, equal those of tbptt.gradients."""
    model, x, y, h0, mask, reset = problem()
    trs = bias.schedules([1, 3, 5, 14], 1, ["new", "window"]) + bias.schedules([2, 4], None)
    rows = bias.truncation_bias(model, x, y, trs, h0, mask=mask, reset=reset)
    exact = tbptt.gradients(model, x, y, None, h0, mask=mask, reset=reset)
    names = list(model.params)
    for r, tr in zip(rows, trs, strict=True):
        approx = tbptt.gradients(model, x, y, tr, h0, mask=mask, reset=reset)
        a = np.concatenate([approx[k].ravel() for k in names])
        e = np.concatenate([exact[k].ravel() for k in names])
        assert r.truncation == tr
        assert r.rel_error == pytest.approx(np.linalg.norm(a - e) / np.linalg.norm(e), rel=1e-12)
        assert r.cosine == pytest.approx(a @ e / np.linalg.norm(a) / np.linalg.norm(e), rel=1e-12)
        for k in names:
            want = np.linalg.norm(approx[k] - exact[k]) / np.linalg.norm(exact[k])
            assert r.per_param[k][1] == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert r.backward_steps == sum(w.u - w.s + 1 for w in tr.windows(len(x)))


def test_full_truncation_has_no_bias():
    """BPTT(k2) with k2 >= T is exact: relative error ~ 0 and cosine 1 (SEMANTICS.md 7.5)."""
    model, x, y, h0, mask, reset = problem()
    (row,) = bias.truncation_bias(
        model, x, y, [tbptt.Truncation(1, 14)], h0, mask=mask, reset=reset
    )
    assert row.rel_error < 1e-12 and row.cosine == pytest.approx(1.0, abs=1e-12)


def test_lag_gradients_match_torch_autograd():
    """Every term dl_t/dh_{t-tau} equals torch autograd's, resets and masks included."""
    model, x, y, h0, mask, reset = problem()
    T = len(x)
    G = bias.lag_gradients(model, x, y, T, h0, mask=mask, reset=reset)  # (T + 1, T, batch, n)
    want = torch_state_gradients(model, x, y, h0, mask, reset)  # [t - 1, k] = dl_t/dh_k
    for tau in range(T + 1):
        for t in range(1, T + 1):
            ref = want[t - 1, t - tau] if t - tau >= 0 else np.zeros_like(G[tau, t - 1])
            np.testing.assert_allclose(G[tau, t - 1], ref, rtol=1e-10, atol=1e-13)


def test_lag_norms_match_torch_autograd():
    """lag_norms is the norm of each stream's dl_t/dh_{t-tau}, nan where t - tau < 0."""
    model, x, y, h0, mask, reset = problem(seed=3)
    T = len(x)
    N = bias.lag_norms(model, x, y, T, h0, mask=mask, reset=reset)
    want = torch_state_gradients(model, x, y, h0, mask, reset)
    for tau in range(T + 1):
        for t in range(1, T + 1):
            if t - tau < 0:
                assert np.isnan(N[tau, t - 1]).all()
            else:
                ref = np.linalg.norm(want[t - 1, t - tau], axis=-1)
                np.testing.assert_allclose(N[tau, t - 1], ref, rtol=1e-10, atol=1e-13)


def test_lag_profile_means_match_torch_autograd():
    """phi_tau and the cumulative norms average the same loss terms t >= max_lag (unmasked)."""
    model, x, y, h0, mask, reset = problem(T=20, seed=4)
    max_lag = 8
    prof = bias.lag_profile(model, x, y, max_lag, h0, mask=mask, reset=reset)
    want = torch_state_gradients(model, x, y, h0, mask, reset)
    terms = [(t, j) for t in range(max_lag, 21) for j in range(3) if mask[t - 1, j] != 0]
    assert prof.count == len(terms)
    cum = np.zeros(model.n)
    for tau in range(max_lag + 1):
        vecs = [want[t - 1, t - tau, j] for t, j in terms]
        assert prof.norms[tau] == pytest.approx(
            np.mean([np.linalg.norm(v) for v in vecs]), rel=1e-10
        )
        cum += np.sum(vecs, axis=0)
        assert prof.cum_norms[tau] == pytest.approx(np.linalg.norm(cum) / len(terms), rel=1e-10)


def test_truncation_keeps_the_first_lags():
    """BPTT(k2)'s dL/dA is the per-lag sum (Pascanu et al. eq. 4) over tau < k2 only."""
    model, x, y, h0, mask, reset = problem()
    T = len(x)
    G = bias.lag_gradients(model, x, y, T, h0, mask=mask, reset=reset)
    traj = tbptt.numpy.elman.forward(model, x, h0, reset)
    for k2 in (1, 3, T):
        gA = np.zeros_like(model.A)
        for tau in range(k2):
            for t in range(tau + 1, T + 1):  # state h_{t-tau} with t - tau >= 1
                r = G[tau, t - 1] * traj.fprime[t - tau - 1]  # (batch, n)
                gA += r.T @ traj.h_prev[t - tau - 1]
        want = tbptt.gradients(model, x, y, tbptt.Truncation(1, k2), h0, mask=mask, reset=reset)
        np.testing.assert_allclose(gA, want["A"], rtol=1e-10, atol=1e-13)


def orthogonal_linear(rho=0.7, n=4, seed=0):
    """f = identity and A = rho Q, Q orthogonal: ||dl_t/dh_{t-tau}|| = rho^tau ||C^T e_t||."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    model = tbptt.ElmanRNN(rho * Q, rng.normal(size=(n, 2)), rng.normal(size=(2, n)), f="identity")
    return model, rng.normal(size=(60, 2, 2)), rng.normal(size=(60, 2, 2))


def test_fitted_rate_of_an_exactly_geometric_decay():
    """For A = rho Q the norms decay exactly as rho^tau, and the fit returns rho."""
    model, x, y = orthogonal_linear(rho=0.7)
    prof = bias.lag_profile(model, x, y, 20)
    np.testing.assert_allclose(prof.norms, prof.norms[0] * 0.7 ** np.arange(21), rtol=1e-10)
    assert prof.rate == pytest.approx(0.7, rel=1e-10)
    assert prof.scale == pytest.approx(prof.norms[0], rel=1e-9)
    assert prof.half_life == pytest.approx(math.log(2) / -math.log(0.7))


def test_choose_k_follows_the_bound_by_hand():
    """K(delta) is the smallest K with tail(K) / G <= delta, tail and G computed by hand."""
    model, x, y = orthogonal_linear(rho=0.6)
    prof = bias.lag_profile(model, x, y, 20, fit_from=2)
    beta, phi = prof.rate, prof.norms
    tail = lambda K: phi[K:2].sum() + phi[2] * beta ** max(K - 2, 0) / (1 - beta)  # noqa: E731
    G = max(prof.cum_norms[K - 1] - tail(K) for K in range(1, 22))
    for delta in (0.5, 0.1, 0.01, 1e-4):
        want = next(K for K in range(1, 300) if tail(K) / G <= delta)
        choice = bias.choose_k(prof, delta, k_max=300)
        assert choice.k == want and choice.bounded
        assert choice.rel_bias[want - 1] == pytest.approx(tail(want) / G, rel=1e-12)
    assert bias.suggest_k(model, x, y, 0.01, max_lag=20, fit_from=2, k_max=300) == (
        bias.choose_k(prof, 0.01, 300).k
    )


def test_no_decay_returns_k_max():
    """Without geometric decay (rho > 1, identity f) no K is bounded: K = k_max."""
    model, x, y = orthogonal_linear(rho=1.05)
    choice = bias.choose_k(bias.lag_profile(model, x, y, 20), 0.1, k_max=50)
    assert choice.k == 50 and not choice.bounded


def test_zero_recurrence_needs_one_step():
    """With A = 0 nothing flows back: the rate is 0 and K = 1 (SEMANTICS.md 7.4)."""
    model, x, y = orthogonal_linear()
    model = model.replace(A=np.zeros_like(model.A))
    prof = bias.lag_profile(model, x, y, 10)
    assert prof.rate == 0.0 and (prof.norms[1:] == 0).all()
    assert bias.choose_k(prof, 0.1).k == 1


def test_bad_arguments_name_themselves():
    """Invalid max_lag, fit_from, delta and truncations raise errors naming the argument."""
    model, x, y = orthogonal_linear()
    with pytest.raises(ValueError, match="max_lag"):
        bias.lag_profile(model, x, y, 0)
    with pytest.raises(ValueError, match="max_lag"):
        bias.lag_norms(model, x, y, 61)
    with pytest.raises(ValueError, match="fit_from"):
        bias.lag_profile(model, x, y, 5, fit_from=5)
    with pytest.raises(ValueError, match="delta"):
        bias.choose_k(bias.lag_profile(model, x, y, 5), 1.5)
    with pytest.raises(TypeError, match="truncations"):
        bias.truncation_bias(model, x, y, [(1, 2)])


def test_cli_bias_writes_table_csv_and_plots(tmp_path, capsys):
    """`tbptt bias` prints the table and writes CSVs whose numbers are truncation_bias's."""
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.normal(size=(40, 2, 3)), y=rng.normal(size=(40, 2, 2)))
    model = tbptt.ElmanRNN.init(n=6, m=3, p=2, seed=1, spectral_radius=0.9)
    np.savez(tmp_path / "model.npz", **model.params, f="tanh", g="identity")
    out = tmp_path / "out"
    args = [
        "bias",
        "--model",
        str(tmp_path / "model.npz"),
        "--data",
        str(data),
        "--k2",
        "2",
        "4",
        "40",
        "--inject",
        "new",
        "last",
        "--k1",
        "2",
        "--max-lag",
        "10",
        "--out-dir",
        str(out),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "Fitted geometric decay" in text and "Suggested k2" in text
    assert sorted(p.name for p in out.iterdir()) == ["bias.csv", "bias.png", "lags.csv", "lags.png"]
    with np.load(data) as d:
        x, y = d["x"], d["y"]
    rows = bias.truncation_bias(model, x, y, bias.schedules([2, 4, 40], 2, ["new", "last"]))
    with open(out / "bias.csv") as fh:
        got = {(int(r["k2"]), r["inject"], r["param"]): r for r in csv.DictReader(fh)}
    assert len(got) == len(rows) * 6  # "all" and A, B, C, b, c
    for r in rows:
        line = got[(r.truncation.k2, r.truncation.inject, "all")]
        assert float(line["rel_error"]) == pytest.approx(r.rel_error, rel=1e-9, abs=1e-15)
        assert float(line["cosine"]) == pytest.approx(r.cosine, rel=1e-9)
        assert float(got[(r.truncation.k2, r.truncation.inject, "A")]["rel_error"]) == (
            pytest.approx(r.per_param["A"][1], rel=1e-9, abs=1e-15)
        )
    prof = bias.lag_profile(model, x, y, 10)
    with open(out / "lags.csv") as fh:
        lags = list(csv.DictReader(fh))
    np.testing.assert_allclose([float(r["mean_norm"]) for r in lags], prof.norms, rtol=1e-9)
    assert f"beta = {prof.rate:.4f}" in text


def test_cli_bias_invalid_schedule_is_one_line(tmp_path, capsys):
    """k2 < k1 with inject=new is the library's one-line error, exit 2."""
    args = [
        "bias",
        "--hidden",
        "4",
        "--steps",
        "20",
        "--k1",
        "4",
        "--k2",
        "2",
        "--out-dir",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tbptt bias: error: inject='new' needs k2 >= k1") and "\n" not in err


def test_cli_suggest_k_prints_suggest_k(tmp_path, capsys):
    """`tbptt suggest-k` on a fresh model prints the K that suggest_k returns."""
    args = [
        "suggest-k",
        "--hidden",
        "8",
        "--spectral-radius",
        "0.8",
        "--steps",
        "120",
        "--batch",
        "2",
        "--max-lag",
        "30",
        "--delta",
        "0.2",
    ]
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    model = tbptt.ElmanRNN.init(n=8, m=4, p=2, seed=0, spectral_radius=0.8)
    d = bias_commands.synthetic_data(model, 120, 2, "l2", 1)
    assert int(last) == bias.suggest_k(model, d["x"], d["y"], 0.2, max_lag=30)
