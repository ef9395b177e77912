"""Layout (b) of SEMANTICS.md 9: a rollout cut into segments, trained in shuffled minibatches.

Each environment's rollout is cut at every episode start and, counting from each episode's first
step in the rollout (step 0 for an episode that began before it), every `length` steps. Segment s
is steps t0 .. t1 of environment n. Its reference, with e the first step of its episode in the
rollout and b = burn_in:

    tb = max(t0 - b, e)
    h  = h_init if starts[tb, n] else states[tb, n]
    for t = tb .. t0 - 1:   (no gradient)  _, h = step(x[t, n], h)
    h  = detach(h)
    for t = t0 .. t1:       y[t - t0, s], h = step(x[t, n], h)

Segments are independent, so a minibatch of them is one set of pieces for packing.py: the
burn-ins run first (no gradient, their final states exact), then the segments from them, in
rounds. The outputs are laid out (L, S', ...), L the longest segment of the plan: column j holds
segment index[j], its i-th step in row i, then zeros (padding no computation touches).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from . import packing
from . import state as st
from .packing import as_index, put, take
from .rl_base import (
    batch_dims,
    check_buffer,
    check_like,
    check_module,
    check_starts,
    described,
    h_init,
    take_at,
)

Tensor = torch.Tensor


class Segments:
    """The plan of layout 9(b) for a rollout's starts (T, N) bool.

    Args:
        starts: (T, N) bool tensor, true at the first step of an episode.
        length: the longest segment, in steps; None: segments end only at episode starts.
        burn_in: steps run without gradient before a segment that starts inside an episode.

    Attributes: env, t0, lengths (S,) the segments (environment-major, then in time order);
    mask (L, S) bool, true on each segment's steps; stored (T, N) bool, the steps whose stored
    state some segment or burn-in starts from (states is read there, and only there).
    """

    def __init__(self, starts: Tensor, length: int | None = None, burn_in: int = 0) -> None:
        T, N = check_starts(starts)
        if length is not None and not _integer(length, 1):
            raise InputError(f"length must be an integer >= 1 or None, got {length!r}")
        if not _integer(burn_in, 0):
            raise InputError(f"burn_in must be an integer >= 0, got {burn_in!r}")
        self.T, self.N = T, N
        self.length, self.burn_in = length, int(burn_in)
        s = starts.cpu().numpy()  # (T, N)
        step = np.arange(T)[:, None]  # (T, 1)
        e = np.maximum.accumulate(np.where(s, step, 0), axis=0)  # (T, N) its episode's first step
        cut = (step - e) % length == 0 if length else step == e  # (T, N) a segment starts here
        n, t0 = np.nonzero(cut.T)  # (S,) environment-major, then in time order
        same = np.r_[n[1:] == n[:-1], False]
        self._env, self._t0 = n, t0
        self._len = np.where(same, np.r_[t0[1:], 0], T) - t0  # (S,)
        tb = np.maximum(t0 - self.burn_in, e[t0, n])  # (S,) the first step run
        self._burn = t0 - tb  # (S,) burn-in steps
        self._tb_stored = np.where(s[tb, n], -1, tb)  # (S,) the stored state read, -1: h_init
        self.env = torch.as_tensor(n)
        self.t0 = torch.as_tensor(t0)
        self.lengths = torch.as_tensor(self._len)
        self.L = int(self._len.max())
        self.mask = torch.arange(self.L)[:, None] < self.lengths[None, :]  # (L, S)
        stored = np.zeros((T, N), bool)
        read = self._tb_stored >= 0
        stored[self._tb_stored[read], n[read]] = True
        self.stored = torch.as_tensor(stored)

    def __len__(self) -> int:
        return int(self._env.size)

    def __repr__(self) -> str:
        return (
            f"Segments(S={len(self)}, L={self.L}, T={self.T}, N={self.N}, length={self.length}, "
            f"burn_in={self.burn_in})"
        )

    def minibatches(self, size: int, generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """ceil(S / size) index tensors, a shuffled partition of the segments."""
        if not _integer(size, 1):
            raise InputError(f"size must be an integer >= 1, got {size!r}")
        return iter(torch.randperm(len(self), generator=generator).split(int(size)))

    def gather(self, buf: Tensor, index: Tensor | None = None) -> Tensor:
        """buf (T, N, ...) laid out (L, S', ...) for the segments `index` (None: all), zeros on
        the padding."""
        idx = self._index(index)
        check_buffer(buf, "buf", (self.T, self.N))
        src, dst = self._cells(idx)
        flat = buf.reshape(self.T * self.N, *buf.shape[2:])
        out = flat.new_zeros(self.L * idx.size, *buf.shape[2:])
        out = out.index_copy(
            0, as_index(dst, buf.device), flat.index_select(0, as_index(src, buf.device))
        )
        return out.view(self.L, idx.size, *buf.shape[2:])

    def run(
        self,
        module: nn.Module,
        x: Tensor,
        states: st.State | None = None,
        index: Tensor | None = None,
    ) -> Tensor:
        """y (L, S', ...) of the segments `index` (None: all), by the reference above, with its
        graph; zeros on the padding.

        x: (T, N, ...) the rollout's inputs. states: the state before every step (leaves
        (T, ...), batch axis after the time axis), read where `stored` is true; None is fine
        when the segments chosen (and their burn-ins) all start at an episode start.
        """
        idx = self._index(index)
        check_module(module)
        check_buffer(x, "x", (self.T, self.N))
        init = h_init(module, x)
        dims = batch_dims(module, init, self.N)
        tb = self._tb_stored[idx]  # (S',) the stored state each one reads, -1: h_init
        if states is None and (tb >= 0).any():
            j = int(np.flatnonzero(tb >= 0)[0])
            s = int(idx[j])
            raise InputError(
                f"states is None, but segment {s} (environment {self._env[s]}, steps "
                f"{self._t0[s]}..{self._t0[s] + self._len[s] - 1}) starts from the stored state "
                f"before step {tb[j]}, which is not an episode start; pass states, e.g. "
                "rl.states(module, x, starts, state0, at=segs.stored)"
            )
        if states is not None:
            states = check_like(states, init, "states", self.N, lead=(self.T,))
        env, t0, burn = self._env[idx], self._t0[idx], self._burn[idx]
        h = take(init, as_index(env, x.device), dims)  # batch S': h_init rows, and ...
        if states is not None:  # ... the stored state where one is read
            take_at(states, tb, env, dims, h)
        warm = np.flatnonzero(burn > 0)
        if warm.size:  # the burn-ins, without gradient: their final states exact, then detached
            rows = as_index(warm, x.device)
            pieces = packing.independent(
                env[warm], t0[warm] - burn[warm], burn[warm], need_end=True
            )
            with torch.no_grad():
                _, ends = packing.execute(module, x, pieces, take(h, rows, dims), dims)
            put(h, rows, st.detach(ends), dims)
        pieces = packing.independent(env, t0, self._len[idx], need_end=False)
        out = (np.arange(idx.size), idx.size, self.L * idx.size)  # row i S' + j
        y, _ = packing.execute(module, x, pieces, h, dims, out=out)
        return y.view(self.L, idx.size, *y.shape[1:])

    # -- helpers --------------------------------------------------------------------------------
    def _index(self, index: object) -> np.ndarray:
        """index as numpy int64 (S',): in range, no repeats."""
        S = len(self)
        if index is None:
            return np.arange(S)
        if not (
            isinstance(index, Tensor)
            and not index.is_floating_point()
            and index.dim() == 1
            and index.dtype not in (torch.bool, torch.complex64, torch.complex128)
        ):
            raise InputError(
                f"index must be a 1-D integer tensor of segment numbers, got {described(index)}"
            )
        a = index.cpu().numpy().astype(np.int64)
        if a.size == 0:
            raise InputError("index must name at least one segment, got an empty tensor")
        bad = a[(a < 0) | (a >= S)]
        if bad.size:
            raise InputError(
                f"index holds {int(bad[0])}, out of range for {S} segments (0..{S - 1})"
            )
        u, counts = np.unique(a, return_counts=True)
        if (counts > 1).any():
            raise InputError(f"index repeats segment {int(u[counts > 1][0])}; each may appear once")
        return a

    def _cells(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat positions of the chosen segments' steps in (T, N) and in (L, S')."""
        i = np.arange(self.L)[:, None]  # (L, 1)
        valid = i < self._len[idx][None, :]  # (L, S')
        src = (self._t0[idx][None, :] + i) * self.N + self._env[idx][None, :]
        dst = i * idx.size + np.arange(idx.size)[None, :]
        return src[valid], dst[valid]


def _integer(v: object, low: int) -> bool | np.bool_:  # numpy's bool for a numpy integer
    return not isinstance(v, bool) and isinstance(v, int | np.integer) and v >= low
