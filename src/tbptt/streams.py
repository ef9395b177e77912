"""Stream datasets: a collection of sequences as `batch` contiguous streams, read in chunks.

Documents, episodes or recordings (in memory, memory-mapped, or read lazily by a callable) are
laid side by side as B streams; a chunk holds L consecutive steps of every stream, time-major, in
the order TBPTT.feed takes them (numpy's tbptt.TBPTT and tbptt.torch.TBPTT alike, SEMANTICS.md 6):

    x      (L, B, ...)   inputs x_t                y  (L, B, ...)   targets y_t
    mask   (L, B)        0.0 where stream j has no step t (it ran dry) or step t has no target;
                         None when every step of the chunk has one
    reset  (L, B) bool   True where stream j starts a sequence, or the stream itself starts (the
                         first step of every epoch): the state restarts from h_0 there and no
                         gradient crosses the boundary; None when no stream resets in the chunk

Targets. A sequence given as one array s of n items has the steps x_t = s[t], y_t = s[t + 1],
t = 0..n-2 (its last item is only a target: a language model's next character). A sequence
given as a pair (x, y) of aligned arrays has one step per item.

Layouts, with B = 2 streams:

    pack    whole sequences; each, in order, goes to the stream that is free first (the lowest
            index among equals); a stream that has run dry is masked until the longest ends.
            Sequences a, b, c, d of 5, 3, 4 and 1 steps:
                stream 0   a a a a a d .          (. masked)
                stream 1   b b b c c c c
    split   the sequences one after another, cut into B parts of equal length, as
            word_language_model's batchify does (the last N mod B items are dropped); a sequence
            may start inside a stream, or run on from the end of one stream into the next.
            Sequences a, b, c, d of 5, 3, 4 and 2 steps:
                stream 0   a a a a a b b          (reset where b starts)
                stream 1   b c c c c d d          (the stream starts inside b: a reset too)
            With next-item targets the cut is made on the items, and within each stream step t's
            target is the stream's item t + 1; a step whose target would be the next sequence's
            first item is masked.

Epochs. The layout repeats: `read(t, k)` returns steps t..t+k-1 of the endless stream (step
t mod steps of epoch t // steps), `chunk(i, L)` the i-th chunk of L steps of an epoch (the last
may be shorter). Both are pure functions of their arguments, so a run resumed at chunk i reads
what the uninterrupted run read there: its position is the number of chunks (or steps) read.

Memory. The layout is a table with one row per piece of a sequence in a stream (stream, first
step, sequence, first item, steps); a read asks the source for the items of the steps it
returns and nothing more, so a memory-mapped array or a folder of .npy files stays on disk
except for the chunk being read.

Several processes (data-parallel training): `shard(rank, world)` reads the streams
rank B / world .. (rank + 1) B / world - 1 of the same layout, so the processes together read
exactly the B streams one process would, chunk for chunk, as tbptt.torch.distributed expects.
"""

from __future__ import annotations

import heapq
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .checks import check_int
from .errors import InputError

Array = np.ndarray
Chunk = tuple[Array, Array, Array | None, Array | None]  # x, y, mask, reset
LAYOUTS = ("pack", "split")
OPEN_FILES = 64  # memory maps kept open by `from_npy` (a map holds no data, only an address range)


