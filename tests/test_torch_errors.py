"""Bad input to the torch driver gets a clear error naming the argument, the value and the
expectation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tbptt
from tbptt.torch import TBPTT, ElmanRNN, Recurrent, l2_loss

DT = torch.float64


def lstm() -> Recurrent:
    torch.manual_seed(0)
    return Recurrent(nn.LSTM(3, 4, num_layers=2), nn.Linear(4, 2)).to(DT)


def chunk(L: int = 6, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(L * 10 + batch)
    return torch.randn(L, batch, 3, generator=gen, dtype=DT), torch.randn(
        L, batch, 2, generator=gen, dtype=DT
    )


def driver(model: nn.Module | None = None, trunc=None, **kw) -> TBPTT:
    model = lstm() if model is None else model
    trunc = tbptt.Truncation(2, 5) if trunc is None else trunc
    return TBPTT(model, trunc, torch.optim.SGD(model.parameters(), lr=0.1), **kw)


def test_state0_of_the_wrong_shape() -> None:
    """An nn.LSTM state0 of another batch names state0 and the chunk's streams (issue 24 D3); of
    the right batch but other sizes, the module says which shapes it expected."""
    bad = (torch.zeros(2, 3, 4, dtype=DT), torch.zeros(2, 3, 4, dtype=DT))  # batch 3, data has 2
    d = driver(state0=bad)
    with pytest.raises(
        tbptt.InputError,
        match=r"^state0's tensor 0 of 2 has shape \(2, 3, 4\), but x has 2 streams \(batch\): "
        r"state0 must hold one state per stream, 2 along axis 1",
    ):
        d.feed(*chunk())
    assert d.batch is None and d.t == 0  # nothing ran: the next chunk starts the stream
    bad = (torch.zeros(2, 2, 5, dtype=DT), torch.zeros(2, 2, 5, dtype=DT))  # hidden 5, not 4
    d = driver(state0=bad)
    with pytest.raises(
        ValueError, match=r"state must be \(h, c\) of shapes \(\(2, 2, 4\), \(2, 2, 4\)\)"
    ):
        d.feed(*chunk())


def test_elman_state_of_the_wrong_shape() -> None:
    """ElmanRNN names the expected (batch, n) shape."""
    net = ElmanRNN(n=4, m=3, p=2, dtype=DT)
    d = driver(net, state0=torch.zeros(2, 5, dtype=DT))
    with pytest.raises(
        ValueError, match=r"state must have shape \(2, 4\) \(batch, n\), got \(2, 5\)"
    ):
        d.feed(*chunk())


class Growing(nn.Module):
    """Returns a state that grows by one row each call: it breaks the protocol's fixed shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, state):
        n = 1 if state is None else state.shape[0] + 1
        return self.lin(x), x.new_zeros(n, x.shape[1])


def test_state_that_changes_shape() -> None:
    """A module whose returned state changes shape between calls is refused."""
    d = driver(Growing().to(DT), tbptt.Truncation(2, 2))
    with pytest.raises(
        ValueError, match=r"the model returned a state of shapes \(2, 2\), before \(1, 2\)"
    ):
        d.feed(*chunk())


class NoState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, state):
        return self.lin(x)


class BadState(NoState):
    def forward(self, x, state):
        return self.lin(x), "hidden"


@pytest.mark.parametrize(
    "module, message",
    [
        (
            nn.Linear(3, 2),
            r"protocol model\(x, state\) -> \(output, new_state\); calling it raised",
        ),
        (NoState(), r"protocol .* got a Tensor"),
        (
            BadState(),
            r"the model's new_state must be a tensor or a tuple, list or dict of tensors, got str",
        ),
    ],
)
def test_module_that_breaks_the_protocol(module: nn.Module, message: str) -> None:
    """Modules that are not called as (x, state) -> (output, new_state) get a TypeError."""
    d = driver(module.to(DT))
    with pytest.raises(TypeError, match=message):
        d.feed(*chunk())


def test_non_finite_loss_names_the_update_and_leaves_parameters() -> None:
    """A finite target whose loss overflows: NonFiniteError with the update number; the
    parameters keep their values. (A NaN target is the input's fault: an InputError naming y.)"""
    d = driver(trunc=tbptt.Truncation(3, 3))
    x, y = chunk(12)
    d.feed(x[:6], y[:6])  # updates 1 and 2
    before = [p.detach().clone() for p in d.model.parameters()]
    y = y.clone()
    y[7, 1, 0] = 1e200
    with pytest.raises(
        tbptt.NonFiniteError,
        match=r"non-finite \(inf\) in steps 7\.\.9; update 3 \(after step 9\) was not applied",
    ) as info:
        d.feed(x[6:], y[6:])
    assert info.value.update == 3 and info.value.step == 9
    assert d.updates == 2
    for p, q in zip(d.model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_non_finite_gradient_with_finite_loss() -> None:
    """An infinite gradient behind a finite loss is caught before the optimizer steps too."""

    class Sqrt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1, dtype=DT))

        def forward(self, x, state):
            out = torch.sqrt(self.w * x[..., :2] ** 2)  # d sqrt(0) / dw = inf
            return out, x[-1, :, :1]

    d = driver(Sqrt(), tbptt.Truncation(2, 2))
    with pytest.raises(
        tbptt.NonFiniteError,
        match=r"gradient became non-finite at update 1 \(window of steps 1\.\.2\)",
    ):
        d.feed(*chunk())
    assert d.model.w.item() == 0.0 and d.updates == 0


