"""Throughput of the default demo in characters per second (issue 6, target 5).

The default `tbptt train` run (tbptt.app.config.Config's defaults: Shakespeare, the numpy engine's
Elman cell) is measured through the library directly, on the same data the demo reads
(tbptt.app.data.load_problem), beside a plain PyTorch loop in the style of pytorch/examples'
word_language_model on the same chunks:

    numpy         tbptt.TBPTT(ElmanRNN(V -> hidden -> V, softmax), Truncation(k1, k2), Adam, clip)
    integer       the same, fed tbptt.OneHot(ids, V) instead of the one-hot arrays: B x_t a lookup,
                  dL/dB a scatter-add (compiled with numba when installed; "numpy scatter" without)
    torch engine  tbptt.torch.TBPTT with tbptt.torch.ElmanRNN, the same model (when present)
    plain torch   nn.RNN(V, hidden, tanh) + nn.Linear(hidden, V): repackage_hidden, zero_grad,
                  forward, summed cross-entropy, backward, clip_grad_norm_, Adam step

All three read the demo's one-hot inputs (B x_t picks a column of B), so they run the same model;
word_language_model's nn.Embedding would be the same lookup. Characters per second count every
stream: batch * steps / seconds. Data preparation is done before timing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from common import (
    Group,
    Row,
    Timings,
    compiled_loops,
    interleave,
    load,
    numba_off,
    set_blas_threads,
)

import tbptt
from tbptt.numpy import fast

ONEHOT_TARGET = 1.15  # issue 17: integer inputs against the one-hot products, numpy engine
TORCH_TARGET = 1.03  # issue 17: tbptt.torch.ElmanRNN under the driver against the plain loop

# the demo's defaults, used when tbptt.app.config is not importable
DEFAULTS = {
    "hidden": 256,
    "batch": 32,
    "k1": 32,
    "k2": 32,
    "inject": "new",
    "lr": 6e-3,
    "clip": 5.0,
    "activation": "tanh",
    "bias": True,
    "dtype": "float32",
    "threads": 1,
}


def demo_config() -> tuple[dict, str]:
    """The default run's settings, resolved as `tbptt train` resolves them
    (tbptt.app.config.check)."""
    try:
        from tbptt.app.config import Config, check

        cfg = check(Config())  # fills the defaults that depend on other fields (lr, task)
        out = {k: getattr(cfg, k, v) for k, v in DEFAULTS.items()}
        return out, "tbptt.app.config defaults as `tbptt train` resolves them"
    except (ImportError, AttributeError, TypeError, ValueError):
        return dict(DEFAULTS), "tbptt.app.config not available: the defaults copied in this file"


def demo_chunks(cfg: dict, steps: int) -> tuple[list[tuple], int, str]:
    """`steps` steps of the demo's training streams in chunks of k1: (x one-hot, y ids, reset)."""
    try:
        from types import SimpleNamespace

        from tbptt.app.data import load_problem

        ns = SimpleNamespace(
            task="shakespeare",
            data=None,
            valid_fraction=0.05,
            batch=cfg["batch"],
            dtype=cfg["dtype"],
            seed=0,
            length=100,
        )
        problem = load_problem(ns)
        chunks = [problem.train(t, cfg["k1"]) for t in range(0, steps, cfg["k1"])]
        dense = [(x.dense(np.dtype(cfg["dtype"])), y, r) for x, y, _, r in chunks]  # one-hot rows
        return dense, problem.m, "Shakespeare (tbptt.app.data)"
    except (ImportError, ValueError, AttributeError) as exc:
        # the same layout from random text when the demo's data is unavailable
        rng = np.random.default_rng(0)
        V = 65
        ids = rng.integers(0, V, (steps + 1, cfg["batch"]))
        eye = np.eye(V, dtype=np.dtype(cfg["dtype"]))
        k = cfg["k1"]
        chunks = [(eye[ids[t : t + k]], ids[t + 1 : t + 1 + k], None) for t in range(0, steps, k)]
        return chunks, V, f"random characters ({type(exc).__name__}: {exc})"