class Sequences:
    """N sequences: their lengths in items and a reader of items a..b-1 of sequence i.

    read(i, a, b) returns an array of b - a items (paired=False: the targets are the next item)
    or a pair (x, y) of aligned arrays (paired=True). It is called only for the items of the
    chunk being read, so it may read them from anywhere (a file, a database, a generator of
    episodes with fixed seeds). `whole(i)`, when given, returns sequence i as a sliceable array
    (in memory or memory-mapped): the split layout of a single sequence then reads a chunk as
    one strided slice.
    """

    def __init__(
        self,
        lengths: Sequence[int] | Array,
        read: Callable[[int, int, int], Any],
        *,
        paired: bool = False,
        whole: Callable[[int], Any] | None = None,
        name: str = "sequences",
    ) -> None:
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or len(lengths) == 0 or not np.issubdtype(lengths.dtype, np.integer):
            raise InputError(
                f"{name}: lengths must be a non-empty 1-D array of integers, got "
                f"{lengths.dtype} of shape {lengths.shape}"
            )
        if not callable(read):
            raise InputError(f"{name}: read must be callable (i, a, b) -> items, got {read!r}")
        if not isinstance(paired, bool):
            raise InputError(f"{name}: paired must be a bool, got {paired!r}")
        least = 1 if paired else 2  # a next-item sequence needs an input and a target
        short = np.flatnonzero(lengths < least)
        if len(short):
            i = int(short[0])
            raise InputError(
                f"{name}: sequence {i} has {int(lengths[i])} items; at least {least} are needed "
                f"({'one step' if paired else 'an input and its target, the next item'})"
            )
        self.lengths = lengths.astype(np.int64)
        self.read = read
        self.paired = paired
        self.whole = whole
        self.name = name

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def steps(self) -> Array:
        """(N,) steps of each sequence: its items, less the last one for next-item targets."""
        return self.lengths - (0 if self.paired else 1)


def from_arrays(
    sequences: Sequence[Any] | Array, targets: Sequence[Any] | None = None
) -> Sequences:
    """Sequences held as arrays (in memory or memory-mapped, e.g. np.load(path, mmap_mode="r")).

    sequences: a list of arrays (n_i, ...) whose targets are the next item, or one array, which is
    one sequence (a text). targets: a list of arrays aligned with `sequences` (one step per item).
    Nothing is copied; a read slices the arrays.
    """
    if isinstance(sequences, np.ndarray):
        sequences = [sequences]
    if not isinstance(sequences, list | tuple) or not sequences:
        raise InputError(
            f"sequences must be a non-empty list of arrays, got {type(sequences).__name__}"
        )
    xs = [_array("sequences", i, s) for i, s in enumerate(sequences)]
    ys = None
    if targets is not None:
        if not isinstance(targets, list | tuple) or len(targets) != len(xs):
            got = len(targets) if isinstance(targets, list | tuple) else type(targets).__name__
            raise InputError(
                f"targets must be a list of {len(xs)} arrays like sequences, got {got}"
            )
        ys = [_array("targets", i, t) for i, t in enumerate(targets)]
    _check_items("sequences", xs)
    if ys is not None:
        _check_items("targets", ys)
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            if len(x) != len(y):
                raise InputError(
                    f"targets[{i}] has {len(y)} steps but sequences[{i}] has {len(x)}: a pair "
                    "(x, y) holds one target per input"
                )
        return Sequences(
            [len(x) for x in xs], lambda i, a, b: (xs[i][a:b], ys[i][a:b]), paired=True,
            name="sequences",
        )  # fmt: skip
    return Sequences(
        [len(x) for x in xs], lambda i, a, b: xs[i][a:b], whole=lambda i: xs[i], name="sequences"
    )


def _array(name: str, i: int, a: object) -> Array:
    """Sequence i as an array (not copied when it is one); a ragged nested list (items of
    different lengths) an InputError naming its index."""
    if isinstance(a, np.ndarray):
        return a
    try:
        return np.asarray(a)
    except ValueError as exc:  # numpy: "inhomogeneous shape after 1 dimensions"
        raise InputError(
            f"{name}[{i}] is ragged: its items must all have the same shape (one array per "
            f"sequence, its time axis first); numpy says: {str(exc).splitlines()[0]}"
        ) from None


def _check_items(name: str, arrays: list[Array]) -> None:
    """Arrays of numbers with at least one axis, all with the same item shape and dtype kind."""
    first = arrays[0]
    for i, a in enumerate(arrays):
        if a.ndim == 0 or a.dtype == object or a.dtype.kind not in "biuf":
            raise InputError(
                f"{name}[{i}] must be an array of numbers with a time axis first, got "
                f"{a.dtype} of shape {a.shape}"
            )
        if a.shape[1:] != first.shape[1:] or a.dtype != first.dtype:
            raise InputError(
                f"{name}[{i}] has items of shape {a.shape[1:]} and dtype {a.dtype}, but "
                f"{name}[0] has {first.shape[1:]} and {first.dtype}: every sequence needs the same"
            )


