"""Exact BPTT of the seed's model: the numpy engine against torch and JAX (issue 6, target 1).

The model of SEMANTICS.md 1 as the seed has it: h_t = tanh(A h_{t-1} + B x_t), z_t = C h_t,
identity output, L = sum_t 1/2 ||z_t - y_t||^2, no biases, float32, h_0 = 0. Every implementation
returns the gradients of A, B and C:

    numpy     tbptt.gradients(model, x, y): the public call, validation included; at batch 1 its
              loops run compiled when numba is installed (tbptt[fast]), and "numpy loops" is the
              same call with TBPTT_NUMBA=0
    nn.RNN    torch.nn.RNN(tanh, bias=False) + nn.Linear(bias=False), loss.backward()
    eager     a torch loop over t of h = tanh(Bx_t + h A^T) (B x_t for all t in one product, as the
              engine does), loss.backward()
    jax       jax.jit(jax.grad(loss)) of a lax.scan of the same step, compiled before timing

The GEMM reference is one large float32 numpy matmul, timed in the same interleaved run; the
engine's efficiency counts 3x the forward FLOPs 2 batch (n^2 + n m + p n) per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from common import (
    Group,
    Row,
    Timings,
    compiled_loops,
    fmt_ms,
    interleave,
    load,
    note_medians,
    numba_off,
    prepare_jax,
)

import tbptt


@dataclass(frozen=True)
class Config:
    batch: int
    n: int
    m: int
    p: int
    T: int
    inner: int  # calls per timed sample

    def label(self) -> str:
        return f"batch {self.batch}, n={self.n}, m=p={self.m}, T={self.T}"

    def forward_flops(self) -> float:
        """2 batch (n^2 + n m + p n) per step: A h, B x and C h."""
        n, m, p = self.n, self.m, self.p
        return 2.0 * self.batch * (n * n + n * m + p * n) * self.T


CONFIGS = (
    Config(1, 128, 64, 64, 500, inner=4),
    Config(32, 256, 64, 64, 200, inner=1),
    Config(64, 512, 128, 128, 100, inner=1),
)
GEMM_N = 2048


def data(cfg: Config, seed: int = 0):
    rng = np.random.default_rng(seed)
    model = tbptt.ElmanRNN.init(
        n=cfg.n, m=cfg.m, p=cfg.p, bias=False, f="tanh", g="identity", dtype=np.float32, seed=seed
    )
    x = rng.standard_normal((cfg.T, cfg.batch, cfg.m), dtype=np.float32)  # (T, batch, m)
    y = rng.standard_normal((cfg.T, cfg.batch, cfg.p), dtype=np.float32)  # (T, batch, p)
    return model, x, y


def numpy_case(model, x, y):
    return lambda: tbptt.gradients(model, x, y)


def torch_cases(model, x, y):
    """nn.RNN + Linear and the eager loop, each returning a function that computes the gradients."""
    import torch

    A, B, C = (torch.from_numpy(np.array(model.params[k])) for k in "ABC")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n, m, p = model.n, model.m, model.p

    rnn = torch.nn.RNN(m, n, nonlinearity="tanh", bias=False)
    lin = torch.nn.Linear(n, p, bias=False)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(A)
        rnn.weight_ih_l0.copy_(B)
        lin.weight.copy_(C)
    rnn_params = (rnn.weight_hh_l0, rnn.weight_ih_l0, lin.weight)

    def nn_rnn():
        for q in rnn_params:
            q.grad = None
        out, _ = rnn(xt)  # (T, batch, n)
        loss = 0.5 * ((lin(out) - yt) ** 2).sum()
        loss.backward()
        return [q.grad for q in rnn_params]

    Ae, Be, Ce = (t.clone().requires_grad_(True) for t in (A, B, C))
    h0 = torch.zeros(x.shape[1], n)

    def eager():
        for q in (Ae, Be, Ce):
            q.grad = None
        Bx = xt @ Be.T  # (T, batch, n)
        h, hs = h0, []
        for t in range(xt.shape[0]):
            h = torch.tanh(Bx[t] + h @ Ae.T)  # (1.1), (1.2)
            hs.append(h)
        z = torch.stack(hs) @ Ce.T  # (T, batch, p)
        loss = 0.5 * ((z - yt) ** 2).sum()
        loss.backward()
        return [Ae.grad, Be.grad, Ce.grad]

    return nn_rnn, eager


def jax_case(model, x, y):
    import jax
    import jax.numpy as jnp

    def loss(A, B, C, x, y):
        Bx = x @ B.T  # (T, batch, n)

        def step(h, bx):
            h = jnp.tanh(bx + h @ A.T)
            return h, h

        _, H = jax.lax.scan(step, jnp.zeros((x.shape[1], A.shape[0]), x.dtype), Bx)
        return 0.5 * jnp.sum((H @ C.T - y) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    args = [jnp.asarray(model.params[k]) for k in "ABC"] + [jnp.asarray(x), jnp.asarray(y)]
    jax.block_until_ready(grad(*args))  # compile outside the timing

    def run():
        return jax.block_until_ready(grad(*args))

    return run


def as_numpy(grads) -> list[np.ndarray]:
    out = []
    for g in grads:
        if hasattr(g, "detach"):
            g = g.detach().numpy()
        out.append(np.asarray(g))
    return out


def relative_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """max over A, B, C of ||got - want|| / ||want||, computed in float64."""
    return max(
        float(np.linalg.norm(g.astype(np.float64) - w) / np.linalg.norm(w))
        for g, w in zip(got, want, strict=True)
    )


def run(quick: bool, reps: int | None, threads: int) -> Group:
    prepare_jax(threads)
    import torch

    torch.set_num_threads(threads)
    group = Group("Exact BPTT: numpy engine against torch and JAX (target 1)", load_before=load())
    reps = reps or (5 if quick else 11)
    worst_err = 0.0
    for i, cfg in enumerate(CONFIGS):
        # the batch-1 rows carry issue 17's target: at least 15 repetitions
        n_reps = max(reps, 15) if cfg.batch == 1 and not quick else reps
        worst_err = max(worst_err, compare(group, cfg, n_reps, i == len(CONFIGS) - 1))
    group.notes.append(
        f"All four implementations agree: largest relative difference of dL/dA, dL/dB, dL/dC "
        f"from the numpy engine, over the three configurations, {worst_err:.1e} (float32)."
    )
    group.notes.append(compiled_loops() + "; they run at batch 1 only (fast.MAX_BATCH).")
    group.load_after = load()
    return group


def compare(group: Group, cfg: Config, reps: int, last: bool = False) -> float:
    """One configuration's cases, interleaved; its rows into group. Returns the worst error."""
    model, x, y = data(cfg)
    nn_rnn, eager = torch_cases(model, x, y)
    cases = {
        "numpy": numpy_case(model, x, y),
        "nn.RNN": nn_rnn,
        "eager": eager,
        "jax": jax_case(model, x, y),
    }
    if cfg.batch == 1:  # the numpy loops too, beside the compiled ones (when installed)
        cases["numpy loops"] = numba_off(numpy_case(model, x, y))
    # the same gradient from every implementation, once, so the comparison is fair
    g = cases["numpy"]()
    want = [np.asarray(g[k], np.float64) for k in "ABC"]
    worst_err = 0.0
    for name in cases:
        if name == "numpy":
            continue
        got = cases[name]()
        err = relative_error(
            as_numpy([got[k] for k in "ABC"] if isinstance(got, dict) else got), want
        )
        worst_err = max(worst_err, err)
        if err > 1e-4:
            group.notes.append(f"{cfg.label()}: {name} gradient differs by {err:.1e}")
    if last:
        a = np.ones((GEMM_N, GEMM_N), np.float32)
        b = np.ones((GEMM_N, GEMM_N), np.float32)
        c = np.empty((GEMM_N, GEMM_N), np.float32)
        cases["gemm"] = lambda: np.matmul(a, b, out=c)
    t = interleave(cases, reps=reps, inner=cfg.inner)
    add_rows(group, cfg, t, last)
    group.notes.append(f"{cfg.label()}: {reps} repetitions; {t.contention()}.")
    return worst_err


