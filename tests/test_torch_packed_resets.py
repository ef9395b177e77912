"""The driver's resets run packed (call.py, packing.py; SEMANTICS.md 6, 9): each stream cut at its
resets, the pieces in a few calls on the streams still running, against per-step loops written
here (float64); modules with batch statistics keep the per-reset split on all streams."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tbptt
from tbptt import InputError
from tbptt.torch import TBPTT, Recurrent
from tbptt.torch.call import packable

DT = torch.float64
M, H, P, BATCH = 3, 5, 2, 6
CHUNKS = [13, 19, 6, 26]  # lengths: not multiples of k


def counted(model: Recurrent) -> list[int]:
    """The batch size of every forward call of the model's rnn, appended as it runs."""
    sizes: list[int] = []
    first = bool(getattr(model.rnn, "batch_first", False))
    model.rnn.register_forward_pre_hook(
        lambda _, args: sizes.append(args[0].shape[0 if first else 1])
    )
    return sizes


def lstm(seed: int = 1, **kw) -> Recurrent:
    torch.manual_seed(seed)
    return Recurrent(nn.LSTM(M, H, num_layers=2, **kw), nn.Linear(H, P)).to(DT)


def data(seed: int = 0, p: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    T = sum(CHUNKS)
    x = torch.randn(T, BATCH, M, generator=g, dtype=DT)
    y = torch.randn(T, BATCH, P, generator=g, dtype=DT)
    reset = torch.rand(T, BATCH, generator=g) < p
    return x, y, reset


def restart(state, row: torch.Tensor, h0=None):
    """(6.1): the streams where row is true take h0 (zeros when None)."""
    where = row.view(1, -1, 1)
    zeros = (torch.zeros((), dtype=DT),) * 2
    return tuple(torch.where(where, z, s) for s, z in zip(state, h0 or zeros, strict=True))


def test_resets_train_in_few_calls_as_the_per_step_loop() -> None:
    """TBPTT(16, 16) on an LSTM with resets in a third of the (step, stream) cells: the parameters
    of the per-step loop (restart, step, update every 16 steps), and each piece of l steps in at
    most floor(log2 l) + 1 calls (one more for the first call, from None), not one per reset row."""
    x, y, reset = data()
    k, T = 16, x.shape[0]
    model, ref = lstm(), lstm()
    sizes = counted(model)
    driver = TBPTT(model, tbptt.Truncation(k, k), torch.optim.SGD(model.parameters(), lr=0.1))
    t = 0
    for n in CHUNKS:
        driver.feed(x[t : t + n], y[t : t + n], reset=reset[t : t + n])
        t += n
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    state = (torch.zeros(2, BATCH, H, dtype=DT),) * 2
    loss = torch.zeros((), dtype=DT)
    for t in range(T):
        state = restart(state, reset[t])
        out, state = ref(x[t : t + 1], state)
        loss = loss + ((out - y[t : t + 1]) ** 2).sum() / 2
        if (t + 1) % k == 0:
            opt.zero_grad()
            loss.backward()
            opt.step()
            state, loss = tuple(s.detach() for s in state), torch.zeros((), dtype=DT)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    ends = sorted({0, *range(k, T, k), *torch.tensor(CHUNKS).cumsum(0).tolist()})
    pieces = list(zip(ends[:-1], ends[1:], strict=True))
    packed = 1 + sum(math.floor(math.log2(b - a)) + 1 for a, b in pieces)
    split = sum(1 + int(reset[a + 1 : b].any(1).sum()) for a, b in pieces)  # one per reset row
    assert len(sizes) <= packed < split
    assert set(sizes) != {BATCH}  # packed calls run on the pieces of a round, not the streams


def test_predict_with_resets_and_state0_batch_first_equals_the_per_step_loop() -> None:
    """predict from state0 (not zeros), batch_first, a tuple state: each stream restarts from
    state0 where it resets, as the per-step loop; at most floor(log2 L) + 1 calls."""
    x, _, reset = data(3, p=0.4)
    L = x.shape[0]
    model = lstm(batch_first=True)
    g = torch.Generator().manual_seed(5)
    state0 = tuple(torch.randn(2, BATCH, H, generator=g, dtype=DT) for _ in range(2))
    driver = TBPTT(
        model,
        tbptt.Truncation(4, 4),
        torch.optim.SGD(model.parameters(), lr=0.1),
        batch_first=True,
        state0=state0,
    )
    sizes = counted(model)
    xb, rb = x.transpose(0, 1), reset.T  # (batch, L, m), (batch, L)
    out, final = driver.predict(xb, reset=rb)
    calls = len(sizes)
    want, state = [], state0
    with torch.no_grad():
        for t in range(L):
            state = restart(state, reset[t], state0)
            o, state = model(xb[:, t : t + 1], state)
            want.append(o)
    torch.testing.assert_close(out, torch.cat(want, 1), rtol=1e-12, atol=1e-12)
    for a, b in zip(final, state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert calls <= math.floor(math.log2(L)) + 1


class Fixed(nn.Module):
    """A module that breaks the protocol: its state always holds BATCH rows."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(M, dtype=DT))

    def forward(self, x, state):
        h = (x * self.w).sum(0)  # (batch, m)
        return x * self.w, h.new_zeros(BATCH, M) + h.sum()


def test_a_packed_call_must_return_a_state_of_the_shapes_it_was_given() -> None:
    """A packed call (on the pieces of a round) that returns a state of another batch than it was
    given: one InputError."""
    x, _, reset = data()
    module = Fixed()
    driver = TBPTT(module, tbptt.Truncation(8, 8), torch.optim.SGD(module.parameters(), lr=0.1))
    with pytest.raises(InputError, match=r"a call must return a state of the shapes it was given"):
        driver.feed(x[:8], torch.zeros(8, BATCH, M, dtype=DT), reset=reset[:8])


class Normed(nn.Module):
    """An LSTM whose input goes through a BatchNorm1d: statistics over the call's batch."""

    def __init__(self, packable: bool | None = None) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(M, dtype=DT)
        self.rnn = nn.LSTM(M, H, dtype=DT)
        if packable is not None:
            self.packable = packable

    def forward(self, x, state):
        z = self.norm(x.reshape(-1, M)).view(x.shape)
        return self.rnn(z, state)


def test_batch_statistics_keep_the_per_reset_split_on_all_streams() -> None:
    """A BatchNorm in training mode (or packable = False): one call on all streams per reset row,
    as before packing; in eval mode, or with packable = True, the pieces are packed."""
    assert not packable(Normed()) and packable(Normed().eval()) and packable(lstm())
    assert packable(Normed(packable=True)) and not packable(Normed(packable=False).eval())
    x, y, reset = data()
    for module, split in ((Normed(), True), (Normed(packable=True), False)):
        sizes: list[int] = []
        module.rnn.register_forward_pre_hook(lambda _, a, s=sizes: s.append(a[0].shape[1]))
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        driver = TBPTT(module, tbptt.Truncation(8, 8), opt, loss_fn=lambda o, t: (o - t).sum(-1))
        driver.feed(x[:8], torch.zeros(8, BATCH, H, dtype=DT), reset=reset[:8])
        rows = int(reset[1:8].any(1).sum())
        if split:
            assert sizes == [BATCH] * (1 + rows)
        else:
            assert set(sizes) != {BATCH} and len(sizes) < 1 + rows
