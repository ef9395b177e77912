"""Checkpoint and resume of the torch driver: an interrupted run continues exactly (float64, CPU).

The reference is the same run never interrupted: after save, a fresh model, optimizer, scheduler
and driver load the file (after the RNG was disturbed) and continue; the parameters, the carried
state and the counters must be equal, compared exactly.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import tbptt
from tbptt.torch import TBPTT, ElmanRNN, Recurrent

DT = torch.float64
M, H, P, BATCH, T = 3, 5, 2, 2, 40
CHUNKS = [(0, 4), (4, 11), (11, 12), (12, 19), (19, 26), (26, 33), (33, 40)]


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, BATCH, M, generator=g, dtype=DT)
    y = torch.randn(T, BATCH, P, generator=g, dtype=DT)
    return x, y, torch.rand(T, BATCH, generator=g) < 0.1


def make(trunc: tbptt.Truncation, checkpoint: bool = False, kind: str = "lstm") -> TBPTT:
    """A fresh model (dropout on: the RNG matters), Adam, a StepLR scheduler and the driver."""
    torch.manual_seed(1)
    if kind == "lstm":
        model = Recurrent(nn.LSTM(M, H, num_layers=2, dropout=0.3), nn.Linear(H, P)).to(DT)
    else:
        model = ElmanRNN(n=H, m=M, p=P, dtype=DT, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return TBPTT(model, trunc, opt, clip=1.0, scheduler=sched, checkpoint=checkpoint)


def run(driver: TBPTT, chunks: list[tuple[int, int]]) -> None:
    x, y, reset = data()
    for a, b in chunks:
        driver.feed(x[a:b], y[a:b], reset=reset[a:b])


SCHEDULES = [
    tbptt.Truncation(2, 5, "new", flush=True),  # overlapping, k2 not a multiple of k1
    tbptt.Truncation(3, 3, "new", flush=True),  # k1 = k2, flush reaches into the previous chunk
    tbptt.Truncation(5, 2, "window", flush=True),  # k2 < k1
    tbptt.Truncation(3, 8, "last", flush=True),  # the forum snippet's losses
]


@pytest.mark.parametrize("trunc", SCHEDULES, ids=lambda t: t.describe())
@pytest.mark.parametrize("cut", [2, 3, 5])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_resume_equals_uninterrupted_run(trunc, cut: int, checkpoint: bool, tmp_path) -> None:
    """Save after `cut` chunks, load into fresh objects, continue: the same parameters exactly."""
    torch.manual_seed(5)
    whole = make(trunc, checkpoint)
    run(whole, CHUNKS)
    whole.finish()

    torch.manual_seed(5)
    first = make(trunc, checkpoint)
    run(first, CHUNKS[:cut])
    path = tmp_path / "run.pt"
    first.save(path)
    torch.manual_seed(123)  # the generator is part of the saved state
    second = make(trunc, checkpoint)
    second.load(path)
    assert (second.t, second.updates) == (first.t, first.updates)
    run(second, CHUNKS[cut:])
    second.finish()
    assert second.updates == whole.updates
    for p, q in zip(whole.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(p, q)
    for s, r in zip(whole.state, second.state, strict=True):
        assert torch.equal(s, r)


def test_state_dict_round_trip_in_memory() -> None:
    """state_dict() / load_state_dict() without a file continue exactly too (ElmanRNN)."""
    trunc = tbptt.Truncation(2, 7, "window", flush=True)
    whole = make(trunc, kind="elman")
    run(whole, CHUNKS)
    first = make(trunc, kind="elman")
    run(first, CHUNKS[:4])
    second = make(trunc, kind="elman")
    second.load_state_dict(first.state_dict())
    run(second, CHUNKS[4:])
    for p, q in zip(whole.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_file_is_weights_only_and_written_atomically(tmp_path, monkeypatch) -> None:
    """The file loads with weights_only=True; a failing save leaves the old file and no temp
    file."""
    driver = make(tbptt.Truncation(2, 5))
    run(driver, CHUNKS[:3])
    path = tmp_path / "run.pt"
    driver.save(path)
    sd = torch.load(path, weights_only=True)
    assert sd["t"] == 12 and sd["updates"] == 6 and sd["truncation"] == [2, 5, "new", False]
    before = path.read_bytes()

    def broken_save(obj, fh) -> None:
        fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        driver.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["run.pt"]


def test_load_refuses_another_schedule(tmp_path) -> None:
    """Resuming with a different Truncation is an error naming both schedules."""
    driver = make(tbptt.Truncation(2, 5))
    run(driver, CHUNKS[:2])
    driver.save(tmp_path / "run.pt")
    other = make(tbptt.Truncation(2, 6))
    with pytest.raises(ValueError, match=r"Truncation\(2, 5, 'new', False\).*Truncation\(2, 6"):
        other.load(tmp_path / "run.pt")