@dataclass
class Demo:
    """The demo's model and its chunks, prepared before timing, as every case reads them."""

    cfg: dict
    chunks: list  # (x one-hot, y ids, reset) per k1 steps
    V: int  # the vocabulary
    trunc: tbptt.Truncation
    model0: tbptt.ElmanRNN  # the initial model every case starts from
    id_chunks: list  # the same chunks as tbptt.OneHot ids
    tchunks: list  # the same chunks as torch tensors

    @property
    def tdtype(self):
        import torch

        return torch.float32 if np.dtype(self.cfg["dtype"]) == np.float32 else torch.float64


def prepare(cfg: dict, chunks: list, V: int) -> Demo:
    """The initial model, and the chunks as ids and as tensors too."""
    import torch

    model0 = tbptt.ElmanRNN.init(
        n=cfg["hidden"],
        m=V,
        p=V,
        bias=cfg["bias"],
        f=cfg["activation"],
        g="softmax",
        dtype=np.dtype(cfg["dtype"]),
        seed=0,
    )
    trunc = tbptt.Truncation(cfg["k1"], cfg["k2"], inject=cfg["inject"])
    # integer inputs: the same chunks as ids (tbptt.OneHot), prepared before timing
    id_chunks = [(tbptt.OneHot(x.argmax(-1), V), y, r) for x, y, r in chunks]
    tchunks = [
        (
            torch.from_numpy(x),
            torch.from_numpy(np.asarray(y, np.int64)),
            None if r is None else torch.from_numpy(r),
        )
        for x, y, r in chunks
    ]
    return Demo(cfg, chunks, V, trunc, model0, id_chunks, tchunks)


def numpy_case(d: Demo, ids: bool = False):
    """tbptt.TBPTT on the demo's model, fed the one-hot chunks (or the ids); returns the model."""
    cfg = d.cfg

    def go():
        t = tbptt.TBPTT(
            d.model0.copy(), d.trunc, tbptt.Adam(lr=cfg["lr"]), loss="cross_entropy",
            clip=cfg["clip"],
        )  # fmt: skip
        for x, y, reset in d.id_chunks if ids else d.chunks:
            t.feed(x, y, reset=reset)
        return t.model

    return go


