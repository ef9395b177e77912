"""What rl's layouts share (SEMANTICS.md 9): the module's h_init and state batch axes, and the
checks of a rollout's arguments, each error naming the argument, its value and what was expected.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from . import packing
from . import state as st
from .modules import ElmanRNN, Recurrent
from .packing import as_index

Tensor = torch.Tensor


def h_init(module: nn.Module, x: Tensor) -> st.State:
    """The module's initial state h_init for the N = x.shape[1] environments of x (T, N, ...).

    Zeros for torch's nn.RNN, nn.GRU and nn.LSTM (bare or in Recurrent) and for ElmanRNN; for any
    other module the state it returns for a zero-length input, module(x[:0], None)[1]. Detached:
    h_init is a constant (9).
    """
    check_module(module)
    N = x.shape[1]
    rnn = module.rnn if isinstance(module, Recurrent) else module
    if isinstance(rnn, nn.RNNBase):
        # torch sets an RNN's per-layer weights with setattr, so its stubs type them through
        # nn.Module.__getattr__ (Tensor | Module): layer 0's input weight is a Parameter
        w = cast(Tensor, rnn.weight_ih_l0)
        h = w.new_zeros(rnn.num_layers, N, rnn.proj_size or rnn.hidden_size)  # (layers, N, h)
        if isinstance(rnn, nn.LSTM):
            return h, w.new_zeros(rnn.num_layers, N, rnn.hidden_size)  # (h, c)
        return h
    if isinstance(rnn, ElmanRNN):
        return rnn.A.new_zeros(N, rnn.n)  # (N, n)
    try:
        with torch.no_grad():
            res = module(x[:0], None)
    except Exception as exc:  # a module that cannot say its h_init: say what it must support
        raise InputError(
            f"module ({type(module).__name__}) is not one of torch's RNNs or ElmanRNN, so its "
            "h_init is module(x[:0], None)[1], the state it returns for a zero-length input; "
            f"that call raised {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(res, tuple | list) and len(res) == 2):
        raise InputError(
            "module must follow the protocol module(x, state) -> (output, new_state); given a "
            f"zero-length x[:0] (its h_init) it returned a {type(res).__name__}"
        )
    st.check(res[1], "the state module(x[:0], None) returned (h_init)")
    return st.detach(res[1])


def batch_dims(module: nn.Module, state: st.State, n: int) -> list[int]:
    """The batch axis of each state tensor: the module's state_batch_dim (1 for a bare torch
    RNN), else the one axis of size n."""
    d = getattr(module, "state_batch_dim", None)
    if d is None and isinstance(module, nn.RNNBase):
        d = 1
    if d is not None:
        return [int(d)] * len(st.leaves(state))
    return packing.batch_dims_of(state, n)


def check_module(module: object) -> None:
    """A time-major, causal nn.Module."""
    if not isinstance(module, nn.Module):
        raise InputError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if getattr(module, "batch_first", None) is True:
        raise InputError(
            "module has batch_first=True, but rollouts are time-major (T, N, ...): make the "
            "module with batch_first=False"
        )
    rnn = module.rnn if isinstance(module, Recurrent) else module
    if isinstance(rnn, nn.RNNBase) and rnn.bidirectional:
        raise InputError(
            f"module is a bidirectional {type(rnn).__name__}: step t would read later steps; "
            "a rollout needs a causal module (bidirectional=False)"
        )


def check_rollout(x: object, starts: object) -> tuple[int, int]:
    """starts a (T, N) bool tensor and x a (T, N, ...) tensor; returns (T, N)."""
    T, N = check_starts(starts)
    check_buffer(x, "x", (T, N))
    return T, N


def check_starts(starts: object) -> tuple[int, int]:
    """starts a (T, N) bool tensor with T, N >= 1; returns (T, N)."""
    if not isinstance(starts, Tensor) or starts.dtype != torch.bool or starts.dim() != 2:
        raise InputError(f"starts must be a bool tensor of shape (T, N), got {described(starts)}")
    T, N = starts.shape
    if T < 1 or N < 1:
        raise InputError(f"starts must hold at least one step and one environment, got {(T, N)}")
    return T, N


def check_buffer(buf: object, name: str, lead: tuple[int, int]) -> None:
    """buf a tensor of shape (T, N, ...) like starts."""
    if not isinstance(buf, Tensor) or tuple(buf.shape[:2]) != lead:
        got = tuple(buf.shape) if isinstance(buf, Tensor) else type(buf).__name__
        raise InputError(
            f"{name} must be a tensor of shape (T, N, ...) = {lead + ('...',)} like starts, "
            f"got {got}"
        )


def check_like(
    state: object, init: st.State, name: str, n: int, lead: tuple[int, ...] = ()
) -> st.State:
    """state (a tensor or nesting) of h_init's structure and shapes, with `lead` axes in front;
    returned detached."""
    st.check(state, name)
    want = st.signature(st.tree_map(lambda t: t.new_empty(*lead, *t.shape), init))
    got = st.signature(state)
    if got != want:
        what = "the state before every step, time axis first, " if lead else ""
        raise InputError(
            f"{name} must hold {what}the module's state for N={n} environments: shapes {want}, "
            f"got {got}"
        )
    return st.detach(state)


def check_mask(a: object, name: str, shape: tuple[int, int]) -> np.ndarray:
    """A (T, N) bool tensor, as numpy."""
    if not isinstance(a, Tensor) or a.dtype != torch.bool or tuple(a.shape) != shape:
        raise InputError(
            f"{name} must be a bool tensor of shape {shape} (T, N), got {described(a)}"
        )
    return a.cpu().numpy()


def described(a: object) -> str:
    """A tensor's dtype and shape, or the type of anything else, for an error message."""
    return f"{a.dtype} {tuple(a.shape)}" if isinstance(a, Tensor) else type(a).__name__


def take_at(states: st.State, t: np.ndarray, n: np.ndarray, dims: list[int], out: st.State) -> None:
    """out's rows j become states[t[j]] of environment n[j], in place, for the j where t >= 0.

    states: leaves (T, ..., N, ...), the batch axis d + 1 of out's d. out: batch B = t.size.
    """
    j = np.flatnonzero(t >= 0)
    if not j.size:
        return
    for s, o, d in zip(st.leaves(states), st.leaves(out), dims, strict=True):
        rows = s.movedim(d + 1, 1)[as_index(t[j], s.device), as_index(n[j], s.device)]  # (b, ...)
        o.index_copy_(d, as_index(j, o.device), rows.movedim(0, d).to(o.dtype))
