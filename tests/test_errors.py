"""Bad input is a clear error naming the argument; non-finite training stops cleanly (issue 2.6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import OnlineTBPTT, Problem

import tbptt
from tbptt import SGD, TBPTT, Adam, ElmanRNN, NonFiniteError, Truncation

n, m, p, T = 3, 2, 2, 5
MODEL = ElmanRNN.init(n=n, m=m, p=p, seed=0)
SOFTMAX = ElmanRNN.init(n=n, m=m, p=p, g="softmax", seed=0)
X, Y = np.zeros((T, m)), np.zeros((T, p))
XB, YB = np.zeros((T, 2, m)), np.zeros((T, 2, p))


def with_value(a: np.ndarray, index: tuple, value: float) -> np.ndarray:
    out = np.array(a, dtype=np.float64)
    out[index] = value
    return out


def names(arg: str) -> str:
    """A regex matching the argument's name as a word of the message."""
    return rf"(?<![\w.]){arg}(?!\w)"


# -- gradients / total_loss: shapes, dtypes, non-finite values ----------------------------------
BAD_DATA = {
    "x-features": (dict(x=np.zeros((T, m + 1))), ValueError, "x"),
    "x-1d": (dict(x=np.zeros(T)), ValueError, "x"),
    "x-4d": (dict(x=np.zeros((T, 1, 1, m))), ValueError, "x"),
    "x-strings": (dict(x=np.full((T, m), "a")), TypeError, "x"),
    "x-complex": (dict(x=np.zeros((T, m), complex)), TypeError, "x"),
    "x-object": (dict(x=[[0.0, 1.0], [2.0]]), TypeError, "x"),
    "x-nan": (dict(x=with_value(X, (2, 1), np.nan)), ValueError, "x"),
    "x-inf": (dict(x=with_value(X, (0, 0), np.inf)), ValueError, "x"),
    "y-features": (dict(y=np.zeros((T, p + 1))), ValueError, "y"),
    "y-length": (dict(y=np.zeros((T - 1, p))), ValueError, "y"),
    "y-batch": (dict(x=XB, y=np.zeros((T, 3, p))), ValueError, "y"),
    "y-strings": (dict(y=np.full((T, p), "a")), TypeError, "y"),
    "y-nan": (dict(y=with_value(Y, (1, 1), np.nan)), ValueError, "y"),
    "y-inf": (dict(y=with_value(Y, (4, 0), -np.inf)), ValueError, "y"),
    "h0-shape": (dict(h0=np.zeros(n + 1)), ValueError, "h0"),
    "h0-batch": (dict(x=XB, y=YB, h0=np.zeros((3, n))), ValueError, "h0"),
    "h0-nan": (dict(h0=with_value(np.zeros(n), (1,), np.nan)), ValueError, "h0"),
    "h0-inf": (dict(h0=with_value(np.zeros(n), (0,), np.inf)), ValueError, "h0"),
    "h0-strings": (dict(h0=np.full(n, "a")), TypeError, "h0"),
    "mask-shape": (dict(mask=np.ones(T + 1)), ValueError, "mask"),
    "mask-nan": (dict(mask=with_value(np.ones(T), (0,), np.nan)), ValueError, "mask"),
    "mask-negative": (dict(mask=with_value(np.ones(T), (3,), -1.0)), ValueError, "mask"),
    "reset-shape": (dict(reset=np.zeros((T, 2), bool)), ValueError, "reset"),
    "reset-dtype": (dict(reset=np.zeros(T)), TypeError, "reset"),
    "loss-name": (dict(loss="mse"), ValueError, "loss"),
    "ce-needs-softmax": (dict(loss="cross_entropy", y=np.zeros(T, int)), ValueError, "g"),
}


