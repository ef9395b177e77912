"""tbptt.streams for torch's DataLoader: each chunk of the B streams is one batch, in order.

    from tbptt.streams import Streams
    from tbptt.torch.streams import StreamDataset, StreamLoader

    dataset = StreamDataset(Streams(sequences, batch=32), length=64)   # batch i = chunk i
    loader = StreamLoader(dataset, num_workers=2)     # a DataLoader that knows its position
    for x, y, mask, reset in loader:                  # (L, B, ...), (L, B, ...), (L, B), (L, B)
        driver.feed(x, y, mask, reset)                # mask, reset: None when all 1 / all False

The dataset yields whole batches (the DataLoader's batch_size is None), made by the numpy core
(tbptt/streams.py): x and y as tensors (floating ones in `dtype` when given), mask in `dtype`
(or torch's default), reset bool; (B, L, ...) when batch_first.

Order with several workers. Worker w of W produces the chunks start + w, start + w + W,
start + w + 2W, ... of the epoch: whole batches, in turn. DataLoader hands out its workers'
items round robin (in_order=True, its default), skipping a worker once it has run out, so batch
i is chunk start + i: nothing duplicated, dropped or reordered, whatever W.

Several processes. Rank r of W reads the streams r B/W .. (r+1) B/W - 1 (Streams.shard), the
contiguous share tbptt.torch's data-parallel driver expects; every rank reads chunks of the same
lengths. Unless rank and world are given, they are torch.distributed's when an iteration starts in
the main process (so a dataset made before the process group, as for Trainer.fit(model, loader),
is sharded all the same); DataLoader workers use what the main process saw when the dataset was
made or StreamLoader started them (with a plain DataLoader and workers, make the dataset after
init_process_group, or give rank and world).

Resume. dataset.start is the chunk the next iteration begins at (it falls back to 0 after one
iteration). StreamLoader counts the batches it hands out in the current epoch; state_dict()
returns that position and load_state_dict() makes the next iteration begin there, so a resumed
run reads the chunk the uninterrupted run would have read next. Lightning saves a loader's
state_dict() in its checkpoints and restores it (any loader with those two methods); with a plain
DataLoader set dataset.start yourself. The loader draws its workers' seed from its own generator,
never from torch's global one, so making an iterator does not move the random numbers a model
with dropout uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import InputError
from ..streams import Streams

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor, Tensor | None, Tensor | None]


class StreamDataset(IterableDataset):
    """The chunks of `length` steps of a tbptt.streams.Streams, one batch each (module docstring).

    Args:
        streams: the B streams (tbptt.streams.Streams).
        length: L, the steps per chunk (the last chunk of an epoch may be shorter).
        dtype: floating x, y and the mask are converted to it (None: x and y keep the numpy
            dtype, the mask gets torch's default dtype).
        batch_first: (B, L, ...) instead of time-major (L, B, ...).
        rank, world: this process's share of the streams; None: torch.distributed's when it is
            initialized, else all of them.
    """

    def __init__(
        self,
        streams: Streams,
        length: int,
        *,
        dtype: torch.dtype | None = None,
        batch_first: bool = False,
        rank: int | None = None,
        world: int | None = None,
    ) -> None:
        if not isinstance(streams, Streams):
            raise InputError(
                f"streams must be a tbptt.streams.Streams, got {type(streams).__name__}"
            )
        self.chunks = streams.chunks(length)  # checks length
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InputError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        if not isinstance(batch_first, bool):
            raise InputError(f"batch_first must be a bool, got {batch_first!r}")
        if (rank is None) != (world is None):
            raise InputError(f"give both rank and world, or neither; got {rank=}, {world=}")
        self.layout, self.rank, self.world = streams, rank, world
        self.length, self.dtype, self.batch_first = length, dtype, batch_first
        self.start = 0  # the chunk the next iteration begins at
        self.select()

    def select(self) -> None:
        """Take this process's streams: rank and world as given, else torch.distributed's now."""
        if self.rank is not None:
            assert self.world is not None  # __init__ took both or neither
            rank, world = self.rank, self.world
        else:
            rank, world = _process()
        self.streams = self.layout.shard(rank, world) if world > 1 else self.layout

    def __len__(self) -> int:
        return self.chunks

    def __iter__(self) -> Iterator[Batch]:
        start, self.start = self.start % self.chunks, 0  # read now: a generator would read late
        info = get_worker_info()
        if info is None:
            self.select()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        return (self.batch(i) for i in range(start + w, self.chunks, W))

    def batch(self, i: int) -> Batch:
        """Chunk i of the epoch as tensors: x, y, mask (or None), reset (or None)."""
        x, y, mask, reset = self.streams.chunk(i, self.length)
        x, y = self._tensor(x), self._tensor(y)
        m = None
        if mask is not None:
            m = torch.from_numpy(mask).to(self.dtype or torch.get_default_dtype())
        r = None if reset is None else torch.from_numpy(reset)
        if self.batch_first:
            x, y = x.transpose(0, 1).contiguous(), y.transpose(0, 1).contiguous()
            m = None if m is None else m.T.contiguous()
            r = None if r is None else r.T.contiguous()
        return x, y, m, r

    def _tensor(self, a: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t


def _process() -> tuple[int, int]:
    """(rank, world) of torch.distributed's default group, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


REFUSED = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")


class StreamLoader(DataLoader):
    """A DataLoader over a StreamDataset that knows its position (module docstring).

    Takes DataLoader's other arguments (num_workers, pin_memory, persistent_workers,
    prefetch_factor, ...); batch_size, shuffle, samplers and drop_last are the dataset's affair.
    """

    dataset: StreamDataset  # __init__ takes nothing else (DataLoader refuses to replace it)

    def __init__(self, dataset: StreamDataset, **kwargs: Any) -> None:
        if not isinstance(dataset, StreamDataset):
            raise InputError(
                f"dataset must be a tbptt.torch.streams.StreamDataset, got {type(dataset).__name__}"
            )
        bad = [k for k in REFUSED if k in kwargs]
        if bad:
            raise InputError(
                f"StreamLoader does not take {', '.join(bad)}: the dataset yields whole batches, "
                "chunk i of every stream as batch i"
            )
        if kwargs.get("in_order", True) is not True:
            raise InputError("in_order must be True: batch i is chunk i only in the workers' order")
        kwargs.setdefault("generator", torch.Generator())  # leave the global generator alone
        super().__init__(dataset, batch_size=None, **kwargs)
        self.position = 0  # chunks handed out in the current epoch
        self._resume = 0

    def __iter__(self) -> Iterator[Batch]:
        ds: StreamDataset = self.dataset
        start, self._resume = self._resume, 0
        ds.start = start
        ds.select()  # the process group may have been made since the dataset
        it = super().__iter__()  # workers (if any) take their copy of the dataset here
        ds.start = 0  # the main process's copy, read now only when num_workers=0
        self.position = start
        return self._count(it)

    def _count(self, it: Iterator[Batch]) -> Iterator[Batch]:
        for b in it:
            self.position += 1
            yield b

    def state_dict(self) -> dict[str, int]:
        """The position in the epoch (chunks handed out) and the layout it refers to."""
        ds: StreamDataset = self.dataset
        return {
            "position": self.position,
            "chunks": ds.chunks,
            "length": ds.length,
            "streams": ds.streams.batch,
            "steps": ds.streams.steps,
        }

    def load_state_dict(self, sd: dict[str, int]) -> None:
        """Begin the next iteration where state_dict() was taken (the next epoch if at its end)."""
        here = self.state_dict()
        for k in ("chunks", "length", "streams", "steps"):
            if sd.get(k) != here[k]:
                raise InputError(
                    f"the saved loader read {sd.get(k)} {k}, this one {here[k]}: resume with the "
                    "same sequences, batch and chunk length"
                )
        self._resume = int(sd["position"]) % here["chunks"]
        self.position = self._resume