def from_npy(
    paths: Sequence[str | os.PathLike], targets: Sequence[str | os.PathLike] | None = None
) -> Sequences:
    """Sequences stored one per .npy file, read lazily through memory maps.

    Each file holds an array (n_i, ...) whose targets are the next item, or, with `targets`, the
    inputs of a pair whose targets are in the matching file. The headers are read once here (for
    the lengths); a read maps the file (np.load(mmap_mode="r"), the last OPEN_FILES maps kept) and
    copies only the items asked for.
    """
    if isinstance(paths, str | os.PathLike) or not paths:
        raise InputError(f"paths must be a non-empty list of .npy files, got {paths!r}")
    paths = [os.fspath(p) for p in paths]
    if targets is not None:
        if isinstance(targets, str | os.PathLike) or len(targets) != len(paths):
            raise InputError(f"targets must be a list of {len(paths)} .npy files like paths")
        targets = [os.fspath(p) for p in targets]
    maps: OrderedDict[str, Array] = OrderedDict()

    def open_map(path: str) -> Array:
        if path in maps:
            maps.move_to_end(path)
            return maps[path]
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} is not a readable .npy array: {exc}") from None
        maps[path] = arr
        if len(maps) > OPEN_FILES:
            maps.popitem(last=False)
        return arr

    arrays = [open_map(p) for p in paths]  # headers only: shapes and dtypes
    _check_items("paths", arrays)
    lengths = [len(a) for a in arrays]
    if targets is not None:
        ys = [open_map(p) for p in targets]
        _check_items("targets", ys)
        for i, (n, y) in enumerate(zip(lengths, ys, strict=True)):
            if len(y) != n:
                raise InputError(f"{targets[i]} has {len(y)} steps but {paths[i]} has {n}")
    maps.clear()  # nothing stays mapped before the first read
    if targets is not None:
        return Sequences(
            lengths,
            lambda i, a, b: (open_map(paths[i])[a:b], open_map(targets[i])[a:b]),
            paired=True,
            name=".npy files",
        )
    return Sequences(
        lengths, lambda i, a, b: open_map(paths[i])[a:b], whole=lambda i: open_map(paths[i]),
        name=".npy files",
    )  # fmt: skip


