"""Bias, variance and cost of the gradient estimators against exact BPTT (SEMANTICS.md 8).

For one model and one stream, with g_1..g_N independent frozen estimates of a method (N = 1 for the
deterministic ones, TBPTT and RTRL) and g* the exact BPTT gradient, all parameters as one vector:

    (E.1)  bias      = ||mean_i g_i - g*|| / ||g*||
    (E.2)  variance  = sum over entries of the sample variance of g_i (ddof = 1), / ||g*||^2
    (E.3)  noise     = sqrt(variance / N): the bias an unbiased method shows from N draws alone
    (E.4)  error     = mean_i ||g_i - g*|| / ||g*||: one estimate's distance, bias and noise

and the cost: the median wall time of one estimate divided by the sequence length (seconds per step
for the whole batch of streams, frozen, on this machine), and the memory per stream of the method's
online trainer in floats (TBPTT: the k2 kept steps of x, h, e; RTRL: J and its buffer; UORO: s~ and
theta~; ARTBP: the mean window's steps, random and unbounded).

compare(model, x, y, methods) returns one Row per method; FIELDS names the columns for a CSV;
table(rows) is the text the command line prints; flops_per_step and memory are the cost models.
No printing, no files here.
"""

from __future__ import annotations

import time
from dataclasses import astuple, dataclass, field, fields

import numpy as np

from ..errors import InputError
from ..methods import check_options, frozen_gradients, truncation
from ..numpy.elman import ElmanRNN
from ..numpy.rtrl import theta_size
from ..numpy.tbptt import gradients

Array = np.ndarray


@dataclass(frozen=True)
class Method:
    """A method by name (tbptt, rtrl, uoro, artbp) with its options (tbptt.methods.OPTIONS)."""

    name: str
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_options(self.name, {k: v for k, v in self.options.items() if k != "rng"})

    @property
    def random(self) -> bool:
        return self.name in ("uoro", "artbp")

    def label(self) -> str:
        """e.g. 'artbp(c=0.1)' or 'tbptt(k1=4, k2=8)'."""
        shown = {k: v for k, v in self.options.items() if k != "rng"}
        if self.name == "tbptt":
            tr = truncation(shown)
            shown = {"k1": tr.k1, "k2": tr.k2}
            if tr.inject != "new":
                shown["inject"] = tr.inject
        args = ", ".join(f"{k}={getattr(v, '__name__', v)}" for k, v in shown.items())
        return f"{self.name}({args})" if args else self.name


@dataclass(frozen=True)
class Row:
    """One method's figures (E.1)-(E.4) and its cost."""

    method: str  # Method.label()
    draws: int
    bias: float
    noise: float
    variance: float
    error: float
    seconds_per_step: float
    memory_per_stream: float  # floats

    def as_dict(self) -> dict[str, object]:
        return dict(zip(FIELDS, astuple(self), strict=True))


FIELDS = tuple(f.name for f in fields(Row))


def flatten(grads: dict[str, Array]) -> Array:
    """A gradient dict as one vector (keys sorted; h0 left out)."""
    return np.concatenate([np.ravel(grads[k]) for k in sorted(grads) if k != "h0"])


def mean_window(options: dict, T: int) -> float:
    """ARTBP's expected window length in steps, at most T: b sum_j prod_{i <= j} (1 - c_{ib})."""
    c, b = options["c"], options.get("b", 1)
    cap = options.get("biased_max_length") or T
    total, survive, steps = 0.0, 1.0, 0
    while survive > 1e-12 and steps < min(T, cap):
        total += min(b, T - steps) * survive
        steps += b
        survive *= 1 - (c(steps) if callable(c) else c)
    return min(total, float(T))


def memory(method: Method, model: ElmanRNN, T: int) -> float:
    """Floats per stream held by the method's online trainer (see the module docstring)."""
    n, m, p = model.n, model.m, model.p
    step = n + m + p  # x_t, h_t, e_t of a kept step
    if method.name == "tbptt":
        return float(truncation(method.options).k2 * step)
    if method.name == "rtrl":
        return float(2 * n * theta_size(model))
    if method.name == "uoro":
        return float(n + theta_size(model))
    return mean_window(method.options, T) * step


