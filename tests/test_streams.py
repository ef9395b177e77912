"""Stream datasets (tbptt.streams): layouts against direct simulations, chunks, epochs, shards,
lazy reading, and the numpy engine fed from them."""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest

import tbptt
from tbptt.streams import Sequences, Streams, from_arrays, from_npy


def ragged(lengths, features=None, seed=0):
    """Sequences of the given lengths; item t of sequence i is 1000 i + t (+ feature offsets)."""
    out = []
    for i, n in enumerate(lengths):
        s = 1000 * i + np.arange(n)
        out.append(s if features is None else s[:, None] + 0.25 * np.arange(features))
    return out


def simulate_pack(steps, B):
    """Step by step: at each t every free stream, in index order, takes the next sequence."""
    queue, t = list(range(len(steps))), 0
    rows = [[] for _ in range(B)]  # (sequence, step) per row, None once dry
    busy = [0] * B
    while queue or any(busy):
        for j in range(B):
            if busy[j] == 0 and queue:
                i = queue.pop(0)
                busy[j] = steps[i]
                rows[j].append((i, 0))
            elif busy[j]:
                i, s = rows[j][-1]
                rows[j].append((i, s + 1))
        if not any(busy):
            break
        busy = [max(b - 1, 0) for b in busy]
        t += 1
    T = max(len(r) for r in rows)
    return [r + [None] * (T - len(r)) for r in rows]


def reference_epoch(seqs, B, layout, targets=None):
    """The whole epoch (T, B) built directly: x, y, mask, reset."""
    paired = targets is not None
    if layout == "pack":
        steps = [len(s) - (0 if paired else 1) for s in seqs]
        rows = simulate_pack(steps, B)
        T = len(rows[0])
        shape = seqs[0].shape[1:]
        x = np.zeros((T, B, *shape))
        y = np.zeros((T, B, *(targets[0].shape[1:] if paired else shape)))
        mask, reset = np.zeros((T, B)), np.zeros((T, B), bool)
        for j in range(B):
            for t, cell in enumerate(rows[j]):
                if cell is None:
                    continue
                i, s = cell
                x[t, j] = seqs[i][s]
                y[t, j] = targets[i][s] if paired else seqs[i][s + 1]
                mask[t, j] = 1
                reset[t, j] = s == 0 or t == 0
        return x, y, mask, reset
    # split: batchify the concatenation (word_language_model), targets within each stream
    items = np.concatenate(seqs)
    owner = np.concatenate([np.full(len(s), i) for i, s in enumerate(seqs)])
    first = np.concatenate([np.arange(len(s)) == 0 for s in seqs])
    per = len(items) // B
    col = lambda a: a[: per * B].reshape(B, per, *a.shape[1:]).swapaxes(0, 1)  # noqa: E731
    X, O, F = col(items), col(owner), col(first)
    if paired:
        Y = col(np.concatenate(targets))
        mask = np.ones(X.shape[:2])
        reset = F.copy()
        reset[0] = True
        return X, Y, mask, reset
    x, y = X[:-1], X[1:]
    mask = (O[:-1] == O[1:]).astype(float)  # a target in the next sequence is masked
    y = np.where(mask.reshape(*mask.shape, *[1] * (y.ndim - 2)) > 0, y, 0)
    reset = F[:-1].copy()
    reset[0] = True
    return x, y, mask, reset


def expand(chunk):
    """(x, y, mask, reset) with None written out: mask all ones, reset all False."""
    x, y, m, r = chunk
    m = np.ones(x.shape[:2]) if m is None else m
    r = np.zeros(x.shape[:2], bool) if r is None else r
    return x, y, m, r


def whole_epoch(s: Streams, L: int):
    """Every chunk of an epoch, concatenated, Nones expanded."""
    parts = []
    for i in range(s.chunks(L)):
        x, y, m, r = expand(s.chunk(i, L))
        assert len(x) == (L if i < s.chunks(L) - 1 else s.steps - L * i)
        parts.append((x, y, m, r))
    return [np.concatenate(p) for p in zip(*parts, strict=True)]


