"""Rounds: how pieces of steps that start together are grouped into calls (packing.py, level 0).

Each round is one call of the module: `size` steps on the pieces in it, each from its current
offset. A piece takes part in rounds whose sizes add up to at least its length; a piece whose
final state is read (need_end) in rounds adding up to exactly its length. The round sizes add up
to the longest length L (the sequential steps of one call over the longest piece), and there are
at most floor(log2 L) + 1 rounds, whatever the number of pieces.

    binary    exact: L split as 1, 2, 4, ..., 2^(j-1) and R = L - (2^j - 1), j the largest with
              2^j - 1 <= L (so 1 <= R <= 2^j): every length l <= L is R (if l >= 2^j) plus
              binary digits below 2^j (L = 13: rounds of 6, 4, 2, 1; l = 9 = 6 + 2 + 1)
    classes   a few lengths c_1 > c_2 > ... > c_m (every read end among them), rounds of
              c_1 - c_2, ..., c_m: a piece of class c joins at its round and runs on, so a piece
              whose end is read runs exactly; any other takes the smallest class >= its length
              and leaves after the round in which it ends (padded at its end, outputs dropped)

The cheaper one by CALL * calls + padded row-steps is used, and classes only with fewer calls.
"""

from __future__ import annotations

import numpy as np

CALL = 128  # a call's fixed cost in row-steps: torch's CPU LSTM, ~0.5 ms against ~3-4 us per row
CANDIDATES = 24  # at most this many class lengths tried beside the read ends (the DP is K^2)


def rounds(length: np.ndarray, need_end: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(size, which, offset) per round, for pieces of these lengths (S,) whose final states are
    read where need_end (S,): `which` indexes the pieces, `offset` their steps done before."""
    binary = _binary(length)
    if np.unique(length[need_end]).size >= len(binary):  # classes cannot make fewer calls
        return binary
    classes, cost = _classes(length, need_end)
    if cost >= CALL * len(binary):
        return binary
    cls = np.sort(classes)[::-1]  # c_1 > ... > c_m
    own = cls[np.searchsorted(-cls, -length, side="right") - 1]  # (S,) the smallest class >= l
    out = []
    for i, c in enumerate(cls):
        size = int(c - (cls[i + 1] if i + 1 < cls.size else 0))
        offset = own - c  # (S,) steps done before this round, for the pieces in it
        which = np.flatnonzero((own >= c) & (offset < length))  # joined, not yet finished
        out.append((size, which, offset[which]))
    return out


def _binary(length: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    L = int(length.max())
    j = (L + 1).bit_length() - 1  # 2^j - 1 <= L < 2^(j+1) - 1
    R = L - (1 << j) + 1
    uses_R = length >= (1 << j)
    rest = np.where(uses_R, length - R, length)  # < 2^j: binary digits
    done = np.zeros_like(length)
    out = []
    for size, b in sorted([(R, -1), *((1 << b, b) for b in range(j))], reverse=True):
        which = np.flatnonzero(uses_R if b < 0 else rest & (1 << b))
        if which.size:
            out.append((size, which, done[which].copy()))
            done[which] += size
    return out


def _classes(length: np.ndarray, need_end: np.ndarray) -> tuple[np.ndarray, float]:
    """The classes minimising CALL * (number of classes) + padded rows, by dynamic programming
    over the distinct lengths v (the longest always a class, the read ends always classes)."""
    v = np.unique(length)  # (K,) ascending: the candidate classes
    if v.size > CANDIDATES:  # the read ends, the longest, and quantiles of the others
        free = np.quantile(length[~need_end], np.linspace(0, 1, CANDIDATES), method="higher")
        v = np.unique(np.r_[length[need_end], free, length.max()])
    K = v.size
    pos = np.searchsorted(v, length[~need_end])
    count = np.r_[0, np.cumsum(np.bincount(pos, minlength=K))]  # (K + 1,) free pieces <= v[i-1]
    total = np.r_[0, np.cumsum(np.bincount(pos, weights=length[~need_end], minlength=K))]
    forced = np.isin(v, length[need_end])
    best = np.zeros(K + 1)  # best[i + 1]: the cost of lengths <= v[i] with a class at v[i]
    back = np.zeros(K + 1, np.int64)
    last = 0  # best's index of the last forced class before i (0: none)
    for i in range(K):
        j = np.arange(last, i + 1)  # the previous class is v[j - 1] (j = 0: none)
        pad = v[i] * (count[i + 1] - count[j]) - (total[i + 1] - total[j])
        cost = best[j] + CALL + pad
        best[i + 1], back[i + 1] = cost.min(), j[cost.argmin()]
        if forced[i]:
            last = i + 1
    chosen, i = [], K
    while i > 0:
        chosen.append(v[i - 1])
        i = back[i]
    return np.array(chosen), float(best[K])