def flops_per_step(method: Method, n: int, m: int, p: int) -> float:
    """Multiply-adds x 2 per step and stream of the method's online trainer (a cost model):

    forward  F = 2 (n^2 + n m + p n)              A h, B x, C h
    BPTT     Bk = 2 (2 n^2 + n m + 2 p n)         A^T r, C^T e and the products for A, B, C
    TBPTT(k1, k2)   F + (k2 / k1) Bk              each step in k2 / k1 windows
    RTRL     F + 2 n^2 |theta| + 4 n |theta| + 4 p n     A J, M_t, D_t, (C^T e)^T J; C's sums
    UORO     F + Bk + 2 n^2 + 6 |theta|            A s~, Theta u, the rank-one terms, (8.10)
    ARTBP    F + Bk                                one backward step per step, as exact BPTT
    """
    theta = n * (n + m + 1)
    F = 2 * (n * n + n * m + p * n)
    Bk = 2 * (2 * n * n + n * m + 2 * p * n)
    if method.name == "tbptt":
        tr = truncation(method.options)
        return F + tr.k2 / tr.k1 * Bk
    if method.name == "rtrl":
        return F + 2 * n * n * theta + 4 * n * theta + 4 * p * n
    if method.name == "uoro":
        return F + Bk + 2 * n * n + 6 * theta
    return F + Bk


def compare(
    model: ElmanRNN,
    x: Array,
    y: Array,
    methods: list[Method],
    *,
    draws: int = 100,
    seed: int = 0,
    h0: Array | None = None,
    loss: str = "l2",
    mask: Array | None = None,
    reset: Array | None = None,
    repeats: int = 3,
) -> list[Row]:
    """(E.1)-(E.4) and the cost of every method on (x, y), parameters fixed.

    Random methods (uoro, artbp) are drawn `draws` times from np.random.default_rng(seed) (one
    generator per method, so adding a method changes no other row); deterministic ones once (and
    timed `repeats` times).
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise InputError(f"draws must be an integer >= 2, got {draws!r}")
    kw = {"h0": h0, "loss": loss, "mask": mask, "reset": reset}
    exact = flatten(gradients(model, x, y, **kw))
    scale = float(np.linalg.norm(exact)) or 1.0
    T = int(np.shape(x)[0])
    rows = []
    for method in methods:
        rng = np.random.default_rng(seed)
        n_draws = draws if method.random else repeats
        est, times = [], []
        for _ in range(n_draws):
            options = {**method.options, "rng": rng} if method.random else method.options
            start = time.perf_counter()
            g = frozen_gradients(method.name, model, x, y, **kw, **options)
            times.append(time.perf_counter() - start)
            est.append(flatten(g))
        G = np.array(est) if method.random else np.array(est[:1])  # (N, |params|)
        var = float(G.var(axis=0, ddof=1).sum()) / scale**2 if len(G) > 1 else 0.0
        rows.append(
            Row(
                method=method.label(),
                draws=len(G),
                bias=float(np.linalg.norm(G.mean(axis=0) - exact)) / scale,
                noise=float(np.sqrt(var / len(G))),
                variance=var,
                error=float(np.mean(np.linalg.norm(G - exact, axis=1))) / scale,
                seconds_per_step=float(np.median(times)) / T,
                memory_per_stream=memory(method, model, T),
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table (bias and noise side by side: a bias within about twice
    the noise is what an unbiased method shows from its draws)."""
    names = ("draws", "bias", "noise", "variance", "error", "us/step")
    head = f"{'method':28s} " + " ".join(f"{k:>{5 if k == 'draws' else 9}s}" for k in names)
    head += f" {'floats/stream':>13s}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.method:28s} {r.draws:5d} {r.bias:9.2e} {r.noise:9.2e} {r.variance:9.2e} "
            f"{r.error:9.2e} {1e6 * r.seconds_per_step:9.1f} {r.memory_per_stream:13,.0f}"
        )
    return "\n".join(lines)