CASES = [  # lengths, batch, layout, paired, features
    ([6, 4, 5, 2], 2, "pack", False, None),
    ([9, 3, 3, 3, 7, 2, 5, 4], 3, "pack", True, 2),
    ([6, 4, 5, 2], 2, "split", False, None),
    ([9, 3, 3, 3, 7, 2, 5, 4], 3, "split", True, 2),
    ([40], 4, "split", False, 3),  # one sequence: the strided-view path
    ([3, 2, 3, 2, 3], 5, "pack", False, None),
]


@pytest.mark.parametrize("lengths, B, layout, paired, features", CASES)
def test_chunks_match_a_direct_construction_of_the_epoch(lengths, B, layout, paired, features):
    """Chunks of every length, concatenated, are the epoch built directly (simulation/batchify)."""
    seqs = ragged(lengths, features)
    targets = [-s for s in seqs] if paired else None
    want = reference_epoch(seqs, B, layout, targets)
    s = Streams(from_arrays(seqs, targets), B, layout=layout)
    assert s.steps == len(want[0])
    for L in (1, 3, 4, s.steps, s.steps + 5):
        got = whole_epoch(s, L)
        for g, w, name in zip(got, want, ("x", "y", "mask", "reset"), strict=True):
            np.testing.assert_array_equal(g, w, err_msg=f"{name}, L={L}")


def test_docstring_layouts():
    """The module docstring's two diagrams, stream by stream."""
    seqs = ragged([5, 3, 4, 1])
    pack = Streams(from_arrays(seqs, [s + 0.5 for s in seqs]), 2)
    assert pack.pieces(0) == [(0, 0, 0, 5), (3, 0, 5, 1)]  # a, then d; then masked
    assert pack.pieces(1) == [(1, 0, 0, 3), (2, 0, 3, 4)]  # b, then c
    _, _, mask, _ = pack.chunk(0, 7)
    np.testing.assert_array_equal(mask[:, 0], [1, 1, 1, 1, 1, 1, 0])
    seqs = ragged([5, 3, 4, 2])
    split = Streams(from_arrays(seqs, seqs), 2, layout="split")
    assert split.pieces(0) == [(0, 0, 0, 5), (1, 0, 5, 2)]
    assert split.pieces(1) == [(1, 2, 0, 1), (2, 0, 1, 4), (3, 0, 5, 2)]
    _, _, _, reset = split.chunk(0, 7)
    np.testing.assert_array_equal(np.flatnonzero(reset[:, 0]), [0, 5])
    np.testing.assert_array_equal(np.flatnonzero(reset[:, 1]), [0, 1, 5])


def test_read_runs_on_across_epochs_with_a_reset_at_each_start():
    """read(t, k) is the epochs one after another; chunk i is read(i L, L) within an epoch."""
    s = Streams(ragged([6, 4, 5, 2]), 2)
    x, y, mask, reset = expand(s.read(0, s.steps))
    for t, k in ((0, 3), (5, 9), (3 * s.steps - 2, 2 * s.steps + 1)):
        gx, gy, gm, gr = expand(s.read(t, k))
        idx = (t + np.arange(k)) % s.steps
        np.testing.assert_array_equal(gx, x[idx])
        np.testing.assert_array_equal(gy, y[idx])
        np.testing.assert_array_equal(gm, mask[idx])
        np.testing.assert_array_equal(gr, reset[idx])
        assert gr[idx == 0].all()
    L = 3
    for i in range(s.chunks(L)):
        got, want = s.chunk(i, L), s.read(i * L, min(L, s.steps - i * L))
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_nones_where_nothing_is_masked_or_reset():
    """mask is None when every step has a target; reset None when no stream restarts."""
    s = Streams(np.arange(100.0), 4, layout="split")  # one sequence: nothing masked
    x, y, mask, reset = s.chunk(1, 5)
    assert mask is None and reset is None
    assert s.chunk(0, 5)[3] is not None  # the first step of an epoch restarts every stream


