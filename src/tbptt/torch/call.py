"""The one place the torch engine calls the module on a piece of a chunk (SEMANTICS.md 6, 9, 10).

A piece is the steps between two boundaries of a rule's schedule, t+1..t+L. Where stream j resets
at step t, the state entering step t is, for that stream, the restart state (state0, or zeros), a
constant (6.1). The shell's `outputs` (driver.py) comes here for feed, finish, predict and the
rebuild of kept graphs on load, and tbptt.lightning's evaluation too. Three ways, one result:

    starts=   a module whose forward takes the keyword `starts` takes the reset mask itself
              (SEMANTICS.md 10): one call per piece, module(x, state, starts=reset), from the
              carried state, whatever the resets inside (starts=None: none); its restart state
              is its own (the shell refuses a state0 for it)
    packed    any other module, when some stream resets after the piece's first step: each
              stream cut at its resets, the pieces run side by side as rows of a few calls
              (packing.run: at most floor(log2 L) + 1 calls, however many streams and resets),
              their states gathered and scattered along each state tensor's batch axis
    split     a module that is not packable (packable(): batch statistics): one call on all
              streams, and one more at each step where some stream resets (the call before
              packing, kept for such modules)

A piece without a reset after its first step is one call on all streams in each way, bit for bit
the same. A packed call's batch is the pieces of its round (fewer or more rows than streams), so
the shell checks the state's shapes on calls of the batch's size, and `outputs` checks every
packed call's state against the state it was given.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import overload

import torch
from torch import nn

from ..errors import InputError
from . import packing
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


def packable(module: nn.Module) -> bool:
    """Whether each row of a call depends on that row's input and state only (no batch
    statistics), so that packing may run pieces of the streams side by side as the rows of a call.

    The module's attribute `packable` when it has one (False keeps the per-reset split); else
    True unless it holds a batch-norm layer (nn.BatchNorm1d, 2d, 3d, SyncBatchNorm) in training
    mode, whose statistics are over the call's batch. Dropout is packable: its draws are per
    element, so a packed call draws other masks than the split calls did, from the same law.
    """
    declared = getattr(module, "packable", None)
    if declared is not None:
        return bool(declared)
    norms = nn.modules.batchnorm._BatchNorm
    return not any(isinstance(m, norms) and m.training for m in module.modules())


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
    packed: bool = True,
) -> tuple[Tensor, st.State]:
    """The piece's outputs (time on axis tdim) and the state after it.

    call: one call of the module on (x, state); reset (L, batch) bool or None, on the driver's
    layout; restart: the state a stream restarts from (None: zeros); batch_dim: the module's
    state_batch_dim (None: each state tensor's one axis of size batch); starts: the module takes
    the reset mask itself (takes_starts); packed: the pieces of the streams may run as the rows
    of a few calls (packable), else the per-reset split.
    """
    if starts:
        return call(x, state, starts=reset)
    rows = reset_rows(reset, tdim)
    if packed and any(r > 0 for r in rows) and (state is not None or restart is None):
        return packing.run(
            _same_shapes(call), x, reset, state, restart, batch_dim, time_dim=tdim
        )  # (6.1) for every stream, in a few calls
    L = x.shape[tdim]
    bounds = [0, *(r for r in rows if r > 0), L]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=False):
        if a in rows and state is not None:  # (6.1)
            dims = None if batch_dim is None else [int(batch_dim)] * len(st.leaves(state))
            state = st.restart(state, restart, reset.select(tdim, a), dims)  # type: ignore[union-attr]
        out, state = call(narrow(x, tdim, a, b), state)
        outs.append(out)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=tdim)), state


def _same_shapes(call: Call) -> Call:
    """call, checking the protocol on the calls packing makes: a state of the structure and
    shapes of the state given."""

    def checked(x: Tensor, h: st.State | None) -> tuple[Tensor, st.State]:
        out, new = call(x, h)
        if h is not None and st.signature(new) != st.signature(h):
            raise InputError(
                f"the model returned a state of shapes {st.signature(new)} from one of shapes "
                f"{st.signature(h)}: a call must return a state of the shapes it was given"
            )
        return out, new

    return checked


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
