"""A module that takes the resets itself (SEMANTICS.md 10): the driver calls it once per piece with
starts=, from the carried state, and trains it as it trains the same module called split at the
resets (the reference: the driver's per-reset calls, which test_torch_engine checks)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tbptt
from tbptt import InputError
from tbptt.torch import TBPTT

DT = torch.float64
M, N, P, BATCH = 2, 4, 3, 3
CHUNKS = [5, 7, 4, 6]  # lengths: not multiples of the schedules' k1


class StartsElman(nn.Module):
    """h_t = tanh(A h_{t-1} + B x_t + b), output C h_t, stepped in a loop; forward takes starts
    (h_init = 0 before step t of stream j where starts[t, j]). Counts its calls."""

    def __init__(self, batch_first: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = nn.Parameter(0.5 * torch.randn(N, N, generator=g, dtype=DT))
        self.B = nn.Parameter(torch.randn(N, M, generator=g, dtype=DT))
        self.b = nn.Parameter(0.1 * torch.randn(N, generator=g, dtype=DT))
        self.C = nn.Parameter(torch.randn(P, N, generator=g, dtype=DT))
        self.batch_first, self.calls = batch_first, 0

    def forward(self, x, state, starts=None):
        self.calls += 1
        if self.batch_first:
            x = x.transpose(0, 1)
            starts = None if starts is None else starts.transpose(0, 1)
        h = x.new_zeros(x.shape[1], N) if state is None else state
        outs = []
        for t in range(x.shape[0]):
            if starts is not None:
                h = torch.where(starts[t][:, None], torch.zeros_like(h), h)
            h = torch.tanh(x[t] @ self.B.T + h @ self.A.T + self.b)
            outs.append(h @ self.C.T)
        out = torch.stack(outs)
        return (out.transpose(0, 1) if self.batch_first else out), h


class Split(nn.Module):
    """The same module without the keyword, not packable: the driver splits its call at the
    resets (call.py's split, which the earlier versions made for every module)."""

    packable = False

    def __init__(self, inner: StartsElman) -> None:
        super().__init__()
        self.inner, self.batch_first = inner, inner.batch_first

    def forward(self, x, state):
        return self.inner(x, state)


def stream(batch_first: bool):
    g = torch.Generator().manual_seed(1)
    T = sum(CHUNKS)
    x = torch.randn(T, BATCH, M, generator=g, dtype=DT)
    y = torch.randn(T, BATCH, P, generator=g, dtype=DT)
    reset = torch.rand(T, BATCH, generator=g) < 0.25
    reset[[2, 3, 9]] = True  # pieces with several restarts inside
    if batch_first:
        x, y, reset = x.transpose(0, 1), y.transpose(0, 1), reset.T
    return x, y, reset


def pieces(step: int) -> int:
    """The pieces the schedule cuts the chunks into (at the chunks' ends and every `step`)."""
    ends, t = set(), 0
    for n in CHUNKS:
        t += n
        ends.add(t)
    return len(ends | set(range(step, t, step)))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("k1, k2", [(3, 3), (2, 4)])  # chained; overlapping (parameter copies)
def test_one_call_per_piece_trains_as_the_split_calls(k1: int, k2: int, batch_first: bool):
    """Called once per piece with starts=, the module trains as when called split at every
    reset: the same parameters, losses and carried state to 1e-12 (float64)."""
    x, y, reset = stream(batch_first)
    whole = StartsElman(batch_first)
    split = Split(copy.deepcopy(whole))
    out = []
    for model in (whole, split):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        driver = TBPTT(model, tbptt.Truncation(k1, k2), opt, batch_first=batch_first)
        losses, a, td = [], 0, 1 if batch_first else 0
        for n in CHUNKS:
            cut = [v.narrow(td, a, n) for v in (x, y, reset)]
            losses.append(driver.feed(cut[0], cut[1], reset=cut[2]))
            a += n
        driver.finish()
        out.append((dict(model.named_parameters()), losses, driver.state, driver.updates))
    (pw, lw, sw, uw), (ps, ls, ss, us) = out
    assert uw == us > 0
    for k, v in pw.items():
        torch.testing.assert_close(v, ps[f"inner.{k}"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.tensor(lw), torch.tensor(ls), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sw, ss, rtol=1e-12, atol=1e-12)
    assert whole.calls == pieces(k1)  # once per piece, whatever the resets inside
    assert split.inner.calls > whole.calls


def test_predict_passes_starts_and_state0_is_refused() -> None:
    """predict calls such a module once with the resets, as the split calls compute; a state0
    (a restart state the module would not use) is refused by name."""
    x, _, reset = stream(False)
    model = StartsElman()
    ref = Split(copy.deepcopy(model))
    opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    got, want = (
        TBPTT(m, tbptt.Truncation(3, 3), opt(m)).predict(x, None, reset)[0] for m in (model, ref)
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert model.calls == 1 and ref.inner.calls > 1
    state0 = torch.zeros(BATCH, N, dtype=DT)
    with pytest.raises(InputError, match="state0 cannot be given for a module whose forward"):
        TBPTT(model, tbptt.Truncation(3, 3), opt(model), state0=state0)
