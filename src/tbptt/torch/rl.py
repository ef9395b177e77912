"""Rollouts for recurrent reinforcement learning (SEMANTICS.md 9), on the module protocol.

A rollout is T steps of N environments, time-major: x (T, N, ...), and starts (T, N) bool, true
where step t is the first step of an episode of environment n. There the state before step t is
h_init, the module's initial state, a constant: no value and no gradient crosses an episode start
(section 6's reset, (6.1)). state0 is the state the collector held before step 0 (a constant);
states[t] the state before step t, in the module's state layout with a time axis in front.

    unroll(module, x, starts, state0, k=k)    9(a) contiguous: each environment's T steps in
                                              order; k cuts the gradient of the state entering
                                              steps k, 2k, ... (not its value)
    Segments(starts, length, burn_in)         9(b): segments of at most `length` steps, none
                                              crossing an episode start, each from h_init or a
                                              stored state, after `burn_in` steps without gradient
    states(module, x, starts, state0)         the states of 9(a) without gradient (the refresh)
    restart(state, starts_t, h_init)          9(c) acting: h_init where an episode starts

The reference of 9(a), per environment n (detach cuts the gradient, not the value):

    h = state0[n]
    for t = 0 .. T-1:
        if starts[t, n]:                       h = h_init
        elif k and t > 0 and t % k == 0:       h = detach(h)
        y[t, n], h = step(x[t, n], h)
    final[n] = detach(h)

h_init: zeros for torch's nn.RNN, nn.GRU, nn.LSTM (bare or in tbptt.torch.Recurrent) and
tbptt.torch.ElmanRNN; for any other module the state it returns for a zero-length input,
module(x[:0], None)[1], which such a module must therefore support. The batch axis of each state
tensor is the module's state_batch_dim (1 for torch's RNNs, 0 for ElmanRNN), else the one axis of
size N. Every path runs through packing.py: a few calls of the module for the whole rollout, the
number of calls independent of N and of the number of episode starts.

A module whose forward takes the keyword `starts` takes the episode starts itself (SEMANTICS.md
10; call.takes_starts): unroll passes it the mask, module(x, state, starts=starts), one call for
the rollout (one per BPTT window with k), and Segments.run one call for its segments
(rl_segments.py); such a module restarts a stream from its own h_init, the state its None means.
unroll runs a module whose rows depend on the batch they are computed in (not call.packable:
batch statistics) on the per-step path.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from . import packing
from . import state as st
from .call import packable, takes_starts
from .packing import as_index
from .rl_base import (
    batch_dims,
    check_batch,
    check_like,
    check_mask,
    check_module,
    check_rollout,
    described,
    h_init,
)
from .rl_segments import Segments

Tensor = torch.Tensor

__all__ = ["Segments", "h_init", "restart", "states", "unroll"]


def unroll(
    module: nn.Module,
    x: Tensor,
    starts: Tensor,
    state0: st.State | None = None,
    *,
    k: int | None = None,
    packed: bool = True,
) -> tuple[Tensor, st.State]:
    """Layout 9(a): every environment's T steps in order. Returns (y, final).

    Args:
        module: module(x, state) -> (output, new_state), time-major.
        x: (T, N, ...) the rollout's inputs (may carry a graph, e.g. an encoder's features).
        starts: (T, N) bool, true at the first step of an episode.
        state0: the state before step 0 (a constant); None: h_init.
        k: the BPTT length: the gradient of the state entering steps k, 2k, ... is cut;
            None: nothing is cut.
        packed: False runs one call per step on all N environments (for a module whose rows
            depend on the batch they are computed in, e.g. batch statistics: a module that is not
            call.packable runs so whatever packed says). A module that takes starts ignores it:
            one call per BPTT window, the mask passed to it.

    Returns y (T, N, ...) with its graph, and final, the state after step T-1, detached.
    """
    if k is not None and (isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1):
        raise InputError(f"k must be an integer >= 1 or None, got {k!r}")
    k = None if k is None else int(k)
    if takes_starts(module):
        return _unroll_starts(module, x, starts, state0, k)
    init, state, dims = _begin(module, x, starts, state0)
    packed = packed and packable(module)
    y, final = packing.run(module, x, starts, state, init, dims, k=k, packed=packed)
    return y, st.detach(final)


def _unroll_starts(
    module: nn.Module, x: Tensor, starts: Tensor, state0: st.State | None, k: int | None
) -> tuple[Tensor, st.State]:
    """Layout 9(a) for a module that takes the starts (SEMANTICS.md 10): one call per BPTT window
    of k steps (the whole rollout for k None), the state detached between windows."""
    check_module(module)
    T, N = check_rollout(x, starts)
    h = None if state0 is None else check_batch(state0, "state0", module, N)
    ys = []
    for a in range(0, T, k or T):
        b = min(T, a + (k or T))
        y, h = module(x[a:b], st.detach(h), starts=starts[a:b])
        ys.append(y)
    return (ys[0] if len(ys) == 1 else torch.cat(ys)), st.detach(h)


def states(
    module: nn.Module,
    x: Tensor,
    starts: Tensor,
    state0: st.State | None = None,
    *,
    at: Tensor | None = None,
) -> st.State:
    """The state before every step as 9(a) computes it, without gradient (the refresh).

    Returns the module's state layout with a time axis in front of each tensor: states[t] is the
    state step t starts from (h_init where starts[t]; state0, or h_init, at t = 0).
    at: (T, N) bool, the steps whose state is wanted (segs.stored: the ones a Segments plan
    reads); the others hold NaN. None: every step, one module call per step; with `at`, one
    call per stretch between wanted steps (segments of `length` steps: about T / length calls).
    """
    init, state, dims = _begin(module, x, starts, state0)
    T, N = starts.shape
    want = np.ones((T, N), bool) if at is None else check_mask(at, "at", (T, N))
    s = starts.cpu().numpy()  # (T, N)
    need = want & ~s  # a wanted state that is neither h_init ...
    need[0] = False  # ... nor state0: a piece ends there
    pieces = packing.plan(s, need, need, "depth")
    G = int((pieces.prev < 0).sum())
    h0 = packing.given(state, init, pieces.env[:G], s[pieces.t0[:G], pieces.env[:G]], dims)
    with torch.no_grad():
        _, ends = packing.execute(module, x, pieces, h0, dims)
    carried = np.flatnonzero(pieces.prev >= 0)  # one piece starts at each needed step
    t_start, n_start = np.nonzero(want & s)  # h_init there
    n_zero = np.flatnonzero(want[0] & ~s[0])  # state0 there
    out = []
    for hi, h0i, end, d in zip(
        st.leaves(init), st.leaves(state), st.leaves(ends), dims, strict=True
    ):
        fill = float("nan") if st.differentiable(hi) else 0  # complex too (the LRU)
        full = hi.new_full((T, *hi.shape), fill)  # (T, ..., N, ...): batch on axis d + 1
        view = full.movedim(d + 1, 1)  # (T, N, ...), a view of full
        for t, n, src, rows in (
            (t_start, n_start, hi, n_start),  # h_init at an episode start
            (np.zeros_like(n_zero), n_zero, h0i, n_zero),  # state0 at t = 0
            (pieces.t0[carried], pieces.env[carried], end, pieces.prev[carried]),  # carried on
        ):
            rows = src.index_select(d, as_index(rows, hi.device)).movedim(d, 0)  # (b, ...)
            view[as_index(t, hi.device), as_index(n, hi.device)] = rows
        out.append(full)
    it = iter(out)
    return st.tree_map(lambda _: next(it), init)


def restart(
    state: st.State | None, starts_t: Tensor, h_init: st.State, *, module: nn.Module | None = None
) -> st.State:
    """The state step t starts from while acting (9(c)): h_init[n] where starts_t[n], else
    state[n]. state None (before the first step) means h_init; starts_t (N,) bool; module: for
    its state_batch_dim when the batch axis cannot be told from the shapes."""
    st.check(h_init, "h_init")
    if not isinstance(starts_t, Tensor) or starts_t.dtype != torch.bool or starts_t.dim() != 1:
        raise InputError(
            f"starts_t must be a bool tensor (N,), one step's starts, got {described(starts_t)}"
        )
    N = starts_t.shape[0]
    if state is None:
        return h_init
    state = check_like(state, h_init, "state", N)
    dims = batch_dims(module, h_init, N) if module is not None else packing.batch_dims_of(h_init, N)
    return st.restart(state, h_init, starts_t.to(st.leaves(state)[0].device), dims)


def _begin(
    module: nn.Module, x: Tensor, starts: Tensor, state0: st.State | None
) -> tuple[st.State, st.State, list[int]]:
    """The checks of (a); (h_init, the state before step 0, the batch axes)."""
    check_module(module)
    _, N = check_rollout(x, starts)
    init = h_init(module, x)
    dims = batch_dims(module, init, N)
    state = init if state0 is None else check_like(state0, init, "state0", N)
    return init, state, dims
