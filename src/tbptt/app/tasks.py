"""Synthetic long-memory tasks, generated as their papers define them: time-major x, y, mask.

Adding problem (Hochreiter and Schmidhuber 1997, "Long short-term memory", experiment 4).
Each step's input is a pair (value, marker). Values are uniform in [-1, 1]. A sequence has a random
length between T and T + T/10. Exactly two pairs are marked with 1.0: one of the first ten pairs
(value X1) and one of the first T/2 - 1 pairs still unmarked (value X2). The markers of the other
pairs are 0, except the first and the last pair, marked -1 (X1 is set to 0 in the rare case where
the first pair got marked). The only target is at the last step: 0.5 + (X1 + X2) / 4, the sum
scaled to [0, 1]; a sequence counts as solved when the absolute error there is below 0.04.

Copy memory (Arjovsky, Shah and Bengio 2016, "Unitary evolution recurrent neural networks", 4.1).
Ten categories a_0..a_9. The input has T + 20 steps: 10 symbols drawn uniformly with replacement
from a_0..a_7, then T - 1 blanks a_8, the delimiter a_9, then 10 blanks. The target is T + 10
blanks followed by the 10 symbols in order. The loss is the cross-entropy at every step; a model
that outputs blanks and then guesses reaches 10 log(8) / (T + 20) nats per step, the baseline.

Influence balancing (Tallec and Ollivier 2017) lives in tbptt/influence.py when it is installed.

Arrays are time-major: x (T, batch, m), y (T, batch, p) for L2 or (T, batch) class indices,
mask (T, batch) with 1 where a step has a target.
"""

from __future__ import annotations

import math

import numpy as np

from ..checks import check_int

Array = np.ndarray

ADDING_TOLERANCE = 0.04  # the paper's criterion for a correctly processed sequence
COPY_SYMBOLS, COPY_BLANK, COPY_DELIMITER, COPY_LENGTH = 8, 8, 9, 10


