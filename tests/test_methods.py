"""The four methods by name (tbptt.methods), saving and resuming RTRL, UORO and ARTBP exactly, and
the bias/variance/cost comparison (tbptt.analysis.estimators)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from reference import Problem, assert_close

import tbptt
from tbptt import SGD, Adam, InputError, Truncation
from tbptt.analysis.estimators import FIELDS, Method, compare, mean_window, table
from tbptt.methods import frozen_gradients, make_trainer

TRAINERS = {
    "rtrl": {"k1": 3},
    "uoro": {"k1": 2, "rng": 4},
    "artbp": {"c": 0.3, "b": 2, "rng": 4},
    "artbp-callable": {"c": lambda L: min(1.0, 0.1 * L), "rng": 5},
}


def trainer(name, model, opt, **kw):
    method = name.split("-")[0]
    return make_trainer(method, model, opt, **kw, **TRAINERS[name])


def chunks(P, bounds):
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        yield P.x[lo:hi], P.y[lo:hi], P.mask[lo:hi], P.reset[lo:hi]


@pytest.mark.parametrize("name", TRAINERS)
@pytest.mark.parametrize("opt", [SGD(lr=0.05, momentum=0.9), Adam(lr=0.01)])
def test_save_load_resume_is_identical(tmp_path, name, opt):
    """Saving mid-stream and resuming in a new trainer (its own model and seed) gives the same
    parameters, bit for bit: influence, window and random state are all saved."""
    P = Problem(T=23, batch=2, h0=True, mask=True, reset=True, seed=30)
    bounds = [0, 5, 11, 15, 23]
    whole = trainer(name, P.model, opt, h0=P.h0, clip=1.0, reduction="mean")
    for x, y, mask, reset in chunks(P, bounds):
        whole.feed(x, y, mask=mask, reset=reset)
    whole.finish()
    first = trainer(name, P.model, opt, h0=P.h0, clip=1.0, reduction="mean")
    parts = list(chunks(P, bounds))
    for x, y, mask, reset in parts[:2]:
        first.feed(x, y, mask=mask, reset=reset)
    path = tmp_path / "run.npz"
    first.save(path)
    assert os.listdir(tmp_path) == ["run.npz"]
    other = Problem(T=1, batch=2, seed=99).model
    kw = {"rng": 123} if "rng" in TRAINERS[name] else {}
    options = {**TRAINERS[name], **kw}
    second = make_trainer(
        name.split("-")[0], other, opt, h0=P.h0, clip=1.0, reduction="mean", **options
    )
    second.load(path)
    assert second.t == 11
    for x, y, mask, reset in parts[2:]:
        second.feed(x, y, mask=mask, reset=reset)
    second.finish()
    for k, v in whole.model.params.items():
        assert np.array_equal(second.model.params[k], v), k
    assert second.updates == whole.updates


@pytest.mark.parametrize("name", ["rtrl", "uoro", "artbp"])
def test_load_refuses_other_settings_and_damaged_files(tmp_path, name):
    """A state from another method, other settings or another model, or a damaged file: a
    one-line InputError naming the file, and the trainer unchanged."""
    P = Problem(T=8, batch=2, seed=31)
    a = trainer(name, P.model, SGD(lr=0.1))
    a.feed(P.x[:5], P.y[:5])
    a.save(tmp_path / "a.npz")
    changed = {
        "rtrl": {"k1": 4},
        "uoro": {"k1": 3, "rng": 4},
        "artbp": {"c": 0.5, "b": 2, "rng": 4},
    }[name]
    b = make_trainer(name, P.model, SGD(lr=0.1), **changed)
    with pytest.raises(InputError, match="the saved run had") as err:
        b.load(tmp_path / "a.npz")
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    assert b.t == 0
    other = make_trainer("tbptt", P.model, SGD(lr=0.1), k1=2)
    with pytest.raises(InputError, match="state must be"):
        other.load(tmp_path / "a.npz")
    bigger = trainer(name, tbptt.ElmanRNN.init(n=4, m=2, p=2), SGD(lr=0.1))
    with pytest.raises(InputError, match="shapes"):
        bigger.load(tmp_path / "a.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(InputError, match="damaged"):
        b.load(tmp_path / "bad.npz")


def test_make_trainer_builds_every_method_and_refuses_foreign_options():
    """One call builds each trainer; an option the method does not take, or a missing k1/c, is a
    one-line InputError naming the method's options."""
    P = Problem(T=6, batch=2, seed=32)
    built = {
        "tbptt": make_trainer("tbptt", P.model, SGD(), k1=2, k2=4, loss="l2", clip=1.0),
        "rtrl": make_trainer("rtrl", P.model, SGD(), k1=2),
        "uoro": make_trainer("uoro", P.model, SGD(), k1=2, rng=0),
        "artbp": make_trainer("artbp", P.model, SGD(), c=0.2, rng=0),
    }
    for method, tr in built.items():
        tr.feed(P.x, P.y)
        tr.finish()
        assert tr.updates >= 1, method
    cases = [
        (
            ("uoro",),
            {"k1": 2, "c": 0.1},
            "method uoro does not take c; its options are k1, rng, eps",
        ),
        (("rtrl",), {"inject": "new"}, "method rtrl does not take inject"),
        (("artbp",), {"k1": 3, "c": 0.1}, "method artbp does not take k1"),
        (("artbp",), {}, "method artbp needs c"),
        (("tbptt",), {}, "method tbptt needs k1"),
        (("tbptt",), {"k1": 4, "k2": 2}, "k2 >= k1"),
        (("bptt",), {}, "method must be one of tbptt, rtrl, uoro, artbp"),
    ]
    for (method,), options, match in cases:
        with pytest.raises(InputError, match=match) as err:
            make_trainer(method, P.model, SGD(), **options)
        assert "\n" not in str(err.value)
        with pytest.raises(InputError, match=match):
            frozen_gradients(method, P.model, P.x, P.y, **options)