@pytest.mark.parametrize("layout", ["pack", "split"])
def test_shards_side_by_side_are_the_whole_batch(layout):
    """shard(r, W) reads streams r B/W..; the shards concatenated on the stream axis are all."""
    s = Streams(ragged([7, 3, 5, 6, 2, 4, 4, 8], 2), 4, layout=layout)
    for i in range(s.chunks(3)):
        whole = expand(s.chunk(i, 3))
        parts = [expand(s.shard(r, 2).chunk(i, 3)) for r in range(2)]
        for k, w in enumerate(whole):
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts], axis=1), w)


def test_transform_applies_to_every_chunk():
    """transform(x, y) runs on each chunk: here a table lookup and a one-hot encoding."""
    table = np.array([2, 0, 1])
    s = Streams(
        [np.array([0, 1, 2, 0, 1])], 1, transform=lambda x, y: (np.eye(3)[table[x]], table[y])
    )
    x, y, _, _ = s.chunk(0, 4)
    np.testing.assert_array_equal(x[:, 0], np.eye(3)[[2, 0, 1, 2]])
    np.testing.assert_array_equal(y[:, 0], [0, 1, 2, 0])


def test_a_read_asks_only_for_the_chunks_items():
    """The reader is asked for the items of the chunk's steps (plus each target), nothing more."""
    lengths = [50, 20, 70, 30, 40, 60]
    data = ragged(lengths)
    asked = []

    def read(i, a, b):
        asked.append((i, a, b))
        return data[i][a:b]

    for layout in ("pack", "split"):
        s = Streams(Sequences(lengths, read), 3, layout=layout)
        for c in range(s.chunks(8)):
            asked.clear()
            x, y, mask, _ = s.chunk(c, 8)
            items = sum(b - a for _, a, b in asked)
            stepped = int(x.shape[0] * 3 if mask is None else mask.sum())
            assert stepped <= items <= 8 * 3 + 2 * 3, (layout, c, asked)


