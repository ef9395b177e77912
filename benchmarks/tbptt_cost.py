"""TBPTT(k1, k2) against its cost model on the numpy engine (issue 6, target 2).

Williams and Peng's count: over T steps, TBPTT(k1, k2) runs T forward steps and about T k2 / k1
backward steps (exactly Truncation.backward_steps(T), which also counts the shorter first windows).
The cost model prices those steps with the engine's own measured rates, from the same run:

    f = forward(T) / T                       tbptt.total_loss(model, x, y): checks, (1.1)-(1.5)
    b = (exact(T) - forward(T)) / T          tbptt.gradients(model, x, y) minus the forward
    model(k1, k2) = f T + b backward_steps(T)

and each measured time is divided by it (per repetition, with that repetition's f and b; the
median over repetitions is reported):

    frozen   tbptt.gradients(model, x, y, truncation=Truncation(k1, k2))   on the same T steps
    online   tbptt.TBPTT(model, Truncation(k1, k2), SGD).feed(...)        on a stream of chunks

for k2 / k1 in {1, 2, 4} with inject="new". The online figure includes everything the driver does
per update (optimizer step, new model, finiteness checks): that is the overhead being measured.
At batch 1 with numba installed the loops run compiled; the rows marked "numpy loops" repeat the
online cases and their cost model with TBPTT_NUMBA=0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from common import Group, Row, compiled_loops, interleave, load, numba_off

import tbptt
from tbptt.numpy import fast


@dataclass(frozen=True)
class Config:
    batch: int
    n: int
    m: int
    T: int  # frozen: the sequence length
    stream: int  # online: the stream length
    chunk: int  # online: steps per feed (independent of k1)
    k1: int

    def label(self) -> str:
        return f"batch {self.batch}, n={self.n}, m=p={self.m}, k1={self.k1}"


CONFIGS = (
    Config(batch=1, n=128, m=64, T=500, stream=2000, chunk=100, k1=20),
    Config(batch=32, n=256, m=64, T=200, stream=800, chunk=100, k1=20),
)
RATIOS = (1, 2, 4)  # k2 / k1
TARGET = 1.15


def run(quick: bool, reps: int | None, threads: int) -> Group:
    group = Group(
        "TBPTT(k1, k2) against its cost model, numpy engine (target 2)", load_before=load()
    )
    reps = reps or (5 if quick else 11)
    for cfg in CONFIGS:  # batch 1 carries issue 17's target: at least 15 repetitions
        one_config(group, cfg, max(reps, 15) if cfg.batch == 1 and not quick else reps)
    group.notes.append(compiled_loops() + "; they run at batch 1 only.")
    group.load_after = load()
    return group


def one_config(group: Group, cfg: Config, reps: int) -> None:
    rng = np.random.default_rng(0)
    model = tbptt.ElmanRNN.init(n=cfg.n, m=cfg.m, p=cfg.m, bias=False, dtype=np.float32, seed=0)
    x = rng.standard_normal((cfg.T, cfg.batch, cfg.m), dtype=np.float32)  # (T, batch, m)
    y = rng.standard_normal((cfg.T, cfg.batch, cfg.m), dtype=np.float32)
    xs = rng.standard_normal((cfg.stream, cfg.batch, cfg.m), dtype=np.float32)  # the stream
    ys = rng.standard_normal((cfg.stream, cfg.batch, cfg.m), dtype=np.float32)

    def online(trunc: tbptt.Truncation):
        def go():
            driver = tbptt.TBPTT(model.copy(), trunc, tbptt.SGD(lr=1e-3))  # trained in place
            for i in range(0, cfg.stream, cfg.chunk):
                driver.feed(xs[i : i + cfg.chunk], ys[i : i + cfg.chunk])

        return go

    truncs = {r: tbptt.Truncation(cfg.k1, r * cfg.k1, inject="new") for r in RATIOS}
    cases = {
        "forward": lambda: tbptt.total_loss(model, x, y),
        "exact": lambda: tbptt.gradients(model, x, y),
    }
    for r, tr in truncs.items():
        cases[f"frozen {r}"] = lambda tr=tr: tbptt.gradients(model, x, y, truncation=tr)
        cases[f"online {r}"] = online(tr)
    loops = cfg.batch <= fast.MAX_BATCH and fast.compiled() is not None
    if loops:  # the same online rows on the numpy loops (TBPTT_NUMBA=0), with their own model
        for name in ("forward", "exact", *(f"online {r}" for r in truncs)):
            cases[f"{name} loops"] = numba_off(cases[name])
    t = interleave(cases, reps=reps)
    f = t.median("forward") / cfg.T  # seconds per forward step
    b = (t.median("exact") - t.median("forward")) / cfg.T  # seconds per backward step
    group.notes.append(
        f"{cfg.label()}: forward {1e6 * f:.1f} us/step, backward {1e6 * b:.1f} us/step "
        f"(backward / forward = {b / f:.2f}); frozen T={cfg.T}, online stream of {cfg.stream} "
        f"steps fed in chunks of {cfg.chunk}; {t.contention()}."
    )
    kinds = [("frozen", cfg.T, ""), ("online", cfg.stream, "")]
    if loops:
        kinds.append(("online", cfg.stream, " loops"))
    for r, tr in truncs.items():
        for kind, steps, path in kinds:
            name, back = f"{kind} {r}{path}", tr.backward_steps(steps)

            def model_time(rep: dict[str, float], steps=steps, back=back, p=path) -> float:
                fwd = rep["forward" + p] / cfg.T  # this repetition's forward and backward per step
                return fwd * steps + (rep["exact" + p] - rep["forward" + p]) / cfg.T * back

            ratio = t.paired(
                lambda rep, name=name, model_time=model_time: rep[name] / model_time(rep)
            )
            f_p = t.median("forward" + path) / cfg.T
            b_p = (t.median("exact" + path) - t.median("forward" + path)) / cfg.T
            cost = f_p * steps + b_p * back
            detail = f"medians: measured {1e3 * t.median(name):.1f} ms, model {1e3 * cost:.1f} ms"
            if kind == "online":  # what the model leaves out: a fixed cost per update
                extra = (t.median(name) - cost) / (cfg.stream // cfg.k1)
                detail += f"; {1e6 * extra:.0f} us per update beyond the model"
            lo, hi = t.spread_of(
                lambda rep, name=name, model_time=model_time: rep[name] / model_time(rep)
            )
            label = f"{kind}, numpy loops (TBPTT_NUMBA=0)" if path else kind
            group.rows.append(
                Row(
                    f"{cfg.label()}, k2={r * cfg.k1} ({label}): time / cost model",
                    ratio,
                    "x",
                    f"<= {TARGET}x",
                    ratio <= TARGET,
                    f"per-repetition range {lo:.2f}-{hi:.2f}; {detail}",
                )
            )
