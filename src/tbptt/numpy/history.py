"""The kept steps of the rules that backpropagate windows (tbptt.py, artbp.py): x_t, h_t and e_t,
contiguous in time across the pieces of the stream.

A window's parameter gradients (5.3) are then one product each over its stacked steps, however
many pieces (and parameter values) it spans.
"""

from __future__ import annotations

import numpy as np

from ..inputs import OneHot
from .elman import ElmanRNN, Trajectory
from .rule import Shell

Array = np.ndarray


class History:
    """x_t, h_t and e_t of the kept steps, contiguous in time.

    Row j of x and e holds step `first` + j; row j of h holds h_{first + j - 1}, so steps s..u
    read h_{t-1} as h[s - first : u - first + 1] and h_t one row later. The forward pass writes its
    states straight into h. Steps no window can reach are dropped by moving the kept rows to the
    front when room is needed (amortized: the buffers hold at least twice what is kept).
    """

    def __init__(self, h: Array, m: int, p: int, onehot: bool = False) -> None:
        self.batch, self.n = h.shape
        self.m, self.p, self.dtype = m, p, h.dtype
        self.onehot = onehot  # x holds the ids (cap, batch) of one-hot inputs
        self.first, self.rows = 1, 0  # step held by row 0, number of steps held
        self._alloc(0)
        self.h[0] = h

    def _alloc(self, cap: int) -> None:
        b, dt = self.batch, self.dtype
        self.cap = cap
        self.x = np.empty((cap, b), np.intp) if self.onehot else np.empty((cap, b, self.m), dt)
        self.h = np.empty((cap + 1, b, self.n), dt)  # (cap + 1, batch, n)
        self.e = np.empty((cap, b, self.p), dt)  # (cap, batch, p)

    def reserve(self, L: int, keep_from: int) -> int:
        """Room for L more steps, dropping the steps before keep_from; returns the next free row."""
        if self.rows + L <= self.cap:
            return self.rows
        drop = min(max(0, keep_from - self.first), self.rows)
        kept = self.rows - drop
        old = (self.x, self.h, self.e)
        if kept + L > self.cap // 2:  # grow: keep the buffers at least twice what they hold
            self._alloc(2 * (kept + L))
        self.x[:kept] = old[0][drop : self.rows]  # numpy copies overlapping rows safely
        self.h[: kept + 1] = old[1][drop : self.rows + 1]
        self.e[:kept] = old[2][drop : self.rows]
        self.first += drop
        self.rows = kept
        return kept

    def inputs(self, a: int, c: int) -> Array | OneHot:
        """x_t of rows a..c-1: (c - a, batch, m), or a OneHot of their ids."""
        return OneHot.checked(self.x[a:c], self.m) if self.onehot else self.x[a:c]

    def run(
        self, trainer: Shell, x, y: Array, mask, reset, keep_from: int
    ) -> tuple[Trajectory, Array]:
        """Run the next piece through the trainer's forward pass (its states written here) and
        keep its x_t, h_t and e_t; steps before keep_from may be dropped. Returns the trajectory
        and l_t (L, batch)."""
        L = len(x)
        row = self.reserve(L, keep_from)
        # our own copy of x (L, batch, m) or its ids (L, batch): the caller may refill its buffer
        self.x[row : row + L] = x.ids if self.onehot else x
        xs = self.inputs(row, row + L)
        traj, l, e = trainer.forward(xs, y, mask, reset, hs=self.h[row : row + L + 1])
        self.e[row : row + L] = e
        self.rows = row + L
        return traj, l


class KeepsSteps:
    """What the rules that backpropagate kept steps share (tbptt.py, artbp.py): their History,
    made by the first chunk."""

    history: History | None = None

    @property
    def hist(self) -> History:
        """The kept steps (start() makes them)."""
        assert self.history is not None, "the first chunk starts the history"
        return self.history

    def bind(self, model: ElmanRNN) -> None:
        pass

    def start(self, trainer: Shell, h0: Array) -> None:
        self.history = History(h0, trainer.model.m, trainer.model.p)