def add_rows(group: Group, cfg: Config, t: Timings, last: bool) -> None:
    label = cfg.label()
    medians = note_medians(t, *[k for k in ("numpy", "nn.RNN", "eager", "jax") if k in t.times])
    if cfg.batch == 1:
        targets = {"nn.RNN": 3.0, "jax": 1.0}
    elif cfg.batch == 32:
        targets = {"nn.RNN": 1.3, "jax": 1.0}
    else:
        targets = {}
    for other in ("nn.RNN", "eager", "jax"):
        r = t.ratio(other, "numpy")
        lo, hi = t.spread(other, "numpy")
        want = targets.get(other)
        if other == "jax" and "numpy loops" in t.times:
            loops = t.ratio("jax", "numpy loops")
            group.rows.append(
                Row(
                    f"{label}: jax time / numpy time, numpy loops (TBPTT_NUMBA=0)",
                    loops,
                    "x",
                    "",
                    None,
                    "per-repetition range {:.2f}-{:.2f}; numpy loops {}".format(
                        *t.spread("jax", "numpy loops"), fmt_ms(t.median("numpy loops"))
                    ),
                )
            )
        group.rows.append(
            Row(
                f"{label}: {other} time / numpy time",
                r,
                "x",
                f">= {want:g}x" if want else "",
                None if want is None else r >= want,
                f"per-repetition range {lo:.2f}-{hi:.2f}"
                + (f"; {medians}" if other == "jax" else ""),
            )
        )
    if last:
        gemm_rate = 2.0 * GEMM_N**3 / t.median("gemm")  # FLOP/s of one large matmul
        engine_rate = 3 * cfg.forward_flops() / t.median("numpy")
        # per repetition: (3 forward FLOPs / engine time) / (GEMM FLOPs / GEMM time)
        eff = t.paired(
            lambda r: 3 * cfg.forward_flops() * r["gemm"] / (2.0 * GEMM_N**3 * r["numpy"])
        )
        group.rows.append(
            Row(
                f"{label}: numpy engine FLOP rate (3x forward FLOPs) / float32 GEMM rate",
                eff,
                "%",
                ">= 70%",
                eff >= 0.70,
                f"engine {engine_rate / 1e9:.1f} GFLOP/s, {GEMM_N}x{GEMM_N} matmul "
                f"{gemm_rate / 1e9:.1f} GFLOP/s",
            )
        )
