"""Packing: many streams, cut into pieces at their resets, run in a few calls of the module.

A stream (an environment of a rollout, a stream of the driver) is cut into pieces where it resets
and where the gradient is cut. A piece starts from a *given* state (the state entering the rollout,
or the restart state where reset[t, n]: SEMANTICS.md 6 (6.1), 9) or *carries* the final state of
the piece before it (across a BPTT cut, detached: 9(a)). The reference computes every piece step
by step; here the pieces run in rounds, each round one call(x_r, h_r) -> (out_r, h_r) of s steps
on the pieces in it, their states gathered along each state tensor's batch axis and scattered back:

    level 0   the pieces that start from a given state are independent: they run in rounds
              (rounds.py) whose sizes add up to the longest piece L, the sequential steps of one
              call over it, at most floor(log2 L) + 1 of them however many streams and resets;
              a piece whose final state is read runs exactly its steps, another may be padded
              at its end when that saves calls.
    level j   pieces that carry a final state run once the pieces before them have: one call per
              level, of the longest member's length, shorter members padded at their end (their
              outputs dropped) when only the longest members' final states are read (the BPTT
              windows of 9(a), where the carrying pieces are the whole windows); else in
              rounds as level 0.

Outputs go where the caller's layout says (position base[i] + step * stride for step `step` of
piece i), in one scatter at the end; cells no piece writes stay zero. The gradient of any function
of the outputs is the reference's: every step is computed once, from the state the reference
uses (a padded tail's steps come after it, and nothing reads them), and the gathers and scatters
are index_select / index_copy (their backward scatters and gathers the same rows).

What a call must allow: out_r rows depend only on their own stream's rows of x_r and h_r (no
batch statistics), and a call over steps a..c equals a call over a..b followed by b..c from its
final state. The driver assumes the same when it splits a chunk at its resets; torch's nn.RNN,
nn.GRU, nn.LSTM, tbptt.torch.ElmanRNN and Recurrent around them satisfy it. run(..., packed=False)
keeps the batch of the collector instead: one call per step on all streams (the per-step path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch

from ..errors import InputError
from . import state as st
from .rounds import rounds

Tensor = torch.Tensor
Call = Callable[[Tensor, st.State], tuple[Tensor, st.State]]


@dataclass
class Pieces:
    """Runs of steps: piece i is steps t0[i] .. t0[i] + length[i] - 1 of stream env[i].

    The pieces with prev == -1 come first, in the order of the rows of the given states h0.
    """

    env: np.ndarray  # (S,) the stream
    t0: np.ndarray  # (S,) the first step
    length: np.ndarray  # (S,) the number of steps, >= 1
    prev: np.ndarray  # (S,) the piece whose final state it starts from; -1: a row of h0
    cut: np.ndarray  # (S,) bool: the carried state is detached (a BPTT cut)
    level: np.ndarray  # (S,) when it runs: after every piece of a lower level; level[prev] < level
    need_end: np.ndarray  # (S,) bool: its final state is read


def run(
    call: Call,
    x: Tensor,
    starts: Tensor | None,
    state: st.State | None,
    restart: st.State | None = None,
    batch_dims: int | Sequence[int] | None = None,
    *,
    k: int | None = None,
    time_dim: int = 0,
    packed: bool = True,
) -> tuple[Tensor, st.State]:
    """The outputs and the final state of `call` over x, stream n restarting where starts[t, n].

    This is the reference loop of SEMANTICS.md 9(a) (6.1 for the driver), step by step:

        h = state[n]
        for t = 0 .. T-1:
            if starts[t, n]:                      h = restart[n]
            elif k and t > 0 and t % k == 0:      h = detach(h)
            y[t, n], h = call(x[t, n], h)
        final[n] = h

    Args:
        call: call(x_r, h_r) -> (out_r, h_r) on any number B of streams (a module, or the
            driver's _call with its parameters bound).
        x: (T, N, ...), or (N, T, ...) with time_dim=1.
        starts: (T, N) bool ((N, T) with time_dim=1), or None: no restart.
        state: the state before step 0, batch N; None: the call's own initial state, which is
            then taken to be zeros (the driver's convention; restart must be None and k too).
        restart: the state a stream restarts from, batch N (a constant); None: zeros.
        batch_dims: the batch axis of each state tensor, in leaf order, or one int for all (a
            module's state_batch_dim); None: the one axis of size N of each.
        k: cut the gradient (not the value) of the state entering steps k, 2k, ...
        packed: False runs one call per step on all N streams (the per-step path).

    Returns (out (T, N, ...) with its graph, final state with its graph).
    """
    T, N = (x.shape[0], x.shape[1]) if time_dim == 0 else (x.shape[1], x.shape[0])
    s = np.zeros((T, N), bool) if starts is None else starts.detach().cpu().numpy()
    s = s if time_dim == 0 else s.T  # (T, N)
    if state is None:
        if restart is not None or k is not None:
            raise ValueError("state=None needs restart=None and k=None")
        later = np.flatnonzero(s[1:].any(axis=1))  # a restart at t = 0 is zeros -> zeros
        if not later.size:
            return call(x, None)
        r = int(later[0]) + 1
        y0, state = call(x.narrow(time_dim, 0, r), None)
        rest = None if starts is None else starts.narrow(time_dim, r, T - r)
        y1, final = run(
            call, x.narrow(time_dim, r, T - r), rest, state, None, batch_dims,
            time_dim=time_dim, packed=packed,
        )  # fmt: skip
        return torch.cat([y0, y1], dim=time_dim), final
    if batch_dims is None:
        dims = batch_dims_of(state, N)
    elif isinstance(batch_dims, int):
        dims = [batch_dims] * len(st.leaves(state))
    else:
        dims = list(batch_dims)
    cuts = np.zeros((T, N), bool)
    if k is not None:
        cuts[k::k] = True
    if packed and not s[1:].any() and not cuts.any():  # one piece per stream: one call
        return call(x, given(state, restart, np.arange(N), s[0], dims) if s[0].any() else state)
    for name, h in (("state", state), ("restart", restart)):
        for t, d in zip(st.leaves(h), dims, strict=True) if h is not None else ():
            if t.shape[d] != N:
                raise InputError(
                    f"{name} has a tensor of shape {tuple(t.shape)}, batch {t.shape[d]} on axis "
                    f"{d}, but x holds {N} streams"
                )
    if packed:
        pieces = plan(s, cuts.copy(), cuts, "window")
    else:
        pieces = plan(s, np.ones((T, N), bool), cuts, "time")
    G = int((pieces.prev < 0).sum())
    h0 = given(state, restart, pieces.env[:G], s[pieces.t0[:G], pieces.env[:G]], dims)
    y, ends = execute(
        call, x, pieces, h0, dims, time_dim=time_dim, out=(*_flat(pieces, T, N, time_dim), T * N)
    )
    last = np.flatnonzero(pieces.t0 + pieces.length == T)  # each stream's last piece
    last = last[np.argsort(pieces.env[last])]  # (N,)
    final = take(ends, as_index(last, y.device), dims)
    return y.view(x.shape[0], x.shape[1], *y.shape[1:]), final


def batch_dims_of(state: st.State, n: int) -> list[int]:
    """The one axis of size n of each state tensor (InputError when there is not exactly one)."""
    return [st.batch_dim(t, n) for t in st.leaves(state)]


def given(
    state: st.State,
    restart: st.State | None,
    env: np.ndarray,
    restarts: np.ndarray,
    dims: Sequence[int],
) -> st.State:
    """Rows env of `state`, or of `restart` (zeros when None) where restarts: (6.1)."""
    if not restarts.any():
        return take(state, as_index(env, _device(state)), dims)
    rows = as_index(env, _device(state))
    flag = as_index(restarts, _device(state), torch.bool)
    new = []
    for i, (h, d) in enumerate(zip(st.leaves(state), dims, strict=True)):
        h = h.index_select(d, rows)
        shape = [1] * h.dim()
        shape[d] = -1
        r = st.leaves(restart)[i].index_select(d, rows) if restart is not None else h.new_zeros(())
        new.append(torch.where(flag.view(shape), r, h))
    it = iter(new)
    return st.tree_map(lambda _: next(it), state)


def independent(env: np.ndarray, t0: np.ndarray, length: np.ndarray, *, need_end: bool) -> Pieces:
    """Pieces that each start from a given state (a row of h0, in this order)."""
    S = env.size
    return Pieces(
        env=env,
        t0=t0,
        length=length,
        prev=np.full(S, -1),
        cut=np.zeros(S, bool),
        level=np.zeros(S, np.int64),
        need_end=np.full(S, need_end),
    )


def _device(state: st.State) -> torch.device:
    return st.leaves(state)[0].device


# -- plans --------------------------------------------------------------------------------------


def plan(starts: np.ndarray, carry: np.ndarray, cut: np.ndarray, levels: str) -> Pieces:
    """Cut T steps of N streams into pieces at starts (a given restart state) and at carry (the
    final state of the piece before, detached where cut), time-major (T, N) bool masks.

    levels: "window", the number of carry boundaries up to the piece's start (9(a)'s BPTT
    windows: one padded call each); "depth", the number of carries since the last given state;
    "time", the piece's first step (with pieces of one step: the per-step path, all streams
    together). A piece starting at t = 0 without a start is given too (the entering state).
    """
    T, _ = starts.shape
    bound = starts | carry
    bound[0] = True
    n, t = np.nonzero(bound.T)  # (S,), (S,): sorted by stream, then step
    S = t.size
    same = np.r_[n[1:] == n[:-1], False]  # (S,) piece i + 1 continues stream n[i]
    length = np.where(same, np.r_[t[1:], 0], T) - t
    carries = ~starts[t, n] & (t > 0)  # (S,) starts from the previous piece's final state
    prev = np.where(carries, np.arange(S) - 1, -1)
    need_end = ~same | np.r_[carries[1:], False]  # the stream's last piece, or carried on
    if levels == "time":
        level = t
    elif levels == "window":
        level = np.where(carries, np.cumsum(carry, axis=0)[t, n], 0)
    else:  # depth: pieces since the last given one (a stream's first piece is given)
        given_at = np.maximum.accumulate(np.where(carries, 0, np.arange(S)))
        level = np.arange(S) - given_at
    order = np.argsort(carries, kind="stable")  # given pieces first, in stream order
    where = np.empty(S, dtype=np.int64)
    where[order] = np.arange(S)
    prev = prev[order]
    return Pieces(
        env=n[order],
        t0=t[order],
        length=length[order],
        prev=np.where(prev >= 0, where[np.maximum(prev, 0)], -1),
        cut=cut[t, n][order] & carries[order],
        level=level[order],
        need_end=need_end[order],
    )


# -- running a plan -----------------------------------------------------------------------------


def take(state: st.State, rows: Tensor, dims: Sequence[int]) -> st.State:
    """state[rows] along each leaf's batch axis (a new state)."""
    it = iter(dims)
    return st.tree_map(lambda s: s.index_select(next(it), rows), state)


def put(state: st.State, rows: Tensor, new: st.State, dims: Sequence[int]) -> None:
    """state[rows] = new along each leaf's batch axis, in place (autograd records it)."""
    for s, v, d in zip(st.leaves(state), st.leaves(new), dims, strict=True):
        s.index_copy_(d, rows, v)


@overload
def execute(
    call: Call,
    x: Tensor,
    pieces: Pieces,
    h0: st.State,
    dims: Sequence[int],
    *,
    time_dim: int = 0,
    out: tuple[np.ndarray, int, int],
) -> tuple[Tensor, st.State]: ...
@overload
def execute(
    call: Call,
    x: Tensor,
    pieces: Pieces,
    h0: st.State,
    dims: Sequence[int],
    *,
    time_dim: int = 0,
    out: None = None,
) -> tuple[None, st.State]: ...
def execute(
    call: Call,
    x: Tensor,
    pieces: Pieces,
    h0: st.State,
    dims: Sequence[int],
    *,
    time_dim: int = 0,
    out: tuple[np.ndarray, int, int] | None = None,
) -> tuple[Tensor | None, st.State]:
    """Run every piece; returns (outputs, ends).

    x: (T, N, ...) (or (N, T, ...) with time_dim=1, and call then takes (B, s, ...)); h0: the
    given pieces' entering states, batch on dims. out: (base, stride, size): step j of piece i
    goes to row base[i] + j * stride of a (size, ...) tensor (zeros elsewhere); None: no outputs.
    ends: every piece's final state, batch S (a padded piece's is not its own: need_end says
    which are read).
    """
    T, N = (x.shape[0], x.shape[1]) if time_dim == 0 else (x.shape[1], x.shape[0])
    xflat = x.reshape(T * N, *x.shape[2:])  # row t N + n (time-major) or n T + t
    S, G = pieces.env.size, int((pieces.prev < 0).sum())
    device = st.leaves(h0)[0].device
    it = iter(dims)
    cur = st.tree_map(  # batch S: row i holds piece i's state as it runs, then its final state
        lambda h: _grow(h, next(it), S - G), h0
    )
    rows: list[Tensor] = []  # the outputs, flattened (steps, ...)
    where: list[np.ndarray] = []  # their rows in the output tensor (with out)
    for lv in np.unique(pieces.level):
        idx = np.flatnonzero(pieces.level == lv)
        carried = idx[pieces.prev[idx] >= 0]
        if carried.size:  # the final states of the pieces before, cut where a BPTT cut says
            h = take(cur, as_index(pieces.prev[carried], device), dims)
            cut = pieces.cut[carried]
            if cut.all():
                h = st.detach(h)
            elif cut.any():
                h = _detach_rows(h, as_index(cut, device, torch.bool), dims)
            put(cur, as_index(carried, device), h, dims)
        lengths = pieces.length[idx]
        longest = lengths.max()
        if lv > 0 and (lengths[pieces.need_end[idx]] == longest).all():
            schedule = [(int(longest), np.arange(idx.size), np.zeros(idx.size, np.int64))]
        else:
            schedule = rounds(lengths, pieces.need_end[idx])
        ms, src, pos = _gathers(pieces, idx, schedule, _flat(pieces, T, N, time_dim), out, time_dim)
        m_t = as_index(np.concatenate(ms), device)
        src_t = as_index(np.concatenate([a.ravel() for a in src]), device)
        a = b = 0
        for m, srcr in zip(ms, src, strict=True):  # one call per round
            rows_m = m_t[a : a + m.size]
            xr = xflat.index_select(0, src_t[b : b + srcr.size]).view(*srcr.shape, *x.shape[2:])
            y, h = call(xr, take(cur, rows_m, dims))  # (s, B, ...) or (B, s, ...), batch B
            put(cur, rows_m, h, dims)
            rows.append(y.reshape(srcr.size, *y.shape[2:]))  # (s B, ...)
            a, b = a + m.size, b + srcr.size
        where += [p.ravel() for p in pos]  # output rows; a padded tail's go to row out[2]
    if out is None:
        return None, cur
    y = torch.cat(rows) if len(rows) > 1 else rows[0]
    full = y.new_zeros(out[2] + 1, *y.shape[1:])  # and a last row for the padded tails
    return full.index_copy(0, as_index(np.concatenate(where), device), y)[: out[2]], cur


def as_index(a: np.ndarray, device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    """A numpy array of rows (or flags) as a tensor on the device."""
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)


def _gathers(
    pieces: Pieces,
    idx: np.ndarray,
    schedule: list[tuple[int, np.ndarray, np.ndarray]],
    xmap: tuple[np.ndarray, int],
    out: tuple[np.ndarray, int, int] | None,
    time_dim: int,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per round: its pieces (B,), the rows of x it reads and the output rows it writes, each
    (s, B) ((B, s) with time_dim=1). A padded tail reads its piece's last input again and writes
    to row out[2], beyond the outputs."""
    ms, src, pos = [], [], []
    for size, which, offset in schedule:
        m = idx[which]
        j = offset[None, :] + np.arange(size)[:, None]  # (s, B): the step within each piece
        n = pieces.length[m][None, :]  # (1, B)
        src.append(xmap[0][m][None, :] + np.minimum(j, n - 1) * xmap[1])
        if out is not None:
            pos.append(np.where(j < n, out[0][m][None, :] + j * out[1], out[2]))
        ms.append(m)
    if time_dim == 1:
        src, pos = [a.T for a in src], [a.T for a in pos]
    return ms, src, pos


def _flat(pieces: Pieces, T: int, N: int, time_dim: int) -> tuple[np.ndarray, int]:
    """(base, stride): step j of piece i is row base[i] + j * stride of x as (T N, ...)."""
    if time_dim == 0:
        return pieces.t0 * N + pieces.env, N
    return pieces.env * T + pieces.t0, 1


def _grow(h: Tensor, d: int, more: int) -> Tensor:
    """A new tensor: h with `more` rows of zeros after its rows on axis d."""
    return torch.cat([h, h.new_zeros(*h.shape[:d], more, *h.shape[d + 1 :])], d)


def _detach_rows(state: st.State, rows: Tensor, dims: Sequence[int]) -> st.State:
    """The state with the gradient cut on the rows marked (bool, along the batch axis)."""

    def cut(s: Tensor, d: int) -> Tensor:
        shape = [1] * s.dim()
        shape[d] = -1
        return torch.where(rows.view(shape), s.detach(), s)

    it = iter(dims)
    return st.tree_map(lambda s: cut(s, next(it)), state)
