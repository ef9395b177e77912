"""tbptt.torch.streams: the numpy core's chunks as DataLoader batches, in order with any number
of workers, sharded over processes, resumed exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import tbptt
from tbptt.streams import Streams, from_arrays
from tbptt.torch import TBPTT, Recurrent, l2_loss
from tbptt.torch.streams import StreamDataset, StreamLoader


def sequences(n=9, features=2, seed=0):
    """n recordings of different lengths (x: features, y: one value), float64."""
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((int(rng.integers(5, 30)), features)) for _ in range(n)]
    ys = [np.tanh(x.sum(1, keepdims=True)) for x in xs]
    return xs, ys


def streams(batch=4, layout="pack"):
    xs, ys = sequences()
    return Streams(from_arrays(xs, ys), batch, layout=layout)


def same_batch(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            np.testing.assert_array_equal(g.numpy(), w)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_batch_i_is_chunk_i_with_any_number_of_workers(workers):
    """Whole batches in turn: the loader hands out chunk 0, 1, 2, ... of the epoch, no more."""
    s = streams()
    ds = StreamDataset(s, 3)
    assert len(ds) == s.chunks(3)
    for loader in (DataLoader(ds, batch_size=None, num_workers=workers),
                   StreamLoader(ds, num_workers=workers)):  # fmt: skip
        got = list(loader)
        assert len(got) == s.chunks(3)
        for i, b in enumerate(got):
            same_batch(b, s.chunk(i, 3))


def test_batch_first_and_dtype():
    """batch_first gives (B, L, ...); dtype converts floating x, y and the mask."""
    s = streams()
    i = next(i for i in range(s.chunks(10)) if all(a is not None for a in s.chunk(i, 10)))
    x, y, m, r = StreamDataset(s, 10, dtype=torch.float32, batch_first=True).batch(i)
    wx, wy, wm, wr = s.chunk(i, 10)
    assert x.dtype == y.dtype == m.dtype == torch.float32 and r.dtype == torch.bool
    np.testing.assert_array_equal(x.numpy(), wx.swapaxes(0, 1).astype(np.float32))
    np.testing.assert_array_equal(m.numpy(), wm.T)
    np.testing.assert_array_equal(r.numpy(), wr.T)


def test_ranks_read_their_shares_of_the_streams():
    """rank r of 2 gets streams 2r, 2r+1 of 4: side by side they are the whole batch."""
    s = streams()
    parts = [list(StreamDataset(s, 4, rank=r, world=2)) for r in range(2)]
    for i, (a, b) in enumerate(zip(*parts, strict=True)):
        x = torch.cat([a[0], b[0]], dim=1)
        np.testing.assert_array_equal(x.numpy(), s.chunk(i, 4)[0])


@pytest.mark.parametrize("workers, persistent", [(0, False), (2, False), (2, True)])
def test_loader_resumes_at_the_chunk_it_stopped_before(workers, persistent):
    """state_dict after k batches; a new loader continues at chunk k, then whole epochs."""
    s = streams()
    kw = dict(num_workers=workers, persistent_workers=persistent)
    first = StreamLoader(StreamDataset(s, 3), **kw)
    it = iter(first)
    for _ in range(4):
        next(it)
    sd = first.state_dict()
    assert sd["position"] == 4
    again = StreamLoader(StreamDataset(s, 3), **kw)
    again.load_state_dict(sd)
    rest = list(again)
    assert len(rest) == s.chunks(3) - 4
    for i, b in enumerate(rest):
        same_batch(b, s.chunk(4 + i, 3))
    assert again.state_dict()["position"] == s.chunks(3)
    assert len(list(again)) == s.chunks(3)  # the next epoch from its start
    ended = StreamLoader(StreamDataset(s, 3), **kw)
    ended.load_state_dict(again.state_dict())  # saved at an epoch's end: the next one, whole
    same_batch(next(iter(ended)), s.chunk(0, 3))


def test_loader_leaves_the_global_generator_alone():
    """Making an iterator draws the workers' seed from the loader's own generator."""
    loader = StreamLoader(StreamDataset(streams(), 3))
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    list(loader)
    assert torch.equal(torch.rand(3), want)


def run(chunks, sd=None):
    """tbptt.torch.TBPTT(k1=3, k2=7) on the batches; optionally from a saved state."""
    torch.manual_seed(0)
    model = Recurrent(torch.nn.LSTM(2, 5), torch.nn.Linear(5, 1)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    d = TBPTT(model, tbptt.Truncation(3, 7), opt, loss_fn=l2_loss)
    if sd is not None:
        d.load_state_dict(sd)
    for x, y, mask, reset in chunks:
        d.feed(x, y, mask, reset)
    return d


def test_driver_interrupted_and_resumed_equals_uninterrupted():
    """Driver and loader saved after 5 batches and resumed: the parameters of one run, exactly."""
    s = streams()

    def two_epochs(loader):
        for _ in range(2):
            yield from loader

    whole = run(two_epochs(StreamLoader(StreamDataset(s, 4, dtype=torch.float64))))
    first = StreamLoader(StreamDataset(s, 4, dtype=torch.float64), num_workers=2)
    it = iter(first)
    d = run([next(it) for _ in range(5)])
    saved, position = d.state_dict(), first.state_dict()
    second = StreamLoader(StreamDataset(s, 4, dtype=torch.float64), num_workers=2)
    second.load_state_dict(position)
    resumed = run(list(second) + list(second), saved)
    assert resumed.t == whole.t
    for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: StreamDataset([1, 2], 3), "streams must be a tbptt.streams.Streams"),
        (lambda: StreamDataset(streams(), 0), "length must be an integer >= 1"),
        (lambda: StreamDataset(streams(), 3, dtype=torch.int64), "dtype must be a floating"),
        (lambda: StreamDataset(streams(), 3, rank=0), "give both rank and world"),
        (lambda: StreamDataset(streams(), 3, rank=0, world=3), "cannot be shared equally by 3"),
        (lambda: StreamLoader(StreamDataset(streams(), 3), batch_size=4), "does not take batch"),
        (lambda: StreamLoader(StreamDataset(streams(), 3), in_order=False), "in_order must be"),
        (lambda: StreamLoader(list(range(3))), "dataset must be a tbptt.torch.streams"),
    ],
)
def test_bad_arguments_are_input_errors(make, message):
    """Each wrong argument raises tbptt.InputError saying what was expected."""
    with pytest.raises(tbptt.InputError) as err:
        make()
    assert message in str(err.value)


def test_a_state_from_another_layout_is_refused():
    """load_state_dict refuses a position taken over other streams or chunk lengths."""
    sd = StreamLoader(StreamDataset(streams(), 3)).state_dict()
    with pytest.raises(tbptt.InputError, match="the saved loader read"):
        StreamLoader(StreamDataset(streams(), 4)).load_state_dict(sd)


@pytest.mark.parametrize("position", [-1, 1.5, "2", None, True, 99])
def test_a_position_out_of_range_or_not_an_integer_is_refused(position):
    """load_state_dict with a position of -1 (which would read as the epoch's last chunk), a
    non-integer, or one past the epoch's chunks: an InputError naming the position and its range;
    the loader keeps its own."""
    loader = StreamLoader(StreamDataset(streams(), 3))
    sd = {**loader.state_dict(), "position": position}
    n = loader.state_dict()["chunks"]
    with pytest.raises(tbptt.InputError, match=rf"^sd's position must be an integer 0\.\.{n} "):
        loader.load_state_dict(sd)
    assert loader.position == 0 and loader._resume == 0
    ok = {**loader.state_dict(), "position": n}  # at the epoch's end: the next one begins
    loader.load_state_dict(ok)
    assert loader._resume == 0