def test_npy_files_are_read_lazily_and_never_held(tmp_path):
    """A 24 MB folder of .npy files read in chunks: the peak allocation stays near one chunk."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        p = tmp_path / f"rec{i}.npy"
        np.save(p, rng.standard_normal((50_000 + 1000 * i, 10)))  # (T_i, 10) float64
        paths.append(p)
    s = Streams(from_npy(paths), 3)
    L = 1000
    chunk_bytes = L * 3 * 10 * 8
    tracemalloc.start()
    try:
        for i in range(0, s.chunks(L), 7):
            x, y, mask, reset = s.chunk(i, L)
            assert np.isfinite(x).all() and np.isfinite(y).all()
            del x, y, mask, reset
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * chunk_bytes, peak  # x, y and the mask: never a file (over 3 MB each)
    ref = Streams([np.load(p) for p in paths], 3)
    np.testing.assert_array_equal(s.chunk(5, L)[0], ref.chunk(5, L)[0])


def test_npy_pairs_and_memory_maps_match_arrays(tmp_path):
    """from_npy with target files, and memory-mapped arrays, read what in-memory arrays give."""
    seqs = ragged([30, 12, 25, 9], 2)
    ys = [(s[:, :1] > 1000).astype(np.int64) for s in seqs]
    xp, yp = [], []
    for i, (a, b) in enumerate(zip(seqs, ys, strict=True)):
        np.save(tmp_path / f"x{i}.npy", a)
        np.save(tmp_path / f"y{i}.npy", b)
        xp.append(tmp_path / f"x{i}.npy")
        yp.append(tmp_path / f"y{i}.npy")
    want = Streams(from_arrays(seqs, ys), 2, layout="split")
    for got in (
        Streams(from_npy(xp, yp), 2, layout="split"),
        Streams(from_arrays([np.load(p, mmap_mode="r") for p in xp], ys), 2, layout="split"),
    ):
        for i in range(want.chunks(7)):
            for a, b in zip(got.chunk(i, 7), want.chunk(i, 7), strict=True):
                np.testing.assert_array_equal(a, b)


def test_numpy_engine_trains_on_chunks_as_on_the_whole_epoch():
    """tbptt.TBPTT fed the stream chunk by chunk = fed the directly built epoch in one go."""
    seqs = ragged([9, 4, 7, 6, 3], 2)
    seqs = [np.sin(0.01 * s) for s in seqs]
    targets = [np.cos(0.01 * s[:, :1]) for s in seqs]
    x, y, mask, reset = reference_epoch(seqs, 2, "pack", targets)
    s = Streams(from_arrays(seqs, targets), 2)

    def run(chunks):
        model = tbptt.ElmanRNN.init(n=4, m=2, p=1, seed=0)
        driver = tbptt.TBPTT(model, tbptt.Truncation(3, 5), tbptt.SGD(0.1))
        for c in chunks:
            driver.feed(*c)
        return model

    got = run(s.chunk(i, 4) for i in range(s.chunks(4)))
    want = run([(x, y, mask, reset)])
    for k in ("A", "B", "C"):
        np.testing.assert_allclose(getattr(got, k), getattr(want, k), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Streams(ragged([5, 5]), 0), "batch must be an integer >= 1, got 0"),
        (lambda: Streams(ragged([5, 5]), 3), "2 sequences cannot fill 3 streams"),
        (lambda: Streams(ragged([5, 5]), 2, layout="shuffle"), "layout must be one of"),
        (lambda: Streams(ragged([5, 1]), 1), "sequence 1 has 1 items; at least 2"),
        (lambda: Streams(ragged([3]), 2, layout="split"), "too few for 2 streams"),
        (lambda: Streams([np.zeros(3), np.zeros((3, 2))], 1), "sequences[1] has items of shape"),
        (lambda: from_arrays(ragged([4, 4]), [np.zeros(4)]), "targets must be a list of 2"),
        (lambda: from_arrays(ragged([4]), [np.zeros(3)]), "targets[0] has 3 steps"),
        (lambda: Streams(ragged([4, 4, 4]), 3).shard(0, 2), "cannot be shared equally by 2"),
        (lambda: Streams(ragged([4, 4]), 2).shard(2, 2), "rank must be below world=2"),
        (lambda: Streams(ragged([4, 4]), 2).chunk(0, 0), "length must be an integer >= 1"),
        (lambda: from_npy("a.npy"), "paths must be a non-empty list"),
    ],
)
def test_bad_arguments_are_input_errors_that_say_what_was_expected(make, message):
    """Each wrong argument raises tbptt.InputError naming it and what was expected."""
    with pytest.raises(tbptt.InputError, match=None) as err:
        make()
    assert message in str(err.value)


def test_an_unreadable_npy_file_is_named(tmp_path):
    """A file that is not .npy raises InputError naming it."""
    bad = tmp_path / "bad.npy"
    bad.write_text("not an array")
    with pytest.raises(tbptt.InputError, match="bad.npy is not a readable .npy array"):
        from_npy([bad])


@pytest.mark.parametrize("targets", [False, True])
def test_a_ragged_nested_list_names_the_sequence(targets):
    """A sequence given as a nested list whose items have different lengths: an InputError naming
    the sequence's index (not numpy's ValueError about an inhomogeneous shape)."""
    good, ragged_list = [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], [[0.0, 1.0], [2.0], [4.0, 5.0]]
    if targets:
        make = lambda: from_arrays([np.zeros((3, 2))] * 2, [good, ragged_list])  # noqa: E731
        name = "targets[1]"
    else:
        make = lambda: Streams([good, good, ragged_list], 2)  # noqa: E731
        name = "sequences[2]"
    with pytest.raises(tbptt.InputError, match=rf"^{re.escape(name)} is ragged: its items must"):
        make()
    assert len(Streams([good, good], 2).chunk(0, 2)[0]) == 2  # nested lists that are not ragged