def test_batch_size_change_mid_stream() -> None:
    """A chunk with another batch size is refused: the streams go on together."""
    d = driver()
    d.feed(*chunk(5, batch=2))
    with pytest.raises(ValueError, match="x has 3 streams .* started with 2"):
        d.feed(*chunk(5, batch=3))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"clip": -1.0}, ValueError, "clip must be a positive number or None, got -1.0"),
        ({"batch_first": 1}, TypeError, "batch_first must be a bool, got 1"),
        ({"amp": "yes"}, TypeError, "amp must be a bool or a torch.dtype, got 'yes'"),
        ({"loss_fn": 3}, TypeError, "loss_fn must be callable"),
        ({"scheduler": 3}, TypeError, "scheduler must have a step"),
        ({"state0": [1, 2]}, TypeError, r"state0\[0\] must be a tensor"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, message: str) -> None:
    """Constructor arguments are checked at the boundary."""
    with pytest.raises(error, match=message):
        driver(**kwargs)


def test_bad_objects() -> None:
    """A model, schedule or optimizer of the wrong kind, or a batch_first that disagrees."""
    net = lstm()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got int"):
        TBPTT(3, tbptt.Truncation(2, 2), opt)
    with pytest.raises(TypeError, match="truncation must be a tbptt.Truncation, got tuple"):
        TBPTT(net, (2, 2), opt)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got SGD"):
        TBPTT(net, tbptt.Truncation(2, 2), tbptt.SGD())
    bf = Recurrent(nn.LSTM(3, 4, batch_first=True))
    with pytest.raises(ValueError, match="batch_first=False but the model has batch_first=True"):
        TBPTT(bf, tbptt.Truncation(2, 2), torch.optim.SGD(bf.parameters(), lr=0.1))


def test_bad_chunks() -> None:
    """Targets, masks, resets and losses of the wrong shape or type, and feeding after finish()."""
    d = driver()
    x, y = chunk()
    with pytest.raises(
        ValueError, match=r"y must start with the shape \(6, 2\) of x \(L, batch\), got \(5, 2, 2\)"
    ):
        d.feed(x, y[:5])
    with pytest.raises(ValueError, match=r"mask must have shape \(6, 2\)"):
        d.feed(x, y, mask=torch.ones(6))
    with pytest.raises(TypeError, match="reset must be a bool tensor, got dtype torch.int64"):
        d.feed(x, y, reset=torch.zeros(6, 2, dtype=torch.long))
    bad = driver(loss_fn=lambda out, y: ((out - y) ** 2).sum())
    with pytest.raises(
        ValueError,
        match=r"loss_fn must return per-step, per-stream losses shaped like x's first two axes "
        r"\(L, batch\), \(6, 2\) for the chunk x of shape \(6, 2, 3\); the driver calls it on "
        r"pieces of the chunk, here 1 of its 6 steps: \(1, 2\); got \(\)",
    ):
        bad.feed(x, y)
    d.feed(x, y)
    d.finish()
    with pytest.raises(tbptt.InputError, match=r"^feed after finish\(\): the stream was finished"):
        d.feed(x, y)


def test_targets_of_the_wrong_shape_are_an_error_not_a_broadcast():
    """l2_loss and cross_entropy_loss refuse targets that would broadcast to another loss."""
    import pytest
    import torch

    from tbptt.torch import cross_entropy_loss, l2_loss

    out = torch.zeros(3, 3, 1, dtype=torch.float64)
    for y in (torch.zeros(3, 3), torch.zeros(3, 3, 4), torch.zeros(3, 3, 0)):
        with pytest.raises(ValueError, match="shape"):
            l2_loss(out, y)
    logits = torch.zeros(3, 2, 5)
    with pytest.raises(ValueError, match="integer class indices"):
        cross_entropy_loss(logits, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="integer class indices"):
        cross_entropy_loss(logits, torch.zeros(3, 5, dtype=torch.long))
    assert torch.equal(l2_loss(out + 1, out), torch.full((3, 3), 0.5, dtype=torch.float64))