def adding_problem(T: int, batch: int, rng: np.random.Generator) -> tuple[Array, Array, Array]:
    """`batch` adding-problem sequences of lengths in [T, T + T/10], padded at the end.

    Returns x (Tmax, batch, 2), y (Tmax, batch, 1) and mask (Tmax, batch): the mask is 1 only at
    each sequence's last step; padded steps (after a shorter sequence's end) have x = 0, mask 0.
    """
    T = check_int("T", T, 22)  # the first ten pairs lie within the first T/2 - 1
    batch = check_int("batch", batch, 1)
    lengths = rng.integers(T, T + T // 10, endpoint=True, size=batch)  # lengths in [T, T + T/10]
    Tmax = int(lengths.max())
    x = np.zeros((Tmax, batch, 2))  # (Tmax, batch, 2): value, marker
    y = np.zeros((Tmax, batch, 1))
    mask = np.zeros((Tmax, batch))
    half = T // 2 - 1  # X2 is one of the first T/2 - 1 pairs still unmarked
    for j, length in enumerate(lengths):
        x[:length, j, 0] = rng.uniform(-1.0, 1.0, size=length)
        first = int(rng.integers(10))  # one of the first ten pairs
        second = int(rng.integers(half))  # one of the first T/2 - 1 pairs still unmarked
        second += second >= first  # (skipping the one marked first)
        x[0, j, 1] = x[length - 1, j, 1] = -1.0  # the first and last pair are marked -1 ...
        x[[first, second], j, 1] = 1.0  # ... unless marked for the sum
        if first == 0:
            x[0, j, 0] = 0.0  # X1 = 0 when the first pair got marked
        X1, X2 = x[first, j, 0], x[second, j, 0]
        y[length - 1, j, 0] = 0.5 + (X1 + X2) / 4.0
        mask[length - 1, j] = 1.0
    return x, y, mask


def copy_memory(lag: int, batch: int, rng: np.random.Generator) -> tuple[Array, Array, Array]:
    """`batch` copy-memory sequences of lag + 20 steps.

    Returns x (lag + 20, batch, 10) one-hot, y (lag + 20, batch) class indices, mask of ones.
    """
    lag = check_int("lag", lag, 1)
    batch = check_int("batch", batch, 1)
    T = lag + 2 * COPY_LENGTH
    symbols = rng.integers(COPY_SYMBOLS, size=(COPY_LENGTH, batch))  # from a_0..a_7
    inputs = np.full((T, batch), COPY_BLANK)
    inputs[:COPY_LENGTH] = symbols
    inputs[COPY_LENGTH + lag - 1] = COPY_DELIMITER  # after 10 symbols and lag - 1 blanks
    y = np.full((T, batch), COPY_BLANK)
    y[-COPY_LENGTH:] = symbols  # T + 10 blanks, then the symbols in order
    x = np.eye(COPY_DELIMITER + 1)[inputs]  # (T, batch, 10)
    return x, y, np.ones((T, batch))


def copy_memory_baseline(lag: int) -> float:
    """Nats per step of the memoryless strategy: blanks, then a uniform guess among 8 symbols."""
    return COPY_LENGTH * math.log(COPY_SYMBOLS) / (lag + 2 * COPY_LENGTH)


class TaskStreams:
    """`batch` endless streams of independent sequences, each from its own seed.

    Sequence i of stream j is drawn with np.random.default_rng((seed, 0, j, i)), so the data at a
    given step never depends on how the stream was read. Each sequence's first step has reset set:
    the state restarts from h0 there (SEMANTICS.md 6). chunk(t, k) returns steps t..t+k-1; reading
    is sequential (going back to an earlier t reads the streams again from the start).
    """

    def __init__(self, make, batch: int, seed: int) -> None:
        self.make, self.batch, self.seed = make, batch, seed
        self._restart()

    def _restart(self) -> None:
        self.t = 0
        self.count = [0] * self.batch  # sequences drawn per stream
        self.pending: list[list[tuple]] = [[] for _ in range(self.batch)]  # (x, y, mask, reset)

    def _take(self, j: int, k: int) -> list[Array]:
        parts, need = [], k
        while need:
            if not self.pending[j]:
                x, y, mask = self.make(np.random.default_rng((self.seed, 0, j, self.count[j])))
                reset = np.zeros(len(x), bool)
                reset[0] = True
                self.pending[j] = [(x[:, 0], y[:, 0], mask[:, 0], reset)]
                self.count[j] += 1
            x, y, mask, reset = self.pending[j][0]
            n = min(need, len(x))
            parts.append((x[:n], y[:n], mask[:n], reset[:n]))
            self.pending[j][0] = (x[n:], y[n:], mask[n:], reset[n:])
            if n == len(x):
                self.pending[j].pop(0)
            need -= n
        return [np.concatenate(a) for a in zip(*parts, strict=True)]

    def chunk(self, t: int, k: int) -> tuple[Array, Array, Array, Array]:
        if t < self.t:
            self._restart()
        while self.t < t:  # fast-forward (a resumed run)
            step = min(t - self.t, 4096)
            for j in range(self.batch):
                self._take(j, step)
            self.t += step
        columns = [self._take(j, k) for j in range(self.batch)]
        self.t += k
        x, y, mask, reset = (np.stack(a, axis=1) for a in zip(*columns, strict=True))
        return x, y, mask, reset  # (k, batch, m), (k, batch[, p]), (k, batch), (k, batch)


def validation_set(make, count: int, seed: int) -> tuple[Array, Array, Array, Array]:
    """`count` sequences side by side, aligned at their ends (shorter ones padded at the start
    with masked steps and a reset at their first real step): x, y, mask, reset.

    Sequence j is drawn with np.random.default_rng((seed, 1, j)): never one of TaskStreams'.
    """
    seqs = [make(np.random.default_rng((seed, 1, j))) for j in range(count)]
    T = max(len(s[0]) for s in seqs)
    x = np.zeros((T, count, seqs[0][0].shape[-1]))
    y = np.zeros((T, count, *seqs[0][1].shape[2:]), seqs[0][1].dtype)
    mask = np.zeros((T, count))
    reset = np.zeros((T, count), bool)
    for j, (xs, ys, ms) in enumerate(seqs):
        x[T - len(xs) :, j], y[T - len(xs) :, j], mask[T - len(xs) :, j] = (
            xs[:, 0],
            ys[:, 0],
            ms[:, 0],
        )
        reset[T - len(xs), j] = True
    return x, y, mask, reset
