"""Misuse of the torch engine that used to train silently wrong, or end in torch's own error, is
refused in one line naming the argument (issue 24, B and D3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tbptt
from tbptt.torch import ARTBP, RTRL, TBPTT, UORO, Recurrent

DT = torch.float64


def gru(batch_first: bool = False) -> Recurrent:
    torch.manual_seed(0)
    return Recurrent(nn.GRU(3, 4, batch_first=batch_first), nn.Linear(4, 2)).to(DT)


def chunk(L: int = 6, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(L, batch, 3, generator=gen, dtype=DT)
    return x, torch.randn(L, batch, 2, generator=gen, dtype=DT)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


# -- B1: the optimizer ---------------------------------------------------------------------------
FACTORIES = {
    "TBPTT": lambda m, opt: TBPTT(m, tbptt.Truncation(2, 4), opt),
    "ARTBP": lambda m, opt: ARTBP(m, opt, c=0.5, rng=0),
    "RTRL": lambda m, opt: RTRL(m, opt, k1=2),
    "UORO": lambda m, opt: UORO(m, opt, k1=2, rng=0),
}


@pytest.mark.parametrize("method", FACTORIES)
def test_an_optimizer_over_another_models_parameters_is_refused(method: str) -> None:
    """An optimizer holding none of the model's trainable parameters is refused, naming it."""
    model, other = gru(), gru()
    with pytest.raises(tbptt.InputError, match=r"optimizer \(SGD\) holds none of the model's"):
        FACTORIES[method](model, sgd(other))


def test_an_optimizer_over_some_of_the_parameters_trains_them() -> None:
    """Frozen layers stay legitimate: an optimizer over the head alone trains the head."""
    model = gru()
    head = [p.detach().clone() for p in model.head.parameters()]
    rnn = [p.detach().clone() for p in model.rnn.parameters()]
    d = TBPTT(model, tbptt.Truncation(2, 2), sgd(model.head))
    d.feed(*chunk())
    assert all(not torch.equal(a, p) for a, p in zip(head, model.head.parameters(), strict=True))
    assert all(torch.equal(a, p) for a, p in zip(rnn, model.rnn.parameters(), strict=True))


# -- B6: batch_first -----------------------------------------------------------------------------
class Plain(nn.Module):
    """A user's module around an nn.GRU (not a tbptt.torch.Recurrent), nested one level deeper."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.body = nn.ModuleDict({"gru": nn.GRU(3, 4, batch_first=batch_first)})
        self.head = nn.Linear(4, 2)

    def forward(self, x, h):
        out, h = self.body["gru"](x, h)
        return self.head(out), h


@pytest.mark.parametrize("layer_first", [True, False])
def test_a_nested_rnn_of_the_other_layout_is_refused(layer_first: bool) -> None:
    """A nested nn.GRU whose batch_first differs from the driver's is refused, naming it."""
    model = Plain(layer_first).to(DT)
    with pytest.raises(tbptt.InputError, match=rf"body\.gru \(GRU\) has batch_first={layer_first}"):
        TBPTT(model, tbptt.Truncation(5, 5), sgd(model), batch_first=not layer_first)


@pytest.mark.parametrize("layer_first", [True, False])
def test_a_nested_rnn_of_the_same_layout_counts_every_step(layer_first: bool) -> None:
    """With the layouts matching, 5 streams in chunks of 25 steps make 1000 steps in 8 chunks."""
    model = Plain(layer_first).to(DT)
    d = TBPTT(model, tbptt.Truncation(25, 25), sgd(model), batch_first=layer_first)
    x, y = torch.zeros(25, 5, 3, dtype=DT), torch.zeros(25, 5, 2, dtype=DT)
    if layer_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    for _ in range(40):
        d.feed(x, y)
    assert (d.t, d.updates) == (1000, 40)