def test_frozen_gradients_by_name():
    """frozen_gradients dispatches to the four estimators with their options."""
    P = Problem(T=9, batch=2, reset=True, seed=33)
    want = tbptt.gradients(P.model, P.x, P.y, tbptt.Truncation(2, 4, flush=True), reset=P.reset)
    want.pop("h0")
    assert_close(frozen_gradients("tbptt", P.model, P.x, P.y, reset=P.reset, k1=2, k2=4), want)
    got = frozen_gradients("artbp", P.model, P.x, P.y, reset=P.reset, c=0.4, rng=3)
    assert_close(got, tbptt.artbp_gradients(P.model, P.x, P.y, c=0.4, rng=3, reset=P.reset))
    got = frozen_gradients("uoro", P.model, P.x, P.y, reset=P.reset, rng=3)
    assert_close(got, tbptt.uoro_gradients(P.model, P.x, P.y, rng=3, reset=P.reset))


def test_compare_measures_bias_and_variance():
    """RTRL is exact with no variance; TBPTT(1, 1) has a bias and no variance; UORO's and ARTBP's
    measured bias lies within three times its noise sqrt(V / N) (a chance below 1e-2 each, normal
    approximation), and their variance is the sample variance of the draws."""
    P = Problem(T=10, batch=2, seed=34)
    methods = [
        Method("tbptt", {"k1": 1}),
        Method("rtrl"),
        Method("uoro"),
        Method("artbp", {"c": 0.3}),
    ]
    rows = compare(P.model, P.x, P.y, methods, draws=400, seed=1)
    byname = {r.method: r for r in rows}
    assert set(byname) == {"tbptt(k1=1, k2=1)", "rtrl", "uoro", "artbp(c=0.3)"}
    assert byname["rtrl"].bias < 1e-12 and byname["rtrl"].variance == 0
    tb = byname["tbptt(k1=1, k2=1)"]
    exact = tbptt.gradients(P.model, P.x, P.y)
    trunc = tbptt.gradients(P.model, P.x, P.y, tbptt.Truncation(1, 1, flush=True))
    from tbptt.analysis.estimators import flatten

    want = np.linalg.norm(flatten(trunc) - flatten(exact)) / np.linalg.norm(flatten(exact))
    assert abs(tb.bias - want) < 1e-12 and tb.variance == 0
    for name in ("uoro", "artbp(c=0.3)"):
        r = byname[name]
        assert r.variance > 0 and r.bias < 3 * r.noise and r.error > r.bias
    assert all(r.seconds_per_step > 0 for r in rows)
    assert byname["rtrl"].memory_per_stream == 2 * 3 * (3 * (3 + 2 + 1))
    assert set(rows[0].as_dict()) == set(FIELDS)
    assert table(rows).splitlines()[0].split()[:3] == ["method", "draws", "bias"]
    assert mean_window({"c": 0.25}, 1000) == pytest.approx(4.0)
    assert mean_window({"c": 0.0}, 50) == 50


