"""The protocol between the torch engine's shell (driver.py, tbptt.torch.TBPTT) and a method's
rule, and the public view of the shell that a rule may use.

The shell holds what every method does alike: the stream (chunks, the position t, the carried
state, the checks of the module's protocol), the module call on a piece (`outputs`, call.py), the
update's pipeline in the order of SEMANTICS.md 5 (one collective, the mean, the grad scaler's
unscale, the gradient hook, clipping, the step, the scheduler) with the non-finite checks (6),
predict, and saving (the format, the shell's settings, the common state). A rule holds what
differs between methods; a new method is a new rule (CONTRIBUTING.md, "A new method"):

    rule                pieces end at                     updates after           file
    TruncationRule      update times and window starts    k1, 2 k1, ... (flush)   tbptt.py
    ARTBPRule           possible cuts b, 2b, ...          every random cut, end   artbp.py
    RTRLRule            k1, 2 k1, ... (steps one by one)  k1, 2 k1, ..., end      rtrl.py
    UORORule            k1, 2 k1, ... (steps one by one)  k1, 2 k1, ..., end      uoro.py

TBPTT and ARTBP keep segments with their graphs (segments.py); RTRL and UORO carry an influence
(forward.py). A rule reads and calls only the names of `Shell` below, never a private one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..schedule import Truncation, Window
    from .distributed import Comm
    from .state import State

    Tensor = torch.Tensor


class Shell(Protocol):
    """What a rule reads from the shell that holds it, and the shell's methods it may call."""

    model: nn.Module  # the module the steps run (a DistributedDataParallel model's .module)
    params: dict[str, Tensor]  # the trained parameters (those that require grad), by name
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    reduction: str
    checkpoint: bool  # keep graphs as torch.utils.checkpoint
    amp_dtype: torch.dtype | None  # autocast, None: off
    backward_fn: Callable | None  # the caller's backward hook
    tdim: int  # the time axis of chunks, outputs, losses, masks and resets (1: batch_first)
    device: torch.device
    state0: State | None  # the restart state (None: the module's zeros)
    comm: Comm | None  # the process group's collectives (distributed.py); None: one process
    t: int  # steps computed so far; during a piece, those before it
    u_prev: int  # the last update time
    updates: int
    batch: int | None  # streams, fixed by the first chunk
    carried: State | None  # the carried state, attached to the last kept graph if any

    @property
    def state(self) -> State | None: ...  # the carried state, detached

    def call(self, x: Tensor, state: State | None, params: dict | None = None) -> tuple[Any, Any]:
        """One module call (with the parameter values `params`, None: the live ones), checked."""
        ...

    def losses(
        self, x, y, mask, reset, state, params: dict | None = None, checkpoint: bool = False
    ) -> tuple[Tensor, State]:
        """A piece from `state`: its masked losses l_t (time on tdim) and the state after it
        (outputs, the one module call site, then loss_fn under autocast, then the mask)."""
        ...

    def backward(self, loss: Tensor) -> None:
        """The update's one backward() of `loss` (the caller's hook, or the grad scaler's)."""
        ...

    def scale(self, loss: Tensor) -> Tensor:
        """`loss` as the grad scaler scales it (itself without float16 amp)."""
        ...

    def stream_dims(self, state: State | None, batch: int) -> list[int] | None:
        """The stream axis of each tensor of a state."""
        ...


class Rule(Protocol):
    """What a method adds to the shell. The shell calls, in this order:

    bind(shell)               once, when the shell is made (after the processes agreed on the
                              settings): check against the shell's options; share what every
                              process must hold alike (the generator of fresh entropy)
    settings(shell)           before that, with several processes: the integers every process
                              must share (the schedule's settings, a digest of its generator)
    boundary(shell)           before each piece: the first step after t where a piece must end
    run(shell, x, y, mask, reset)
                              each piece, steps t+1..t+L from shell.carried: run it and keep
                              what the rule needs; returns the detached float64 loss sums (one,
                              or one per step) and the state after the piece (the new carried)
    due(shell)                after each piece (t advanced): the window to update now, or None
    final(shell)              at finish(): the window of the last update, or None
    gradient(shell, w, mean)  at each update: p.grad of shell.params <- this process's gradient
                              of window w; returns, when mean, the number of its injected
                              (step, stream) losses, mask weights summed (else 0)
    after(shell, w)           after each piece and its update w (None: none): drop what no
                              future window reaches
    release(shell, finished)  when feed returns (False): copy what is kept of the caller's
                              tensors; after finish's update (True): drop everything
    state_dict(shell)         its part of the saved state: its settings, "state" (what is
                              carried per stream), "segments" (records with per-stream tensors),
                              and what else it needs
    stream_dims(shell, state, batch)
                              the stream axis of each tensor of its saved "state" (to gather
                              and split the streams of several processes)
    read(shell, sd)           check its part of a saved state (each process's share), changing
                              nothing; returns restore(), called once the shell restored the
                              model, optimizer and counters: restores the rule's part and returns
                              the carried state
    """

    # read-only (properties in the protocol), so that a rule may give them as attributes or as
    # properties (ForwardRule's format)
    @property
    def name(self) -> str: ...  # "TBPTT", "ARTBP", ...: messages
    @property
    def format(self) -> str: ...  # the saved state's "format"
    @property
    def truncation(self) -> Truncation: ...  # the grid of update times (ARTBP: of possible cuts)

    def bind(self, shell: Shell) -> None: ...
    def settings(self, shell: Shell) -> dict[str, int]: ...
    def boundary(self, shell: Shell) -> int: ...
    def run(self, shell: Shell, x, y, mask, reset) -> tuple[Tensor, State]: ...
    def due(self, shell: Shell) -> Window | None: ...
    def final(self, shell: Shell) -> Window | None: ...
    def gradient(self, shell: Shell, w: Window, mean: bool) -> float: ...
    def after(self, shell: Shell, w: Window | None) -> None: ...
    def release(self, shell: Shell, finished: bool) -> None: ...
    def state_dict(self, shell: Shell) -> dict: ...
    def stream_dims(self, shell: Shell, state: Any, batch: int) -> list[int] | None: ...
    def read(self, shell: Shell, sd: dict) -> Callable[[], State | None]: ...


def is_rule(obj: object) -> bool:
    """Whether obj looks like a Rule (the shell's check of its `truncation` argument)."""
    return all(hasattr(obj, k) for k in ("boundary", "run", "due", "gradient", "format"))
