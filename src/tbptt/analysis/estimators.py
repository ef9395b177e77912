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

import math
import time
from dataclasses import astuple, dataclass, field, fields

import numpy as np

from ..checks import check_int
from ..methods import METHODS, check_options, frozen_gradients, mean_window
from ..methods import Method as MethodSpec
from ..numpy.elman import ElmanRNN
from ..numpy.tbptt import gradients

Array = np.ndarray
__all__ = ["FIELDS", "Method", "Row", "compare", "flatten", "mean_window", "table"]


@dataclass(frozen=True)
class Method:
    """A method by name (tbptt.methods: tbptt, rtrl, uoro, artbp, or one registered) with its
    options."""

    name: str
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_options(self.name, {k: v for k, v in self.options.items() if k != "rng"})

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.name]

    @property
    def random(self) -> bool:
        return self.spec.random

    def label(self) -> str:
        """e.g. 'artbp(c=0.1)' or 'tbptt(k1=4, k2=8)'."""
        return self.spec.label(self.options)


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


def memory(method: Method, model: ElmanRNN, T: int) -> float:
    """Floats per stream held by the method's online trainer (the table's model, tbptt.methods)."""
    cost = method.spec.memory
    return math.nan if cost is None else float(cost(model.n, model.m, model.p, method.options, T))


def flops_per_step(method: Method, n: int, m: int, p: int) -> float:
    """Multiply-adds x 2 per step and stream of the method's online trainer (the table's cost
    model, tbptt.methods: TBPTT(k1, k2) F + (k2 / k1) Bk, RTRL F + 2 n^2 |theta| + ..., UORO
    F + Bk + 2 n^2 + 6 |theta|, ARTBP F + Bk, with F a forward step and Bk a backward one)."""
    cost = method.spec.flops
    return math.nan if cost is None else float(cost(n, m, p, method.options))


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
    check_int("draws", draws, least=2)
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