def plain_torch_case(d: Demo):
    """The word_language_model loop on nn.RNN + nn.Linear (module docstring)."""
    import torch

    cfg, V, n, tdtype = d.cfg, d.V, d.cfg["hidden"], d.tdtype

    def go():
        torch.manual_seed(0)
        rnn = torch.nn.RNN(V, n, nonlinearity=cfg["activation"], bias=cfg["bias"], dtype=tdtype)
        decoder = torch.nn.Linear(n, V, bias=cfg["bias"], dtype=tdtype)
        params = list(rnn.parameters()) + list(decoder.parameters())
        opt = torch.optim.Adam(params, lr=cfg["lr"])
        criterion = torch.nn.CrossEntropyLoss(reduction="sum")
        hidden = None
        for x, y, reset in d.tchunks:
            if hidden is not None:
                hidden = hidden.detach()  # repackage_hidden: no backprop into the last chunk
                if reset is not None and bool(reset[0].any()):
                    hidden = torch.where(reset[0][None, :, None], 0.0, hidden)
            opt.zero_grad()
            out, hidden = rnn(x, hidden)  # (k, batch, n)
            loss = criterion(decoder(out).view(-1, V), y.view(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg["clip"])
            opt.step()

    return go


def torch_engine_case(d: Demo):
    """tbptt.torch.TBPTT on tbptt.torch.ElmanRNN, the same model (ImportError without it)."""
    import torch

    from tbptt.torch import TBPTT, ElmanRNN, cross_entropy_loss

    def go():
        net = ElmanRNN.from_numpy(d.model0)
        t = TBPTT(
            net,
            d.trunc,
            torch.optim.Adam(net.parameters(), lr=d.cfg["lr"]),
            loss_fn=cross_entropy_loss,
            clip=d.cfg["clip"],
        )
        for x, y, reset in d.tchunks:
            t.feed(x, y, reset=reset)

    return go


def cases(d: Demo, group: Group) -> dict:
    """The cases to time; a note in group when tbptt.torch is missing."""
    out = {
        "numpy engine": numpy_case(d),
        "numpy engine, integer inputs": numpy_case(d, ids=True),
        "plain torch": plain_torch_case(d),
    }
    if fast.compiled() is not None:  # the integer inputs' scatter-add without numba
        out["numpy engine, integer inputs, numpy scatter"] = numba_off(numpy_case(d, ids=True))
    try:
        out["torch engine"] = torch_engine_case(d)
    except ImportError as exc:
        group.notes.append(f"tbptt.torch not measured: {exc}.")
    return out


def agreement(d: Demo) -> float:
    """Largest relative difference of the parameters trained from ids and from one-hot rows."""
    by_ids, by_rows = numpy_case(d, ids=True)(), numpy_case(d)()
    return max(
        float(np.abs(a - b).max() / np.abs(b).max())
        for a, b in zip(by_ids.params.values(), by_rows.params.values(), strict=True)
    )


def ratio(
    t: Timings, slow: str, fast_: str, name: str, target: float | None, sense: str = "", note=""
) -> Row:
    """slow / fast_ against `target` (None: no target), its per-repetition range in the note."""
    r, (lo, hi) = t.ratio(slow, fast_), t.spread(slow, fast_)
    met = None if target is None else (r >= target if sense == ">=" else r <= target)
    shown = "" if target is None else f"{sense} {target}x"
    return Row(name, r, "x", shown, met, f"per-repetition range {lo:.2f}-{hi:.2f}{note}")


def rows(t: Timings, names: list[str], chars: int, same: float) -> list[Row]:
    """Characters per second of every case, then the ratios."""
    out = [
        Row(f"{k}: characters per second", chars / t.median(k), "chars/s", "", None) for k in names
    ]
    for name in [k for k in names if k.startswith("numpy engine, integer")]:
        label = f"numpy engine: one-hot products time / {name[14:]} time"
        if name == "numpy engine, integer inputs":
            note = f"; parameters after the run agree to {same:.1e} (relative)"
            out.append(ratio(t, "numpy engine", name, label, ONEHOT_TARGET, ">=", note))
        else:
            out.append(ratio(t, "numpy engine", name, label, None))
    if "torch engine" in names:
        label = "torch engine (tbptt.torch.ElmanRNN under the driver) time / plain torch loop time"
        out.append(ratio(t, "torch engine", "plain torch", label, TORCH_TARGET, "<="))
    for name in ("numpy engine", "torch engine"):
        if name in names:
            out.append(ratio(t, "plain torch", name, f"plain torch loop time / {name} time", None))
    return out


def run(quick: bool, reps: int | None, threads: int) -> Group:
    import torch

    group = Group("Default demo throughput (target 5)", load_before=load())
    cfg, source = demo_config()
    # the demo's own thread count (tbptt train --threads), the same for numpy and torch
    demo_threads = int(cfg["threads"] or threads)
    set_blas_threads(demo_threads)
    torch.set_num_threads(demo_threads)
    reps = reps or (3 if quick else 15)
    steps = cfg["k1"] * (8 if quick else 24)
    chunks, V, data = demo_chunks(cfg, steps)
    d = prepare(cfg, chunks, V)
    group.notes.append(
        f"Configuration ({source}): Elman {cfg['activation']}, hidden {cfg['hidden']}, "
        f"vocabulary {V}, batch {cfg['batch']}, {d.trunc.describe()}, Adam lr {cfg['lr']}, clip "
        f"{cfg['clip']}, {cfg['dtype']}, {demo_threads} thread(s) as the demo runs (numpy and "
        f"torch alike); data: {data}; {steps} steps per timed run."
    )
    same = agreement(d)
    fns = cases(d, group)
    t = interleave(fns, reps=reps)
    group.notes.append(f"{t.contention()}; {reps} repetitions; {compiled_loops()}.")
    group.rows += rows(t, list(fns), cfg["batch"] * steps, same)
    set_blas_threads(threads)
    torch.set_num_threads(threads)
    group.load_after = load()
    return group