def test_a_step_that_makes_the_parameters_non_finite_is_reported_and_never_saved(tmp_path):
    """Section 6: a finite gradient with too large a step: NonFiniteError naming that update
    as soon as its effect shows (the next losses, before the next update), and save refuses
    the values, so no checkpoint holds them."""
    torch.manual_seed(0)
    net = ElmanRNN(n=4, m=3, p=2, dtype=DT)
    driver = TBPTT(net, tbptt.Truncation(2, 2), torch.optim.SGD(net.parameters(), lr=1e308))
    x, y = torch.randn(6, 2, 3, dtype=DT), 1e3 * torch.randn(6, 2, 2, dtype=DT)  # large gradient
    with pytest.raises(tbptt.NonFiniteError, match="parameters became non-finite at update 1"):
        driver.feed(x, y)
    assert driver.updates == 1  # update 2 never ran
    with pytest.raises(tbptt.NonFiniteError, match="not saved"):
        driver.save(tmp_path / "run.pt")
    assert not list(tmp_path.iterdir())


# -- misuse that used to reach the user as torch's RuntimeError (issue 13) ----------------------
class DetachedOutput(nn.Module):
    """An ElmanRNN whose output is cut from the graph (a `.detach()` in the wrong place)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ElmanRNN(n=4, m=3, p=2, dtype=DT, seed=0)

    def forward(self, x, state):
        out, state = self.inner(x, state)
        return out.detach(), state


def detached_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return l2_loss(out, y).detach()


def integer_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (l2_loss(out, y) > 0.5).long()


@pytest.mark.parametrize(
    ("model", "loss_fn", "words"),
    [
        (DetachedOutput, l2_loss, "detached"),
        (lambda: ElmanRNN(n=4, m=3, p=2, dtype=DT, seed=0), detached_loss, "detached"),
        (lambda: ElmanRNN(n=4, m=3, p=2, dtype=DT, seed=0), integer_loss, "floating-point"),
    ],
    ids=["detached-output", "detached-loss", "integer-losses"],
)
def test_losses_that_cannot_be_differentiated_are_input_errors(model, loss_fn, words) -> None:
    """A detached output or loss, or integer losses: tbptt.InputError (a ValueError and a
    TypeError, as the docs promise) saying what is wrong, not torch's RuntimeError."""
    from tbptt.errors import InputError

    d = driver(model(), loss_fn=loss_fn)
    with pytest.raises(InputError, match=words):
        d.feed(*chunk())
    assert d.updates == 0


def test_state0_of_another_dtype_is_an_input_error() -> None:
    """A float32 state0 for a float64 model is refused when the driver is built, naming both."""
    from tbptt.errors import InputError

    with pytest.raises(InputError, match="state0.*float32.*float64"):
        driver(ElmanRNN(n=4, m=3, p=2, dtype=DT, seed=0), state0=torch.zeros(2, 4))


def test_clip_may_be_a_numpy_scalar() -> None:
    """clip=np.float32(1.0) is accepted and clips exactly as clip=1.0 does."""
    import numpy as np

    trained = []
    for clip in (np.float32(1.0), 1.0):
        model = ElmanRNN(n=4, m=3, p=2, dtype=DT, seed=0)
        d = driver(model, clip=clip)
        x, y = chunk(8)
        d.feed(x, 10 * y)
        assert d.last_grad_norm > 1  # the clipping acted
        trained.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*trained, strict=True))


def test_a_file_torch_cannot_load_safely_never_suggests_unsafe_loading(tmp_path) -> None:
    """A checkpoint holding an object torch's weights_only loader refuses (code could run if it
    were unpickled) is an InputError naming the file, without torch's weights_only=False advice."""
    from fractions import Fraction

    from tbptt.errors import InputError

    path = tmp_path / "state.pt"
    torch.save({"format": "tbptt.torch.TBPTT/2", "lr": Fraction(1, 3)}, path)
    with pytest.raises(InputError, match="objects") as info:
        driver().load(path)
    message = str(info.value)
    assert str(path) in message and "weights_only" not in message and "unsafe" not in message


def test_l2_target_of_the_wrong_width_names_p_not_a_segment_shape():
    """A chunk's y with 3 values per step for a model of p = 2: the message gives both widths,
    not the shapes of the driver's internal pieces of the chunk."""
    net = Recurrent(torch.nn.RNN(3, 4), torch.nn.Linear(4, 2))
    d = TBPTT(net, tbptt.Truncation(2, 2), torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(
        tbptt.InputError, match="y has 3 values per step and stream, but the model outputs 2"
    ):
        d.feed(torch.randn(10, 2, 3), torch.randn(10, 2, 3))