class Streams:
    """B contiguous streams over a collection of sequences (the module docstring).

    Args:
        sequences: a Sequences (from_arrays, from_npy, or your own reader), or what from_arrays
            takes: a list of arrays whose targets are the next item, or one array.
        batch: B, the number of streams.
        layout: "pack" (whole sequences, streams masked once they run dry) or "split"
            (the sequences one after another, cut into B equal parts).
        transform: applied to every chunk's (x, y) after reading, e.g. a table lookup or a
            one-hot encoding; returns the new (x, y).

    steps: the steps of an epoch (every stream); chunks(L): an epoch's chunks of L steps;
    chunk(i, L) and read(t, k): (x, y, mask, reset) as in the module docstring.
    """

    def __init__(
        self,
        sequences: Sequences | Sequence[Any] | Array,
        batch: int,
        *,
        layout: str = "pack",
        transform: Callable[[Array, Array], tuple[Array, Array]] | None = None,
    ) -> None:
        if not isinstance(sequences, Sequences):
            sequences = from_arrays(sequences)
        self.batch = check_int("batch", batch)
        if layout not in LAYOUTS:
            raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if transform is not None and not callable(transform):
            raise InputError(f"transform must be callable (x, y) -> (x, y), got {transform!r}")
        self.sequences, self.layout, self.transform = sequences, layout, transform
        self.columns = range(self.batch)  # the streams this object reads (see shard)
        self._view = None  # (B, items per stream, ...): one sequence, split layout
        if layout == "pack":
            self._pack()
        else:
            self._split()
        x0, y0 = self._source(0, 0, 1)  # one item: the shapes and dtypes of x and y
        self._x_item = (x0.shape[1:], x0.dtype)
        self._y_item = self._x_item if y0 is None else (y0.shape[1:], y0.dtype)

    # -- the layout -----------------------------------------------------------------------------
    def _pack(self) -> None:
        """Each sequence, in order, to the stream free first (the lowest index among equals)."""
        steps = self.sequences.steps
        N, B = len(steps), self.batch
        if N < B:
            raise InputError(
                f"{N} sequences cannot fill {B} streams with whole sequences (layout='pack'): "
                f"{B - N} streams would hold nothing; use batch <= {N}, or layout='split'"
            )
        free = [(0, j) for j in range(B)]  # (the step where stream j is free, j)
        stream = np.empty(N, np.int64)
        row = np.empty(N, np.int64)
        for i, n in enumerate(steps.tolist()):
            t, j = heapq.heappop(free)
            stream[i], row[i] = j, t
            heapq.heappush(free, (t + n, j))
        order = np.argsort(stream, kind="stable")  # by stream, then by step
        self._table(stream[order], row[order], order, np.zeros(N, np.int64), steps[order])
        self.steps = int(max(t for t, _ in free))

    def _split(self) -> None:
        """The concatenated items cut into B equal parts (batchify); each part's pieces."""
        seq = self.sequences
        B = self.batch
        starts = np.concatenate([[0], np.cumsum(seq.lengths)])  # (N + 1,) first item of each
        per = int(starts[-1]) // B  # items per stream
        rows = per if seq.paired else per - 1  # next-item targets: the last item only a target
        if rows < 1:
            raise InputError(
                f"{seq.name} hold {int(starts[-1])} items in all, too few for {B} streams of at "
                f"least {1 if seq.paired else 2} items each (layout='split'); use a smaller batch"
            )
        cols = []
        for j in range(B):
            a, b = j * per, j * per + rows  # the items that are inputs of stream j
            first = int(np.searchsorted(starts, a, side="right")) - 1
            last = int(np.searchsorted(starts, b, side="left"))  # sequences first..last-1
            for i in range(first, last):
                lo, hi = max(a, int(starts[i])), min(b, int(starts[i + 1]))
                cols.append((j, lo - a, i, lo - int(starts[i]), hi - lo))
        t = np.array(cols, np.int64)
        self._table(t[:, 0], t[:, 1], t[:, 2], t[:, 3], t[:, 4])
        self.steps = rows
        if len(seq) == 1 and seq.whole is not None:  # one sequence: a strided view of it
            whole = seq.whole(0)
            self._view = whole[: B * per].reshape(B, per, *whole.shape[1:])

    def _table(self, stream: Array, row: Array, seq: Array, item: Array, n: Array) -> None:
        """The pieces, sorted by stream then step; stream j's are first[j]..first[j+1]-1."""
        self._row, self._seq, self._item, self._n = row, seq, item, n
        self._first = np.searchsorted(stream, np.arange(self.batch + 1), side="left")

    def pieces(self, j: int) -> list[tuple[int, int, int, int]]:
        """Stream j's pieces as (sequence, first item, first step, steps), in step order."""
        lo, hi = self._first[j], self._first[j + 1]
        return [
            (int(self._seq[p]), int(self._item[p]), int(self._row[p]), int(self._n[p]))
            for p in range(lo, hi)
        ]

    def shard(self, rank: int, world: int) -> Streams:
        """The streams rank B / world .. (rank + 1) B / world - 1 of this layout (a view)."""
        world = check_int("world", world)
        rank = check_int("rank", rank, 0)
        if rank >= world:
            raise InputError(f"rank must be below world={world}, got {rank}")
        if self.batch % world:
            raise InputError(
                f"batch={self.batch} streams cannot be shared equally by {world} processes: "
                f"use a batch divisible by {world}"
            )
        if len(self.columns) != self.batch:
            raise InputError("shard() of a shard: take the shard of the whole layout")
        out = object.__new__(Streams)
        out.__dict__.update(self.__dict__)
        per = self.batch // world
        out.columns = range(rank * per, (rank + 1) * per)
        return out

    # -- reading --------------------------------------------------------------------------------
    def chunks(self, length: int) -> int:
        """The number of chunks of `length` steps in an epoch (the last may be shorter)."""
        return math.ceil(self.steps / check_int("length", length))

    def chunk(self, i: int, length: int) -> Chunk:
        """Chunk i of an epoch: steps i L .. min((i + 1) L, steps) - 1 (i taken modulo chunks)."""
        i = check_int("i", i, 0) % self.chunks(length)
        a = i * length
        return self._finish(*self._rows(a, min(a + length, self.steps)))

    def read(self, t: int, k: int) -> Chunk:
        """Steps t..t+k-1 of the endless stream: epochs follow one another, each from step 0."""
        t, k = check_int("t", t, 0), check_int("k", k)
        parts = []
        while k:
            a = t % self.steps
            n = min(k, self.steps - a)
            parts.append(self._rows(a, a + n))
            t, k = t + n, k - n
        if len(parts) == 1:
            return self._finish(*parts[0])
        x, y, mask, reset = (np.concatenate(p) for p in zip(*parts, strict=True))
        return self._finish(x, y, mask, reset)

    def _finish(self, x: Array, y: Array, mask: Array, reset: Array) -> Chunk:
        if self.transform is not None:
            x, y = self.transform(x, y)
        return x, y, None if mask.all() else mask, reset if reset.any() else None

    def _source(self, i: int, a: int, b: int) -> tuple[Array, Array | None]:
        """Items a..b-1 of sequence i as arrays: (x, y) paired, (items, None) otherwise."""
        got = self.sequences.read(i, a, b)
        if self.sequences.paired:
            x, y = got
            return np.asarray(x), np.asarray(y)
        return np.asarray(got), None

    def _rows(self, a: int, b: int) -> tuple[Array, Array, Array, Array]:
        """Steps a..b-1 of this object's streams within an epoch: x, y, mask (all), reset (all)."""
        k, cols = b - a, self.columns
        nb = len(cols)
        reset = np.zeros((k, nb), bool)
        if a == 0:
            reset[0] = True  # every stream starts (again) here
        if self._view is not None:  # one sequence cut into B parts: one strided read
            v = self._view[cols.start : cols.stop]  # (nb, items per stream, ...)
            x = np.ascontiguousarray(np.swapaxes(v[:, a:b], 0, 1))  # (k, nb, ...)
            y = np.ascontiguousarray(np.swapaxes(v[:, a + 1 : b + 1], 0, 1))
            return x, y, np.ones((k, nb)), reset
        (xs, xd), (ys, yd) = self._x_item, self._y_item
        x = np.zeros((k, nb, *xs), xd)
        y = np.zeros((k, nb, *ys), yd)
        mask = np.zeros((k, nb))
        lengths = self.sequences.lengths
        for c, j in enumerate(cols):
            lo, hi = self._first[j], self._first[j + 1]
            rows = self._row[lo:hi]
            p0 = max(int(np.searchsorted(rows, a, side="right")) - 1, 0)
            p1 = int(np.searchsorted(rows, b, side="left"))
            for p in range(lo + p0, lo + p1):
                r0 = max(a, int(self._row[p]))
                r1 = min(b, int(self._row[p] + self._n[p]))
                if r1 <= r0:
                    continue
                i = int(self._seq[p])
                q0 = int(self._item[p]) + r0 - int(self._row[p])  # first item read
                q1 = q0 + r1 - r0
                if self.sequences.paired:
                    xi, yi = self._source(i, q0, q1)
                    x[r0 - a : r1 - a, c] = xi
                    y[r0 - a : r1 - a, c] = yi
                    m = r1 - r0
                else:  # the next item is the target; none after the sequence's last
                    items = self._source(i, q0, min(q1 + 1, int(lengths[i])))[0]
                    x[r0 - a : r1 - a, c] = items[: r1 - r0]
                    m = len(items) - 1
                    y[r0 - a : r0 - a + m, c] = items[1:]
                mask[r0 - a : r0 - a + m, c] = 1.0
                if q0 == 0:
                    reset[r0 - a, c] = True  # sequence i starts here
        return x, y, mask, reset
