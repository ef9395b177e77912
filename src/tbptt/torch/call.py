"""The one place the torch engine calls the module on a piece of a chunk (SEMANTICS.md 6, 10).

A piece is the steps between two boundaries of a rule's schedule, t+1..t+L. Its outputs come from
one call of the module, module(x, state) -> (output, new_state), and one more at each step where
some stream restarts: there the state entering the step is, for those streams, the restart state
(state0, or zeros), a constant (6.1).

A module whose forward takes the keyword `starts` takes the reset mask itself (SEMANTICS.md 10):
it is called once per piece, module(x, state, starts=reset), from the carried state, whatever the
resets inside (starts=None: no stream restarts in the piece); its restart state is its own.

The shell's `outputs` (driver.py) comes here for feed, finish, predict and the rebuild of kept
graphs on load, and tbptt.lightning's evaluation too: packing many episodes into one call
(SEMANTICS.md 9) replaces the loop of `outputs` below.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import overload

import torch

from . import state as st

Tensor = torch.Tensor
Call = Callable[..., tuple[Tensor, st.State]]  # call(x, state[, starts=]) -> (output, state)


def takes_starts(module: object) -> bool:
    """Whether the module's forward takes the keyword `starts` (SEMANTICS.md 10)."""
    try:
        parameters = inspect.signature(module.forward).parameters  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return False
    p = parameters.get("starts")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def outputs(
    call: Call,
    x: Tensor,
    state: st.State | None,
    reset: Tensor | None,
    *,
    restart: st.State | None,
    batch_dim: int | None,
    tdim: int,
    starts: bool = False,
) -> tuple[Tensor, st.State]:
    """The piece's outputs (time on axis tdim) and the state after it.

    call: one call of the module on (x, state); reset (L, batch) bool or None, on the driver's
    layout; restart: the state a stream restarts from (None: zeros); batch_dim: the module's
    state_batch_dim (None: each state tensor's one axis of size batch); starts: the module takes
    the reset mask itself (takes_starts).
    """
    if starts:
        return call(x, state, starts=reset)
    L = x.shape[tdim]
    rows = reset_rows(reset, tdim)
    bounds = [0, *(r for r in rows if r > 0), L]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=False):
        if a in rows and state is not None:  # (6.1)
            dims = None if batch_dim is None else [int(batch_dim)] * len(st.leaves(state))
            state = st.restart(state, restart, reset.select(tdim, a), dims)  # type: ignore[union-attr]
        out, state = call(narrow(x, tdim, a, b), state)
        outs.append(out)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=tdim)), state


def reset_rows(reset: Tensor | None, tdim: int) -> list[int]:
    """Indices (within a piece) of the steps where at least one stream restarts."""
    if reset is None:
        return []
    any_row = reset.any(dim=1 - tdim)  # (L,)
    return torch.nonzero(any_row).flatten().tolist()


@overload
def narrow(a: Tensor, tdim: int, start: int, stop: int) -> Tensor: ...
@overload
def narrow(a: Tensor | None, tdim: int, start: int, stop: int) -> Tensor | None: ...
def narrow(a: Tensor | None, tdim: int, start: int, stop: int) -> Tensor | None:
    """Steps start..stop-1 of a chunk's tensor (itself when that is all of it)."""
    if a is None or (start == 0 and stop == a.shape[tdim]):
        return a
    return a.narrow(tdim, start, stop - start)
