"""Influence balancing (Tallec and Ollivier 2017): gradients against the engine and autograd."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tbptt
from tbptt import Truncation
from tbptt.analysis import influence as ib


def torch_theta_gradient(theta, T, windows=None, s0=None):
    """dL/dtheta by torch autograd: exact, or summed over windows with s_{s-1} detached."""
    A, v = (torch.tensor(a) for a in ib.system())
    s_init = torch.ones(23, dtype=torch.float64) if s0 is None else torch.tensor(s0)
    if windows is None:
        windows = [tbptt.Window(1, 1, T)]
    total = 0.0
    with torch.no_grad():  # the trajectory, theta fixed
        states, s = [s_init], s_init
        for _ in range(T):
            s = A @ s + theta * v
            states.append(s)
    for w in windows:
        th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
        s = states[w.s - 1]  # a constant: the cut
        L = 0.0
        for t in range(w.s, w.u + 1):
            s = A @ s + th * v
            if t >= w.i:
                L = L + 0.5 * (s[0] - 1) ** 2
        (g,) = torch.autograd.grad(L, th)
        total += float(g)
    return total


def test_the_papers_instance():
    """n = 23 units, 10 of them +theta; sigma_inf = 2 sum v = -6 and theta* = -1/6."""
    A, v = ib.system()
    assert A.shape == (23, 23) and (v == 1).sum() == 10 and (v == -1).sum() == 13
    assert np.allclose(np.diag(A), 0.5) and np.allclose(np.diag(A, 1), 0.5)
    assert np.count_nonzero(A) == 23 + 22
    assert ib.exact_sensitivity() == pytest.approx(-6.0, rel=1e-12)
    assert ib.optimum() == pytest.approx(-1 / 6, rel=1e-12)


def test_sensitivities_are_binomial_sums():
    """sigma_k = sum_{j<k} 2^-j sum_i binom(j, i) v_{i+1}, and the sign turns at k = 41."""
    _, v = ib.system()
    sigma = ib.sensitivities(80)
    for k in (1, 5, 23, 40, 41, 80):
        want = sum(
            2.0**-j * sum(math.comb(j, i) * v[i] for i in range(min(j, 22) + 1)) for j in range(k)
        )
        assert sigma[k] == pytest.approx(want, rel=1e-12)
    assert (sigma[1:41] > 0).all() and (sigma[41:] < 0).all()
    assert sigma[80] == pytest.approx(-6.0, abs=1e-3)


@pytest.mark.parametrize(
    "truncation",
    [
        None,
        Truncation(1, 5),
        Truncation(1, 45),
        Truncation(4, 4, flush=True),
        Truncation(3, 7, "window"),
        Truncation(5, 9, "last"),
    ],
)
def test_gradient_matches_engine_and_autograd(truncation):
    """The closed form (I.5) equals tbptt.gradients on the Elman form and torch autograd."""
    theta, T = 0.3, 50
    got = ib.gradient(theta, T, truncation)
    model, x, y = ib.as_elman(theta, T)
    g = tbptt.gradients(model, x, y, truncation, h0=np.ones(23))
    _, v = ib.system()
    assert got == pytest.approx(float(v @ g["B"][:, 0]), rel=1e-10)
    windows = None if truncation is None else truncation.windows(T)
    assert got == pytest.approx(torch_theta_gradient(theta, T, windows), rel=1e-10)


def torch_online(truncation, steps, lr, theta0=0.5):
    """The canonical online rule in autograd: each step its own leaf copy of theta in force then."""
    A, v = (torch.tensor(a) for a in ib.system())
    s = torch.ones(23, dtype=torch.float64)
    theta, u_prev, hist = theta0, 0, []  # hist: (leaf theta_t, state after step t)
    out = [theta0]
    for t in range(1, steps + 1):
        leaf = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
        prev = hist[-1][1] if hist else s
        hist.append((leaf, A @ prev + leaf * v))
        if truncation.is_update(t):
            w = truncation.window(t, u_prev)
            # rebuild the window from the detached state h_{s-1} with each step's own leaf
            state = hist[w.s - 2][1].detach() if w.s >= 2 else s
            L, leaves = 0.0, []
            for tt in range(w.s, w.u + 1):
                leaf_t = hist[tt - 1][0]
                leaves.append(leaf_t)
                state = A @ state + leaf_t * v
                if tt >= w.i:
                    L = L + 0.5 * (state[0] - 1) ** 2
            grads = torch.autograd.grad(L, leaves)
            theta -= lr * float(sum(grads))
            u_prev = t
        out.append(theta)
    return np.array(out)


@pytest.mark.parametrize("truncation", [Truncation(1, 6), Truncation(3, 7), Truncation(4, 4)])
def test_online_training_matches_autograd(truncation):
    """train() follows the canonical rule: the same theta after every step as autograd's."""
    got = ib.train(truncation, 60, lr=0.01)
    want = torch_online(truncation, 60, lr=0.01)
    np.testing.assert_allclose(got.theta, want, rtol=1e-10, atol=1e-12)


def test_short_truncation_diverges_long_converges():
    """BPTT(k) with k <= 40 drives theta away from -1/6; k >= 45 and exact converge to it."""
    steps = 3000
    for k in (1, 10, 40):
        run = ib.train(Truncation(1, k), steps, lr=1e-4)
        assert run.final > 0.5 + 0.1  # moved up, away from theta* = -1/6
        assert run.loss[-1] > run.loss[100]
    for k in (45, 60, steps):
        run = ib.train(Truncation(1, k), steps, lr=1e-4)
        assert run.final == pytest.approx(ib.optimum(), abs=2e-3)
        assert run.loss[-1] < 1e-4


def test_invalid_arguments():
    """Invalid sizes, steps, lr and truncation raise errors that name them."""
    with pytest.raises(ValueError, match="p must be at most"):
        ib.system(5, 6)
    with pytest.raises(ValueError, match="steps"):
        ib.train(Truncation(1, 2), 0)
    with pytest.raises(ValueError, match="lr"):
        ib.train(Truncation(1, 2), 10, lr=0.0)
    with pytest.raises(TypeError, match="truncation"):
        ib.train((1, 2), 10)


@pytest.mark.slow
@pytest.mark.cpu_sensitive
def test_example_prints_what_results_md_shows(tmp_path):
    """examples/influence_balancing.py prints the output docs/results.md quotes (bar its path)."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "results.md").read_text()
    quoted = text.split("python examples/influence_balancing.py\n```\n\n```text\n", 1)[1]
    quoted = quoted.split("```", 1)[0]
    script = root / "examples" / "influence_balancing.py"
    out = tmp_path / "figure.png"
    run = subprocess.run(
        [sys.executable, str(script), "--out", str(out)], capture_output=True, text=True, check=True
    )
    strip = lambda s: [l.rstrip() for l in s.strip().splitlines() if not l.startswith("Wrote ")]  # noqa: E731
    assert strip(run.stdout) == strip(quoted)
    assert out.read_bytes().startswith(b"\x89PNG")