@pytest.mark.parametrize("case", BAD_DATA)
@pytest.mark.parametrize("fn", ["gradients", "total_loss"])
def test_bad_data_is_rejected_naming_the_argument(case, fn):
    """Wrong shapes, dtypes, NaN/inf and unknown names raise the right type naming the argument."""
    kwargs, exc, arg = BAD_DATA[case]
    kwargs = {"x": X, "y": Y, **kwargs}
    with pytest.raises(exc, match=names(arg)):
        getattr(tbptt, fn)(MODEL, **kwargs)


def test_a_batch_first_array_is_named_as_such_where_the_shapes_tell():
    """tbptt reads (4, 20, 3) as T = 4 steps of 20 streams: what it documents. Where another
    argument's shape is the time-major one with T and batch swapped (a batch-first array beside a
    time-major one), the error says "time-major (T, batch, m)" and "batch-first"; valid time-major
    input with T < batch is accepted without a word."""
    assert "time-major (T, batch, m)" in tbptt.gradients.__doc__
    batch, steps = 4, 20
    x_bf = np.zeros((batch, steps, m))  # batch-first: (batch, T, m)
    y_tm, h0 = np.zeros((steps, batch, p)), np.zeros((batch, n))
    for kwargs in (
        dict(x=x_bf, y=y_tm),  # y time-major beside a batch-first x
        dict(x=x_bf, y=np.zeros((batch, steps, p)), h0=h0),  # h0 has one row per stream
        dict(x=x_bf, y=np.zeros((batch, steps, p)), mask=np.ones((steps, batch))),
        dict(x=np.zeros((steps, batch, m)), y=np.zeros((batch, steps, p))),  # y batch-first
    ):
        with pytest.raises(ValueError) as info:
            tbptt.gradients(MODEL, **kwargs)
        assert "time-major (T, batch" in str(info.value) and "batch-first" in str(info.value)
    with pytest.raises(ValueError, match=r"time-major \(T, batch, m\)"):
        tbptt.gradients(MODEL, np.zeros((steps, batch, m + 1)), y_tm)
    x_tm, short = np.zeros((batch, steps, m)), np.zeros((batch, steps, p))  # T=4 < batch=20
    assert tbptt.gradients(MODEL, x_tm, short, h0=np.zeros((steps, n)))["A"].shape == (n, n)


BAD_TARGETS = {
    "too-large": (np.full(T, p), ValueError),
    "negative": (np.full(T, -1), ValueError),
    "float": (np.zeros(T), TypeError),
    "shape": (np.zeros((T, p), int), ValueError),
}


@pytest.mark.parametrize("case", BAD_TARGETS)
def test_cross_entropy_targets_checked(case):
    """Cross-entropy targets must be integer class indices 0 <= y < p, one per step."""
    y, exc = BAD_TARGETS[case]
    with pytest.raises(exc, match=names("y")):
        tbptt.gradients(SOFTMAX, X, y, loss="cross_entropy")


def test_cross_entropy_error_gives_the_offending_index():
    """An out-of-range target's message says which value and what range was expected."""
    y = np.zeros(T, int)
    y[3] = 7
    with pytest.raises(ValueError, match=r"7.*0 <= y < 2"):
        tbptt.gradients(SOFTMAX, X, y, loss="cross_entropy")


def test_gradients_checks_model_and_truncation_types():
    """model must be an ElmanRNN and truncation a Truncation or None."""
    with pytest.raises(TypeError, match=names("model")):
        tbptt.gradients(MODEL.params, X, Y)
    with pytest.raises(TypeError, match=names("truncation")):
        tbptt.gradients(MODEL, X, Y, (2, 3))