# -- B2: mask weights ----------------------------------------------------------------------------
@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("batch_first", [False, True])
def test_a_mask_weight_negative_or_not_finite_is_refused(weight: float, batch_first: bool) -> None:
    """A mask weight < 0 or non-finite is refused naming mask, the weight, its step and stream."""
    model = gru(batch_first)
    d = TBPTT(model, tbptt.Truncation(2, 2), sgd(model), batch_first=batch_first)
    x, y = chunk()
    mask = torch.ones(6, 2, dtype=DT)
    mask[4, 1] = weight
    if batch_first:
        x, y, mask = x.transpose(0, 1), y.transpose(0, 1), mask.T
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        tbptt.InputError,
        match=rf"mask must hold finite weights >= 0.*got {weight}"
        r" at step 4, stream 1",
    ):
        d.feed(x, y, mask)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


# -- B5: masked steps are ignored ----------------------------------------------------------------
def train(method: str, x, y, mask, loss_fn=tbptt.torch.l2_loss, p: int = 2) -> list[torch.Tensor]:
    """The parameters after `method` trained on two chunks (x, y, mask) of 4 steps, and finish."""
    torch.manual_seed(0)
    model = Recurrent(nn.GRU(3, 4), nn.Linear(4, p)).to(DT)
    d = FACTORIES[method](model, sgd(model))
    d.loss_fn = loss_fn
    for a in (slice(0, 4), slice(4, 8)):
        d.feed(x[a], y[a], mask[a])
    d.finish()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("method", FACTORIES)
