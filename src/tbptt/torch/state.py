"""Recurrent states: a tensor or any nesting of tuples, lists and dicts of tensors (SEMANTICS.md 6).

nn.RNN and nn.GRU carry one tensor (layers, batch, hidden), nn.LSTM a tuple (h, c), the seed's
ElmanRNN one tensor (batch, n); a user's module may carry a dict of them. The driver walks these
structures with the few functions below; the leaves keep their order (dicts in insertion order).

A reset at step t restarts stream j from the initial state h_0, a constant (section 6):

    (6.1)  h_{t-1}[j] <- h_0[j]   where reset[t, j],   so no gradient crosses that boundary

implemented as torch.where along each leaf's batch axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import InputError

Tensor = torch.Tensor
State = Any  # Tensor | tuple[State, ...] | list[State] | dict[str, State]


def check(state: object, name: str = "state") -> None:
    """Raise TypeError unless state is a tensor or a nesting of tuples, lists and dicts of them."""
    if isinstance(state, Tensor):
        return
    if isinstance(state, tuple | list):
        if not state:
            raise InputError(f"{name} must not hold an empty {type(state).__name__}")
        for k, s in enumerate(state):
            check(s, f"{name}[{k}]")
        return
    if isinstance(state, dict):
        if not state:
            raise InputError(f"{name} must not hold an empty dict")
        for k, s in state.items():
            check(s, f"{name}[{k!r}]")
        return
    raise InputError(
        f"{name} must be a tensor or a tuple, list or dict of tensors, got {type(state).__name__}"
    )


def leaves(state: State) -> list[Tensor]:
    """The tensors of a state, in order."""
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for s in state.values() for t in leaves(s)]
    return [t for s in state for t in leaves(s)]


def tree_map(fn: Callable[[Tensor], Tensor], state: State) -> State:
    """The same structure with fn applied to every tensor."""
    if isinstance(state, Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: tree_map(fn, s) for k, s in state.items()}
    out = [tree_map(fn, s) for s in state]
    return tuple(out) if isinstance(state, tuple) else out


def to(state: State | None, device: torch.device) -> State | None:
    """The state's tensors on `device` (a saved state, loaded onto the CPU)."""
    return None if state is None else tree_map(lambda t: t.to(device), state)


def signature(state: State) -> object:
    """A hashable description of the structure and the shapes, for error messages and checks."""
    if isinstance(state, Tensor):
        return tuple(state.shape)
    if isinstance(state, dict):
        return tuple((k, signature(s)) for k, s in state.items())
    return (type(state).__name__, tuple(signature(s) for s in state))


def detach(state: State | None) -> State | None:
    """The state cut from its graph: the gradient stops here (h_{s-1} is a constant)."""
    return None if state is None else tree_map(Tensor.detach, state)


def differentiable(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def as_leaf(state: State | None) -> State | None:
    """A fresh leaf copy of the state's values that records the gradient reaching it."""
    if state is None:
        return None
    return tree_map(lambda t: t.detach().requires_grad_(differentiable(t)), state)


def restart(
    state: State, h0: State | None, reset_row: Tensor, batch_dims: list[int] | None
) -> State:
    """(6.1): streams where reset_row (batch,) is true take h0 (zeros when h0 is None)."""
    ls = leaves(state)
    dims = batch_dims or [None] * len(ls)
    h0s = leaves(h0) if h0 is not None else [None] * len(ls)
    new = []
    for t, d, z in zip(ls, dims, h0s, strict=True):
        d = batch_dim(t, reset_row.shape[0]) if d is None else d
        shape = [1] * t.dim()
        shape[d] = -1
        where = reset_row.view(shape)  # broadcast along the leaf's batch axis
        new.append(
            torch.where(
                where, torch.zeros((), dtype=t.dtype, device=t.device) if z is None else z, t
            )
        )
    it = iter(new)
    return tree_map(lambda _: next(it), state)


def stream_dims(state: State | None, batch: int, declared: int | None = None) -> list[int] | None:
    """The stream axis of each tensor of a state: `declared` (a module's state_batch_dim) for
    every tensor, or each tensor's one axis of size batch."""
    if state is None:
        return None
    if declared is not None:
        return [int(declared)] * len(leaves(state))
    return [batch_dim(t, batch) for t in leaves(state)]


def batch_dim(t: Tensor, batch: int) -> int:
    """The one axis of size `batch` in a state tensor; ambiguous shapes need the module's help."""
    dims = [d for d, size in enumerate(t.shape) if size == batch]
    if len(dims) != 1:
        raise InputError(
            f"cannot tell the batch axis of a state tensor of shape {tuple(t.shape)} for batch "
            f"{batch}; give the module an attribute state_batch_dim (an int) to say which it is"
        )
    return dims[0]
