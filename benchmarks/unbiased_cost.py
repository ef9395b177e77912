"""RTRL, UORO and ARTBP against their cost models, and the four methods side by side (issue 14).

Measured on the numpy engine, frozen estimates of T steps at batch 1 (m = p = 16), n = 32 and 128,
interleaved with the models' calibration runs (common.interleave). Per repetition:

    forward    tbptt.total_loss: checks, (1.1)-(1.5)                         f per step
    exact      tbptt.gradients: forward + backward                     b = (exact - forward) / T
    tbptt      tbptt.gradients with TBPTT(k, k), k = 10
    artbp      tbptt.artbp_gradients with c = 1/k: windows of the same mean length k
    rtrl       tbptt.rtrl_gradients
    uoro       tbptt.uoro_gradients
    rtrl-step  the four array operations of one RTRL step (8.3)-(8.4) on arrays of J's shape:
               A J (one product), the diagonal add of M_t, the scaling by D_t, (C^T e_t)^T J_t
    uoro-step  32 steps' array work of UORO: 32 products Theta u_t (a pass over theta~ each), one
               batched product adding 32 rank-one terms to Theta, and 32 times the small-array
               operations of one step of uoro.py's loop (the recursion of s~, rho0, kappa, the
               norm, the share of 16 pending rank-one terms), each on arrays of the loop's shapes

The cost models, each repetition with its own calibration:

    ARTBP      = TBPTT(k, k) with the same T                               target: within 1.2x
    RTRL       = forward(T) + T rtrl-step                                  target: within 1.5x
    UORO       = exact(T) + T uoro-step / 32                               target: within 1.5x

At batch 1 UORO's loop is bound by its 33 small numpy calls per step, not by arithmetic; the model
prices them at their measured times. Each ratio is what the Python loop costs beyond the array
operations its steps need (indexing, bookkeeping).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from common import Group, Row, interleave, load

import tbptt
from tbptt.numpy.rtrl import diagonal
from tbptt.numpy.uoro import dot_rows

K = 10  # mean truncation length of TBPTT(k, k) and ARTBP(c = 1/k)
TARGETS = {"artbp": 1.2, "rtrl": 1.5, "uoro": 1.5}


@dataclass(frozen=True)
class Config:
    n: int
    T: int  # steps of every estimate (RTRL's cost grows like n^4: fewer at n = 128)
    batch: int = 1
    m: int = 16

    def label(self) -> str:
        return f"n={self.n}, batch {self.batch}, m=p={self.m}, T={self.T}"


CONFIGS = (Config(n=32, T=400), Config(n=128, T=100))


def run(quick: bool, reps: int | None, threads: int) -> Group:
    title = "RTRL, UORO and ARTBP against their cost models, numpy engine (issue 14)"
    group = Group(title, load_before=load())
    reps = reps or (3 if quick else 7)
    for cfg in CONFIGS:
        one_config(group, cfg, reps)
    group.load_after = load()
    return group


def one_config(group: Group, cfg: Config, reps: int) -> None:
    rng = np.random.default_rng(0)
    n, b, m, T = cfg.n, cfg.batch, cfg.m, cfg.T
    model = tbptt.ElmanRNN.init(n=n, m=m, p=m, seed=0, spectral_radius=1.0)
    x = rng.standard_normal((T, b, m))
    y = rng.standard_normal((T, b, m))
    q = n + m + 1
    J = rng.standard_normal((n, b, n, q))
    nxt, U, fp = np.empty_like(J), rng.random((b, q)), rng.random((b, n))
    dh, term = rng.random((b, n)), np.empty(n * q)
    Theta, Tu = rng.random((b, n, q)), np.empty((b, n, 1))
    pending_a, pending_u = rng.random((b, n, 32)), rng.random((b, 32, q))
    s_, AT, fp_, nu_, back_, a_ = (rng.random((b, n)) for _ in range(6))
    AT = np.ascontiguousarray(model.A.T)
    kappa, N2, rho1, om, beta, k2 = (rng.random(b) + 0.5 for _ in range(6))
    DAs, Ut = np.empty((b, n)), rng.random((b, q))
    As, Us, bs = rng.random((16, b, n)), rng.random((16, b, q)), rng.random((16, b))

    def rtrl_step():
        np.matmul(model.A, J.reshape(n, -1), out=nxt.reshape(n, -1))
        diagonal(nxt)[...] += U
        np.multiply(nxt, fp.T[:, :, None, None], out=nxt)
        np.dot(dh.T.reshape(-1), nxt.reshape(n * b, n * q), out=term)

    def small_step():  # the operations of one step of UORO's loop on small arrays (uoro.py)
        np.multiply(dot_rows(back_, s_), kappa, out=om)
        np.dot(s_, AT, out=DAs)
        np.multiply(DAs, fp_, out=DAs)
        rho0 = np.sqrt((kappa * np.sqrt(N2) + 1e-7) / (np.sqrt(dot_rows(DAs, DAs)) + 1e-7))
        np.multiply(DAs, rho0[:, None], out=s_)
        s_[...] += rho1[:, None] * nu_
        ip = dot_rows(a_, Tu[:, :, 0])
        ip += (bs * dot_rows(Us, Ut) * dot_rows(As, a_)).sum(axis=0)
        np.divide(kappa, rho0, out=k2)
        b_ = np.divide(1, rho1 * k2, out=beta)
        N2[...] = np.maximum(N2 + b_ * (2 * ip + b_ * om), 0)
        return k2.max() > 1e100 or k2.min() < 1e-100

    def uoro_steps():  # 32 steps: Theta u_t and the small operations each, one flush
        for _ in range(32):
            np.matmul(Theta, U[:, :, None], out=Tu)
            small_step()
        Theta.__iadd__(np.matmul(pending_a, pending_u))

    c = 1 / K
    cases = {
        "forward": lambda: tbptt.total_loss(model, x, y),
        "exact": lambda: tbptt.gradients(model, x, y),
        "tbptt": lambda: tbptt.gradients(model, x, y, tbptt.Truncation(K, K, flush=True)),
        "artbp": lambda: tbptt.artbp_gradients(model, x, y, c=c, rng=1),
        "rtrl": lambda: tbptt.rtrl_gradients(model, x, y),
        "uoro": lambda: tbptt.uoro_gradients(model, x, y, rng=1),
        "rtrl-step": lambda: [rtrl_step() for _ in range(10)],
        "uoro-step": uoro_steps,
    }
    t = interleave(cases, reps=reps)
    models = {
        "artbp": lambda r: r["tbptt"],
        "rtrl": lambda r: r["forward"] + T * r["rtrl-step"] / 10,
        "uoro": lambda r: r["exact"] + T * r["uoro-step"] / 32,
    }
    words = {
        "artbp": f"ARTBP(c=1/{K}) / TBPTT({K}, {K})",
        "rtrl": "RTRL / its cost model",
        "uoro": "UORO / its cost model",
    }
    for name, model_time in models.items():
        ratio = t.paired(lambda r, name=name, model_time=model_time: r[name] / model_time(r))
        lo, hi = (f(r / model_time(rep) for r, rep in _pairs(t, name)) for f in (min, max))
        target, note = TARGETS[name], f"per repetition {lo:.2f}-{hi:.2f}"
        row = Row(
            f"{cfg.label()}: {words[name]}", ratio, "x", f"<= {target}x", ratio <= target, note
        )
        group.rows.append(row)
    per_step = {k: 1e6 * t.median(k) / T for k in ("tbptt", "artbp", "uoro", "rtrl", "exact")}
    group.notes.append(
        f"{cfg.label()}, us per step (medians): TBPTT({K}, {K}) {per_step['tbptt']:.1f}, "
        f"ARTBP(c=1/{K}) {per_step['artbp']:.1f}, UORO {per_step['uoro']:.1f}, "
        f"RTRL {per_step['rtrl']:.1f}, exact BPTT {per_step['exact']:.1f}; {t.contention()}."
    )


def _pairs(t, name):
    """(this case's seconds, {case: seconds}) per repetition."""
    names = list(t.times)
    for i in range(len(t.times[name])):
        yield t.times[name][i], {k: t.times[k][i] for k in names}