@pytest.mark.parametrize("name", ["rtrl", "uoro", "artbp"])
def test_float32_trainers_resume_exactly(tmp_path, name):
    """The same in float32, the command line's default dtype: a saved float32 run loads (its
    float64 counters are not parameters) and ends where the uninterrupted one ends."""
    P = Problem(T=12, batch=2, mask=True, seed=31)
    f32 = {k: v.astype(np.float32) for k, v in P.model.params.items()}
    x, y, mask = P.x.astype(np.float32), P.y.astype(np.float32), P.mask.astype(np.float32)

    def fresh():
        return trainer(name, tbptt.ElmanRNN(**f32), SGD(lr=0.05), reduction="mean")

    whole = fresh()  # the same chunks: UORO sums its rank-one terms a chunk at a time
    whole.feed(x[:5], y[:5], mask=mask[:5])
    whole.feed(x[5:], y[5:], mask=mask[5:])
    first = fresh()
    first.feed(x[:5], y[:5], mask=mask[:5])
    first.save(tmp_path / "run.npz")
    second = fresh()
    second.load(tmp_path / "run.npz")
    second.feed(x[5:], y[5:], mask=mask[5:])
    for k, v in whole.model.params.items():
        assert v.dtype == np.float32 and np.array_equal(second.model.params[k], v), k