# -- the model ----------------------------------------------------------------------------------
A, B, C = MODEL.A, MODEL.B, MODEL.C
BAD_MODELS = {
    "A-not-square": (dict(A=np.zeros((n, n + 1))), ValueError, "A"),
    "A-1d": (dict(A=np.zeros(n)), ValueError, "A"),
    "A-int": (dict(A=np.zeros((n, n), int)), TypeError, "A"),
    "A-nan": (dict(A=with_value(A, (0, 0), np.nan)), ValueError, "A"),
    "B-rows": (dict(B=np.zeros((n + 1, m))), ValueError, "B"),
    "C-cols": (dict(C=np.zeros((p, n + 1))), ValueError, "C"),
    "C-inf": (dict(C=with_value(C, (1, 1), np.inf)), ValueError, "C"),
    "b-shape": (dict(b=np.zeros(n + 1)), ValueError, "b"),
    "c-shape": (dict(c=np.zeros(p + 1)), ValueError, "c"),
    "mixed-dtypes": (dict(B=B.astype(np.float32)), TypeError, "B"),
    "f-name": (dict(f="softplus"), ValueError, "f"),
    "f-softmax": (dict(f="softmax"), ValueError, "f"),
    "g-name": (dict(g="exp"), ValueError, "g"),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_model_is_rejected_naming_the_argument(case):
    """Wrong parameter shapes, dtypes, non-finite entries and unknown activations are errors."""
    kwargs, exc, arg = BAD_MODELS[case]
    with pytest.raises(exc, match=names(arg)):
        ElmanRNN(**{"A": A, "B": B, "C": C, **kwargs})


def test_model_replace_and_init_checked():
    """replace() refuses unknown parameters; init() checks sizes and dtype."""
    with pytest.raises(ValueError, match="Z"):
        MODEL.replace(Z=np.zeros(2))
    with pytest.raises(ValueError, match=names("n")):
        ElmanRNN.init(n=0, m=m, p=p)
    with pytest.raises(ValueError, match=names("m")):
        ElmanRNN.init(n=n, m=1.5, p=p)
    with pytest.raises(TypeError, match=names("dtype")):
        ElmanRNN.init(n=n, m=m, p=p, dtype=np.int32)


# -- the schedule -------------------------------------------------------------------------------
BAD_SCHEDULES = {
    "k1-zero": (dict(k1=0, k2=3), ValueError, "k1"),
    "k1-negative": (dict(k1=-2, k2=3), ValueError, "k1"),
    "k2-zero": (dict(k1=1, k2=0, inject="window"), ValueError, "k2"),
    "k1-float": (dict(k1=2.0, k2=3), TypeError, "k1"),
    "k2-float": (dict(k1=2, k2=3.5), TypeError, "k2"),
    "k1-string": (dict(k1="2", k2=3), TypeError, "k1"),
    "k1-bool": (dict(k1=True, k2=3), TypeError, "k1"),
    "k2-none": (dict(k1=2, k2=None), TypeError, "k2"),
    "k2-below-k1-new": (dict(k1=4, k2=3), ValueError, "k2"),
    "inject-name": (dict(k1=2, k2=3, inject="all"), ValueError, "inject"),
    "flush-int": (dict(k1=2, k2=3, flush=1), TypeError, "flush"),
}


@pytest.mark.parametrize("case", BAD_SCHEDULES)
def test_bad_schedule_is_rejected_naming_the_argument(case):
    """k1, k2 not integers >= 1, k2 < k1 with inject='new', unknown inject: clear errors."""
    kwargs, exc, arg = BAD_SCHEDULES[case]
    with pytest.raises(exc, match=names(arg)):
        Truncation(**kwargs)


def test_k2_below_k1_allowed_for_window_and_last():
    """k2 < k1 is an error only with inject='new' (the others skip losses by design)."""
    assert len(Truncation(4, 2, "window").windows(8)) == 2
    assert len(Truncation(4, 2, "last").windows(8)) == 2


@pytest.mark.parametrize("bad", [-1, 2.5, "3"])
def test_bad_sequence_length(bad):
    """windows(T) needs an integer T >= 0."""
    with pytest.raises(ValueError, match=names("T")):
        Truncation(2, 3).windows(bad)


# -- optimizers and the online trainer ----------------------------------------------------------
BAD_OPTIMIZERS = {
    "sgd-lr-zero": (lambda: SGD(lr=0), ValueError, "lr"),
    "sgd-lr-nan": (lambda: SGD(lr=math.nan), ValueError, "lr"),
    "sgd-lr-string": (lambda: SGD(lr="0.1"), TypeError, "lr"),
    "sgd-momentum": (lambda: SGD(momentum=-0.5), ValueError, "momentum"),
    "adam-lr": (lambda: Adam(lr=-1e-3), ValueError, "lr"),
    "adam-beta1": (lambda: Adam(beta1=1.0), ValueError, "beta1"),
    "adam-beta2": (lambda: Adam(beta2=-0.1), ValueError, "beta2"),
    "adam-eps": (lambda: Adam(eps=0.0), ValueError, "eps"),
}


@pytest.mark.parametrize("case", BAD_OPTIMIZERS)
def test_bad_optimizer_settings(case):
    """Optimizer settings out of range are errors naming the setting."""
    make, exc, arg = BAD_OPTIMIZERS[case]
    with pytest.raises(exc, match=names(arg)):
        make()


BAD_TRAINERS = {
    "model": (lambda: TBPTT(MODEL.params, Truncation(2, 3), SGD()), TypeError, "model"),
    "truncation": (lambda: TBPTT(MODEL, (2, 3), SGD()), TypeError, "truncation"),
    "optimizer": (lambda: TBPTT(MODEL, Truncation(2, 3), "sgd"), TypeError, "optimizer"),
    "loss": (lambda: TBPTT(MODEL, Truncation(2, 3), SGD(), loss="l1"), ValueError, "loss"),
    "clip-zero": (lambda: TBPTT(MODEL, Truncation(2, 3), SGD(), clip=0), ValueError, "clip"),
    "clip-string": (lambda: TBPTT(MODEL, Truncation(2, 3), SGD(), clip="1"), ValueError, "clip"),
}


@pytest.mark.parametrize("case", BAD_TRAINERS)
def test_bad_trainer_arguments(case):
    """TBPTT checks its model, schedule, optimizer, loss and clip."""
    make, exc, arg = BAD_TRAINERS[case]
    with pytest.raises(exc, match=names(arg)):
        make()


@pytest.mark.parametrize(
    "case", ["x-features", "x-nan", "y-inf", "mask-shape", "mask-negative", "reset-dtype"]
)
def test_online_feed_checks_data(case):
    """feed() validates each chunk like gradients() does."""
    kwargs, exc, arg = BAD_DATA[case]
    kwargs = {"x": X, "y": Y, **kwargs}
    trainer = TBPTT(MODEL, Truncation(2, 3), SGD())
    with pytest.raises(exc, match=names(arg)):
        trainer.feed(**kwargs)


@pytest.mark.parametrize("h0", [np.zeros(n + 1), with_value(np.zeros(n), (2,), np.nan)])
def test_online_h0_checked(h0):
    """A bad h0 given to TBPTT is reported by name at the latest at the first chunk."""
    with pytest.raises(ValueError, match=names("h0")):
        TBPTT(MODEL, Truncation(2, 3), SGD(), h0=h0).feed(X, Y)


def test_online_cross_entropy_needs_softmax():
    """Training with cross-entropy on a model whose g is not softmax is an error naming g."""
    with pytest.raises(ValueError, match=names("g")):
        TBPTT(MODEL, Truncation(2, 3), SGD(), loss="cross_entropy").feed(X, np.zeros(T, int))


@pytest.mark.parametrize(("first", "second"), [(2, 3), (2, 1), (1, 3)])
def test_online_batch_size_change_raises(first, second):
    """A chunk whose number of streams differs from the first chunk's is an error naming x."""
    trainer = TBPTT(MODEL, Truncation(2, 3), SGD())
    trainer.feed(np.zeros((T, first, m)), np.zeros((T, first, p)))
    with pytest.raises(ValueError, match=names("x")):
        trainer.feed(np.zeros((T, second, m)), np.zeros((T, second, p)))


def test_online_feed_after_finish_raises():
    """Once finished, a trainer refuses more data: an InputError (not a RuntimeError) naming
    feed after finish()."""
    trainer = TBPTT(MODEL, Truncation(2, 3), SGD())
    trainer.feed(X, Y)
    trainer.finish()
    with pytest.raises(tbptt.InputError, match=r"^feed after finish\(\): the stream was finished"):
        trainer.feed(X, Y)


def test_load_refuses_other_parameters(tmp_path):
    """Loading a state saved from a model with other parameters is an error."""
    with_bias = TBPTT(MODEL, Truncation(2, 3), SGD())
    with_bias.feed(X, Y)
    with_bias.save(tmp_path / "a.npz")
    no_bias = TBPTT(ElmanRNN.init(n=n, m=m, p=p, bias=False), Truncation(2, 3), SGD())
    with pytest.raises(ValueError, match="parameters"):
        no_bias.load(tmp_path / "a.npz")


# -- non-finite values during training ----------------------------------------------------------
def exploding_relu(scale: float = 1e100) -> ElmanRNN:
    """relu with A = scale * I and positive B, C: the state grows by `scale` each step."""
    return ElmanRNN(scale * np.eye(2), np.ones((2, 1)), np.ones((1, 2)), f="relu")


def first_bad_step(model: ElmanRNN, x: np.ndarray, y: np.ndarray) -> int:
    """The first 1-based step whose state or L2 loss is not finite (plain numpy, from h_0 = 0)."""
    h = np.zeros(model.n)
    with np.errstate(all="ignore"):
        for t in range(len(x)):
            h = np.maximum(model.A @ h + model.B @ x[t], 0)
            l = 0.5 * np.sum((model.C @ h - y[t]) ** 2)
            if not (np.isfinite(h).all() and np.isfinite(l)):
                return t + 1
    raise AssertionError("no overflow")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("chunks", [[8], [1] * 8, [3, 5]])
def test_forward_overflow_raises_nonfinite_error_with_its_step(chunks):
    """relu with a huge A overflows: NonFiniteError names the first bad step, parameters
    unchanged."""
    model = exploding_relu()
    x, y = np.ones((8, 1)), np.zeros((8, 1))
    bad = first_bad_step(model, x, y)
    assert 1 < bad < 8
    trainer = TBPTT(model, Truncation(10, 10), SGD(lr=0.1))  # no update before the overflow
    with pytest.raises(NonFiniteError, match=str(bad)) as info:
        t = 0
        for c in chunks:
            trainer.feed(x[t : t + c], y[t : t + c])
            t += c
    assert info.value.step == bad
    for k, v in model.params.items():
        assert np.array_equal(trainer.model.params[k], v)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_update_to_infinite_parameters_raises_and_keeps_last_finite():
    """An update that makes parameters infinite raises NonFiniteError at the update step and
    leaves the parameters at their values before it."""
    P = Problem(T=6, batch=2, f="relu", seed=70)
    trainer = TBPTT(P.model, Truncation(3, 3), SGD(lr=1e308))
    with pytest.raises(NonFiniteError) as info:
        trainer.feed(P.x, P.y)
    assert info.value.step == 3
    for k, v in P.model.params.items():
        assert np.array_equal(trainer.model.params[k], v)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_huge_learning_rate_blows_up_after_an_update():
    """relu, huge A and lr: the step at which training turns non-finite is reported and the
    parameters are those of the last finite update (checked against the autograd twin)."""
    P = Problem(T=12, batch=2, f="relu", scale=3.0, seed=71)
    tr, opt = Truncation(2, 3, "new"), SGD(lr=1e120)
    ref = OnlineTBPTT(P.model, tr, opt)
    bad, last_finite = None, P.model.params
    with np.errstate(all="ignore"):
        for t in range(P.T):  # the twin never raises: find the first non-finite step ourselves
            loss = ref.feed(P.x[t : t + 1], P.y[t : t + 1])
            params = ref.params
            if not (
                math.isfinite(loss)
                and bool(torch.isfinite(ref.h).all())
                and all(np.isfinite(v).all() for v in params.values())
            ):
                bad = t + 1
                break
            last_finite = params
    assert bad is not None and bad > 2  # at least one finite update came first
    trainer = TBPTT(P.model, tr, opt)
    with pytest.raises(NonFiniteError) as info:
        trainer.feed(P.x, P.y)
    assert info.value.step == bad
    for k, v in last_finite.items():
        assert np.all(np.isfinite(trainer.model.params[k]))
        np.testing.assert_allclose(trainer.model.params[k], v, rtol=1e-10)


# -- loading a state that does not belong (issue 13) --------------------------------------------
@pytest.mark.parametrize(
    ("other", "words"),
    [
        (dict(truncation=Truncation(2, 4)), "schedule"),
        (dict(truncation=Truncation(2, 3, "window")), "schedule"),
        (dict(model=ElmanRNN.init(n=n + 1, m=m, p=p, g="softmax", seed=0)), "shapes"),
        (dict(loss="cross_entropy"), "loss"),
    ],
    ids=["k2", "inject", "hidden-size", "loss"],
)
def test_load_refuses_a_state_of_another_trainer(tmp_path, other, words):
    """A state saved with another schedule, hidden size or loss is refused, naming what differs,
    and the trainer is left as it was."""
    saved = TBPTT(SOFTMAX.copy(), Truncation(2, 3), SGD())
    saved.feed(XB, YB)
    saved.save(tmp_path / "a.npz")
    kw = {"model": SOFTMAX.copy(), "truncation": Truncation(2, 3), "loss": "l2", **other}
    trainer = TBPTT(kw.pop("model"), kw.pop("truncation"), SGD(), **kw)
    before = {k: v.copy() for k, v in trainer.model.params.items()}
    with pytest.raises(tbptt.InputError, match=words) as info:
        trainer.load(tmp_path / "a.npz")
    assert "a.npz" in str(info.value)
    assert trainer.t == 0 and all(
        np.array_equal(before[k], v) for k, v in trainer.model.params.items()
    )


def test_load_of_python_objects_never_suggests_allow_pickle(tmp_path):
    """An .npz holding an object array is refused naming the file, without advising
    allow_pickle=True (which would run the pickled code)."""
    from fractions import Fraction

    path = tmp_path / "objects.npz"
    np.savez(path, **{"model.A": np.array([Fraction(1, 3)], dtype=object)})
    with pytest.raises(tbptt.InputError, match="objects") as info:
        TBPTT(MODEL.copy(), Truncation(2, 3), SGD()).load(path)
    assert str(path) in str(info.value) and "allow_pickle" not in str(info.value)


def test_a_nan_target_at_a_masked_step_is_ignored():
    """y NaN where the mask is 0 is accepted and ignored (the gradient of y = 0 there); NaN where
    the mask is not 0 stays an error naming y."""
    y = np.arange(T * p, dtype=np.float64).reshape(T, p) / 10
    mask = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    nan = y.copy()
    nan[mask == 0] = np.nan
    got = tbptt.gradients(MODEL, X + 0.5, nan, mask=mask)
    want = tbptt.gradients(MODEL, X + 0.5, y, mask=mask)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-14)
    trainer = TBPTT(MODEL, Truncation(2, 3), SGD())
    trainer.feed(X + 0.5, nan, mask=mask)
    nan[2, 1] = np.nan
    with pytest.raises(ValueError, match=names("y")):
        trainer.feed(X, nan, mask=mask)
