"""The protocol between the numpy engine's trainer shell (trainer.py) and a method's rule, and
what the rules share when they check a saved state.

The shell (tbptt.TBPTT) holds the stream, the optimizer step and saving; a rule (tbptt.py, rtrl.py,
uoro.py, artbp.py) what differs between methods. A new method is a new rule: see
CONTRIBUTING.md, "A new method".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from ..errors import InputError
from .elman import ElmanRNN, Trajectory

Array = np.ndarray


class Shell(Protocol):
    """What a rule reads from the trainer that holds it (and forward, which it may call)."""

    model: ElmanRNN
    loss: str
    reduction: str
    h: Array | None  # (batch, n) the carried state
    h0: Array | None  # (batch, n) the restart state
    t: int  # steps computed so far
    u_prev: int  # the last update time
    updates: int

    @property
    def batch(self) -> int | None: ...

    def forward(
        self, x, y: Array, mask: Array | None, reset: Array | None, hs: Array | None = None
    ) -> tuple[Trajectory, Array, Array]: ...


class Rule(Protocol):
    """What a method adds to the shell. The shell calls, in this order:

    bind(model)               once, when the trainer is made: checks against the model
    start(trainer, h0)        at the first chunk (h0 (batch, n)): allocate the rule's per-stream
                              state; may refuse (nothing is trained then)
    due(trainer, T)           at each chunk of T steps: the steps in t+1..t+T after which an update
                              is due, in order (drawing them, for a random schedule)
    run(trainer, x, y, mask, reset)
                              each piece between two of them: run it (trainer.forward) and keep
                              what the rule needs; returns the trajectory and l_t (L, batch)
    gradient(trainer, final)  at each update: fresh gradient arrays (the optimizer may overwrite
                              them) and the number of injected losses, mask weights summed (the
                              mean's divisor); final: the update of finish()
    updated(trainer)          after each update: drop what no later update needs
    final(trainer)            at finish(): whether there is a last update
    state_dict(trainer)       its part of the saved state (settings, position, kept steps, ...)
    read(state, trainer)      check its part of a saved state, changing nothing; returns the last
                              update time u_prev and a function that restores the rule's part
    """

    name: str  # "TBPTT", "RTRL", ...: messages and repr
    format: str  # the saved state's "format"
    dense_inputs: bool  # tbptt.OneHot inputs reach it as their one-hot rows
    saved_floats: tuple[str, ...]  # prefixes of its saved float arrays (checked for the dtype)

    def bind(self, model: ElmanRNN) -> None: ...
    def start(self, trainer: Shell, h0: Array) -> None: ...
    def due(self, trainer: Shell, T: int) -> list[int]: ...
    def run(self, trainer: Shell, x, y: Array, mask, reset) -> tuple[Trajectory, Array]: ...
    def gradient(self, trainer: Shell, final: bool) -> tuple[dict[str, Array], float]: ...
    def updated(self, trainer: Shell) -> None: ...
    def final(self, trainer: Shell) -> bool: ...
    def state_dict(self, trainer: Shell) -> dict[str, Array]: ...
    def read(self, state: dict, trainer: Shell) -> tuple[int, Callable[[], None]]: ...


def check_saved_setting(name: str, saved: object, mine: object) -> None:
    if saved != mine:
        raise InputError(f"the saved run had {name}={saved!r}, this trainer {mine!r}")


def damaged(exc: Exception) -> InputError:
    """The error for a saved state missing a key or holding a bad value."""
    return InputError(f"the saved state is incomplete or damaged ({exc})")


def as_saved(mine: object, saved: object) -> object:
    """A saved setting read back in the type of this trainer's (an int, a float; strings as
    they are), for check_saved_setting."""
    if isinstance(saved, str) or not isinstance(mine, bool | int | float):
        return saved
    return type(mine)(saved)  # type: ignore[arg-type]