def test_a_nan_target_at_a_masked_step_is_ignored(method: str) -> None:
    """NaN targets where the mask is 0 train as any other target there: not at all."""
    x, y = chunk(L=8, seed=1)
    mask = torch.ones(8, 2, dtype=DT)
    mask[3, 0] = mask[6, 1] = 0.0
    nan = y.clone()
    nan[mask == 0] = float("nan")
    for a, b in zip(train(method, x, nan, mask), train(method, x, y, mask), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    nan[2, 1, 0] = float("nan")  # where the mask is 1, a NaN target is still an error
    with pytest.raises((tbptt.InputError, tbptt.NonFiniteError)):
        train(method, x, nan, mask)


@pytest.mark.parametrize("method", FACTORIES)
def test_an_out_of_range_class_at_a_masked_step_is_ignored(method: str) -> None:
    """Cross-entropy: a class -1 (padding) where the mask is 0 trains as class 0 there."""
    x, _ = chunk(L=8, seed=2)
    y = torch.randint(0, 3, (8, 2), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(8, 2, dtype=DT)
    mask[5, 0] = mask[7, 1] = 0.0
    pad = torch.where(mask > 0, y, -1)
    ce = tbptt.torch.cross_entropy_loss
    for a, b in zip(
        train(method, x, pad, mask, ce, 3), train(method, x, y, mask, ce, 3), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# -- B3: a state cut from the state given --------------------------------------------------------
class Detaching(nn.Module):
    """An nn.GRU whose forward returns its new state detached: every gradient across calls cut."""

    def __init__(self) -> None:
        super().__init__()
        self.gru, self.head = nn.GRU(3, 4), nn.Linear(4, 2)

    def forward(self, x, h):
        out, h = self.gru(x, h)
        return self.head(out), h.detach()


DETACHED = {
    **FACTORIES,
    "TBPTT(3, 3)": lambda m, opt: TBPTT(m, tbptt.Truncation(3, 3), opt),
    "TBPTT(4, 2)": lambda m, opt: TBPTT(m, tbptt.Truncation(4, 2, inject="window"), opt),
    "TBPTT(2, 4) checkpoint": lambda m, opt: TBPTT(m, tbptt.Truncation(2, 4), opt, checkpoint=True),
}


@pytest.mark.parametrize("method", DETACHED)
def test_a_module_returning_a_detached_state_is_refused(method: str) -> None:
    """A module whose returned state is detached is refused in one line naming the module."""
    torch.manual_seed(0)
    model = Detaching().to(DT)
    d = DETACHED[method](model, sgd(model))
    x, y = chunk(L=8)
    with pytest.raises(tbptt.InputError, match=r"^model Detaching returned a state cut from") as e:
        for t in range(8):  # one step per chunk: every step its own module call
            d.feed(x[t : t + 1], y[t : t + 1])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", DETACHED)
def test_a_module_returning_an_attached_state_trains(method: str) -> None:
    """The same module returning its state attached trains through every method."""
    torch.manual_seed(0)
    model = gru()
    d = DETACHED[method](model, sgd(model))
    x, y = chunk(L=8)
    for t in range(8):
        d.feed(x[t : t + 1], y[t : t + 1])
    d.finish()
    assert d.t == 8 and d.updates >= 1


# -- B4: load, all or nothing --------------------------------------------------------------------
def trainer(method: str, cell=nn.GRU, hidden: int = 4, optim=torch.optim.SGD) -> TBPTT:
    """A `method` trainer of cell(3, hidden) and a head, fed three chunks of 3 steps."""
    torch.manual_seed(0)
    model = Recurrent(cell(3, hidden), nn.Linear(hidden, 2)).to(DT)
    d = FACTORIES[method](model, optim(model.parameters(), lr=0.05))
    x, y = chunk(L=9, seed=3)
    for a in range(0, 9, 3):
        d.feed(x[a : a + 3], y[a : a + 3])
    return d


def without(sd: dict, *path: str) -> dict:
    """A copy of the saved state sd with the key at `path` removed."""
    out = dict(sd)
    inner = out
    for k in path[:-1]:
        inner[k] = dict(inner[k])
        inner = inner[k]
    del inner[path[-1]]
    return out


REFUSED = {  # the state of another trainer, or an incomplete one, and what the error says
    "hidden size": (lambda m: trainer(m, hidden=5).state_dict(), r"rnn\.weight_ih_l0 has shape"),
    "cell": (
        lambda m: trainer(m, cell=nn.LSTM).state_dict(),
        r"shape \(16, 3\), this Recurrent's \(12, 3\) \(another cell",
    ),
    "Adam": (
        lambda m: trainer(m, optim=torch.optim.Adam).state_dict(),
        r"the saved run's optimizer is Adam, this driver's SGD",
    ),
    "Adam, an older file": (
        lambda m: without(trainer(m, optim=torch.optim.Adam).state_dict(), "optimizer_class"),
        r"the saved optimizer has the settings .*betas.* which this SGD does not",
    ),
    "model key": (
        lambda m: without(trainer(m).state_dict(), "model", "head.bias"),
        r"the saved model does not fit this Recurrent: it lacks head\.bias",
    ),
    "optimizer": (
        lambda m: without(trainer(m).state_dict(), "optimizer"),
        r"the saved state is incomplete: it has no optimizer",
    ),
    "rule's part": (
        lambda m: without(trainer(m).state_dict(), "state"),
        r"the saved state is incomplete: it has no 'state'",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
@pytest.mark.parametrize("method", ["TBPTT", "ARTBP", "UORO"])  # RTRL's part is UORO's
def test_a_refused_load_changes_nothing(method: str, case: str) -> None:
    """Another hidden size, cell or optimizer, or an incomplete state, is refused (one line) before
    anything is written: the trainer then continues exactly as its twin that was never asked."""
    make, match = REFUSED[case]
    sd = make(method)
    d, twin = trainer(method), trainer(method)
    with pytest.raises(tbptt.InputError, match=match) as e:
        d.load_state_dict(sd)
    assert "\n" not in str(e.value)
    x, y = chunk(L=6, seed=4)
    for t in (d, twin):
        t.feed(x, y)
        t.finish()
    assert (d.t, d.updates) == (twin.t, twin.updates) == (15, twin.updates)
    for a, b in zip(d.model.parameters(), twin.model.parameters(), strict=True):
        assert torch.equal(a, b)
    sa, sb = d.optimizer.state_dict(), twin.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()


@pytest.mark.parametrize("case", ["hidden size", "cell", "Adam"])
def test_a_refused_load_from_a_file_changes_nothing(case: str, tmp_path) -> None:
    """driver.load(path) of a file saved by another trainer (another hidden size, cell or
    optimizer) is refused in one line before anything is written, as load_state_dict is."""
    other = {"hidden size": {"hidden": 5}, "cell": {"cell": nn.LSTM}}.get(case, {})
    if case == "Adam":
        other = {"optim": torch.optim.Adam}
    trainer("TBPTT", **other).save(tmp_path / "other.pt")
    d, twin = trainer("TBPTT"), trainer("TBPTT")
    with pytest.raises(tbptt.InputError, match=REFUSED[case][1]) as e:
        d.load(tmp_path / "other.pt")
    assert "\n" not in str(e.value)
    assert (d.t, d.updates) == (twin.t, twin.updates)
    for a, b in zip(d.model.parameters(), twin.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert d.optimizer.state_dict()["state"].keys() == twin.optimizer.state_dict()["state"].keys()


@pytest.mark.parametrize("method", ["RTRL", "UORO"])
def test_a_forward_state_without_its_contributions_is_refused_before_any_write(method) -> None:
    """RTRL's and UORO's saved part without the contributions since the last update is refused
    before anything is written."""
    sd = without(trainer(method).state_dict(), "pending")
    d, twin = trainer(method), trainer(method)
    with pytest.raises(
        tbptt.InputError, match=r"the saved state is incomplete: it has no 'pending'"
    ):
        d.load_state_dict(sd)
    for a, b in zip(d.model.parameters(), twin.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (d.t, d.updates, len(d.rule.sum)) == (twin.t, twin.updates, len(twin.rule.sum))


# -- D3: one line naming the argument ------------------------------------------------------------
@pytest.mark.parametrize("bad", [3, -1, -100])
def test_a_class_out_of_range_names_y(bad: int) -> None:
    """cross_entropy_loss with a class outside [0, p) (torch's ignored -100 included) at an
    unmasked step: an InputError naming y, the class and the range."""
    torch.manual_seed(0)
    model = Recurrent(nn.GRU(3, 4), nn.Linear(4, 3)).to(DT)
    d = TBPTT(model, tbptt.Truncation(2, 2), sgd(model), loss_fn=tbptt.torch.cross_entropy_loss)
    y = torch.zeros(6, 2, dtype=torch.long)
    y[4, 1] = bad
    with pytest.raises(tbptt.InputError, match=rf"^y holds the class {bad}, expected 0 <= y < 3"):
        d.feed(chunk()[0], y)


def test_ids_out_of_range_name_x() -> None:
    """Ids outside the inputs of an ElmanRNN, or the vocabulary of an embedding: an InputError
    naming x, the id and the range."""
    net = tbptt.torch.ElmanRNN(n=4, m=5, p=2, dtype=DT)
    d = TBPTT(net, tbptt.Truncation(2, 2), sgd(net))
    ids = torch.tensor([[0, 1], [2, 7], [4, 3]])
    with pytest.raises(tbptt.InputError, match=r"^x holds the id 7, expected 0 <= id < m = 5"):
        d.feed(ids, torch.zeros(3, 2, 2, dtype=DT))
    torch.manual_seed(0)
    model = Recurrent(nn.GRU(3, 4), nn.Linear(4, 2), embedding=nn.Embedding(5, 3)).to(DT)
    d = TBPTT(model, tbptt.Truncation(2, 2), sgd(model))
    with pytest.raises(tbptt.InputError, match=r"^x holds the id 7, expected 0 <= id < 5"):
        d.feed(ids, torch.zeros(3, 2, 2, dtype=DT))


@pytest.mark.parametrize("method", FACTORIES)
@pytest.mark.parametrize(("name", "value"), [("x", float("nan")), ("y", float("inf"))])
def test_a_non_finite_input_is_named_not_a_non_finite_loss(method: str, name: str, value) -> None:
    """A NaN or an infinity in x, or in y at a step that is not masked: an InputError naming the
    argument, the value, its step and stream (not NonFiniteError's "the loss became non-finite"),
    with every method; no update uses the steps from there on."""
    model = gru()
    d = FACTORIES[method](model, sgd(model))
    x, y = chunk()
    (x if name == "x" else y)[4, 1, 0] = value
    with pytest.raises(
        tbptt.InputError, match=rf"^{name} must be finite, got {value} at step 4, stream 1 of"
    ) as info:
        d.feed(x, y)
    assert "the input, not the training" in str(info.value)
    assert not isinstance(info.value, tbptt.NonFiniteError)
    if method != "ARTBP":  # updates every 2 steps: those before step 4 (0-based) only
        twin = gru()
        FACTORIES[method](twin, sgd(twin)).feed(*(a[:4] for a in chunk()))
        assert all(
            torch.equal(a, p) for a, p in zip(twin.parameters(), model.parameters(), strict=True)
        )


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_a_nan_in_a_streams_values_is_named_as_the_input(engine: str) -> None:
    """A NaN in one sequence of a Streams, read as chunks and fed: an InputError naming x, on
    both engines (numpy checks x when fed, torch once the loss is non-finite)."""
    import numpy as np

    from tbptt.streams import Streams, from_arrays

    gen = np.random.default_rng(0)
    xs = [gen.standard_normal((9, 3)) for _ in range(2)]
    ys = [gen.standard_normal((9, 2)) for _ in range(2)]
    xs[1][5, 2] = np.nan
    s = Streams(from_arrays(xs, ys), 2)
    if engine == "numpy":
        d = tbptt.TBPTT(tbptt.ElmanRNN.init(n=4, m=3, p=2), tbptt.Truncation(2, 2), tbptt.SGD())
    else:
        model = gru()
        d = TBPTT(model, tbptt.Truncation(2, 2), sgd(model))
    with pytest.raises(tbptt.InputError, match=r"^x must be finite, got nan at"):
        for i in range(s.chunks(3)):
            x, y, mask, reset = s.chunk(i, 3)
            if engine == "torch":
                x, y = torch.from_numpy(x), torch.from_numpy(y)
                mask = None if mask is None else torch.from_numpy(mask)
                reset = None if reset is None else torch.from_numpy(reset)
            d.feed(x, y, mask, reset)


@pytest.mark.parametrize("batch_first", [False, True])
def test_a_loss_of_the_wrong_shape_quotes_the_users_chunk(batch_first: bool) -> None:
    """loss_fn returning another shape: the error quotes the chunk x as the user gave it, (6, 2, 3)
    or (2, 6, 3) batch_first, beside the piece the driver called it on."""
    model = gru(batch_first)
    d = TBPTT(
        model, tbptt.Truncation(2, 2), sgd(model), batch_first=batch_first,
        loss_fn=lambda out, y: ((out - y) ** 2).sum(-1)[..., :1],
    )  # fmt: skip
    x, y = chunk()
    if batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    shape, lead = (r"\(2, 6, 3\)", r"\(2, 6\)") if batch_first else (r"\(6, 2, 3\)", r"\(6, 2\)")
    with pytest.raises(tbptt.InputError, match=rf"{lead} for the chunk x of shape {shape}"):
        d.feed(x, y)


def test_state0_of_another_batch_names_state0() -> None:
    """state0 with another number of streams than the first chunk: an InputError naming state0,
    for a Recurrent (its declared stream axis) and a module that declares none."""
    model = gru()
    d = TBPTT(model, tbptt.Truncation(2, 2), sgd(model), state0=torch.zeros(1, 3, 4, dtype=DT))
    with pytest.raises(tbptt.InputError, match=r"^state0 has shape \(1, 3, 4\), but x has 2 str"):
        d.feed(*chunk())

    class Free(nn.Module):  # h (batch, 4), no state_batch_dim
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.GRUCell(3, 4, dtype=DT)
            self.out = nn.Linear(4, 2, dtype=DT)

        def forward(self, x, h):
            outs = []
            for t in range(x.shape[0]):
                h = self.cell(x[t], h)
                outs.append(self.out(h))
            return torch.stack(outs), h

    net = Free()
    d = TBPTT(net, tbptt.Truncation(2, 2), sgd(net), state0=torch.zeros(5, 4, dtype=DT))
    with pytest.raises(tbptt.InputError, match=r"^state0 has shape \(5, 4\), but x has 2 streams"):
        d.feed(*chunk())
    d = TBPTT(net, tbptt.Truncation(2, 2), sgd(net), state0=torch.zeros(2, 4, dtype=DT))
    d.feed(*chunk())  # the right batch trains