class WholeWindows:
    """A toy method for the extension point: every k steps, the exact gradient of the last k
    steps' losses, computed again from their inputs by tbptt.gradients (what TBPTT(k, k) with
    flush computes by its own rule)."""

    name = "WholeWindows"
    format = "test.WholeWindows/1"
    dense_inputs = True
    saved_floats: tuple[str, ...] = ()

    def __init__(self, *, k: int) -> None:
        self.k, self.pieces, self.h_start = k, [], None

    def bind(self, model) -> None:
        pass

    def start(self, trainer, h0) -> None:
        self.h_start = h0.copy()

    def due(self, trainer, T: int) -> list[int]:
        return list(range((trainer.t // self.k + 1) * self.k, trainer.t + T + 1, self.k))

    def run(self, trainer, x, y, mask, reset):
        traj, l, _ = trainer.forward(x, y, mask, reset)
        self.pieces.append((x, y))
        return traj, l

    def gradient(self, trainer, final: bool):
        x, y = (np.concatenate(a) for a in zip(*self.pieces, strict=True))
        grads = tbptt.gradients(trainer.model, x, y, h0=self.h_start, loss=trainer.loss)
        grads.pop("h0")
        return grads, float(x.shape[0] * x.shape[1])

    def updated(self, trainer) -> None:
        self.pieces, self.h_start = [], trainer.h.copy()

    def final(self, trainer) -> bool:
        return bool(self.pieces)

    def state_dict(self, trainer) -> dict:
        return {"u_prev": np.asarray(trainer.u_prev)}

    def read(self, state, trainer):
        return int(state["u_prev"]), lambda: None


class TorchWholeWindows:
    """The same toy method as a rule of the torch shell (tbptt.torch.rule.Rule): pieces end every
    k steps; each update runs the window's steps again from the state it started with, with the
    live parameters, and backpropagates their losses in one backward() (what TBPTT(k, k) with
    flush computes from its kept graphs). Uses only the shell's public view."""

    name = "WholeWindows"
    format = "test.TorchWholeWindows/1"

    def __init__(self, *, k: int) -> None:
        self.truncation = Truncation(k, k, flush=True)
        self.pieces: list[tuple] = []  # (x, y, mask, reset) of the window's steps
        self.start = None  # the state the window started from, detached

    def bind(self, shell) -> None:
        pass

    def settings(self, shell) -> dict[str, int]:
        return {"k": self.truncation.k1}

    def boundary(self, shell) -> int:
        return self.truncation.next_update(shell.t)

    def run(self, shell, x, y, mask, reset):
        import torch

        if not self.pieces:
            self.start = shell.state
        self.pieces.append(tuple(v if v is None else v.clone() for v in (x, y, mask, reset)))
        with torch.no_grad():
            losses, state = shell.losses(x, y, mask, reset, shell.carried)
        return losses.sum(dtype=torch.float64), state

    def due(self, shell):
        tr = self.truncation
        return tr.window(shell.t, shell.u_prev) if tr.is_update(shell.t) else None

    def final(self, shell):
        return self.truncation.flush_window(shell.t)

    def gradient(self, shell, w, mean: bool) -> float:
        import torch

        def cat(i: int):
            parts = [p[i] for p in self.pieces]
            return None if parts[0] is None else torch.cat(parts, dim=shell.tdim)

        x, y, mask, reset = (cat(i) for i in range(4))
        losses, _ = shell.losses(x, y, mask, reset, self.start)
        shell.backward(losses.sum())
        if not mean:
            return 0.0
        return float(mask.sum()) if mask is not None else float(losses.numel())

    def after(self, shell, w) -> None:
        if w is not None:
            self.pieces, self.start = [], None

    def release(self, shell, finished: bool) -> None:
        if finished:
            self.pieces, self.start = [], None

    def state_dict(self, shell) -> dict:
        return {"state": shell.state, "segments": [], "pieces": self.pieces, "start": self.start}

    def stream_dims(self, shell, state, batch: int):
        return shell.stream_dims(state, batch)

    def read(self, shell, sd: dict):
        def restore():
            self.pieces, self.start = list(sd["pieces"]), sd["start"]
            return sd["state"]

        return restore


@pytest.fixture
def toy_method():
    """The toy method in the table for one test, then out of it."""
    from tbptt.methods import METHODS, Method, Option, register

    register(
        Method(
            name="whole",
            summary="toy: exact gradients of disjoint windows of k steps",
            options=(Option(name="k", flag="--whole-k"),),
            rules={"numpy": WholeWindows, "torch": TorchWholeWindows},
            memory=lambda n, m, p, o, T: float(o["k"] * (n + m + p)),
            flops=lambda n, m, p, o: 0.0,
        )
    )
    yield "whole"
    METHODS.pop("whole")


def test_a_toy_method_trains_through_the_extension_point(toy_method) -> None:
    """A method defined here, registered in the table, trains with the numpy shell by name
    (make_trainer) and equals TBPTT(k, k) with flush, its independent reference (1e-12); the
    table's consumers (option checks, labels, cost models) know it."""
    from tbptt.analysis.estimators import Method as Row
    from tbptt.analysis.estimators import memory

    P = Problem(T=23, batch=3, seed=5)
    toy = make_trainer(toy_method, P.model.copy(), Adam(lr=0.01), clip=1.0, k=4)
    ref = tbptt.TBPTT(P.model.copy(), Truncation(4, 4, flush=True), Adam(lr=0.01), clip=1.0)
    for a, b in ((0, 5), (5, 6), (6, 17), (17, 23)):
        toy.feed(P.x[a:b], P.y[a:b])
        ref.feed(P.x[a:b], P.y[a:b])
    toy.finish()
    ref.finish()
    assert toy.updates == ref.updates == 6
    for k, v in ref.model.params.items():
        np.testing.assert_allclose(toy.model.params[k], v, rtol=1e-12, atol=1e-14)
    with pytest.raises(InputError, match="method whole does not take c; its options are k"):
        make_trainer(toy_method, P.model.copy(), Adam(), c=0.1)
    assert Row(toy_method, {"k": 4}).label() == "whole(k=4)"
    assert memory(Row(toy_method, {"k": 4}), P.model, 23) == 4 * (P.model.n + P.model.m + 2)


def test_a_toy_method_trains_with_the_torch_shell(toy_method) -> None:
    """The same toy method, by name through tbptt.torch's make_trainer, trains any nn.Module with
    the torch shell (resets and a mask included; the mean reduction; clipping; Adam) and equals
    tbptt.torch.TBPTT(k, k) with flush, its independent reference (1e-12); saved mid-window and
    loaded into a fresh trainer, it goes on as the uninterrupted run."""
    torch = pytest.importorskip("torch")
    from tbptt.torch.methods import make_trainer as torch_trainer

    torch.manual_seed(0)
    net = torch.nn.GRU(3, 5).double()
    model = tbptt.torch.Recurrent(net, torch.nn.Linear(5, 2).double())
    T, batch = 23, 4
    x = torch.randn(T, batch, 3, dtype=torch.float64)
    y = torch.randn(T, batch, 2, dtype=torch.float64)
    mask = (torch.rand(T, batch) < 0.8).double()
    reset = torch.rand(T, batch) < 0.1

    def trainer(kind: str):
        m = __import__("copy").deepcopy(model)
        opt = torch.optim.Adam(m.parameters(), lr=0.01)
        if kind == "toy":
            return torch_trainer(toy_method, m, opt, clip=1.0, reduction="mean", k=4)
        tr = Truncation(4, 4, flush=True)
        return tbptt.torch.TBPTT(m, tr, opt, clip=1.0, reduction="mean")

    toy, ref = trainer("toy"), trainer("ref")
    cuts = ((0, 5), (5, 6), (6, 17), (17, 23))
    for d in (toy, ref):
        for a, b in cuts:
            d.feed(x[a:b], y[a:b], mask=mask[a:b], reset=reset[a:b])
        d.finish()
    assert toy.updates == ref.updates == 6
    for (name, p), q in zip(toy.model.named_parameters(), ref.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)

    whole, first = trainer("toy"), trainer("toy")
    for d, parts in ((whole, cuts), (first, cuts[:2])):
        for a, b in parts:
            d.feed(x[a:b], y[a:b], mask=mask[a:b], reset=reset[a:b])
    second = trainer("toy")
    second.load_state_dict(first.state_dict())
    for a, b in cuts[2:]:
        second.feed(x[a:b], y[a:b], mask=mask[a:b], reset=reset[a:b])
    for d in (whole, second):
        d.finish()
    for p, q in zip(second.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(p, q)
