"""Online TBPTT(k1, k2) for any PyTorch recurrent module by the canonical rule (SEMANTICS.md 4, 5):
the rule that tbptt.torch.TBPTT (driver.py) holds when given a tbptt.Truncation.

    (4.1)  update times  u in {k1, 2 k1, ...}   (flush: also u = T at finish())
    (4.2)  window start  s = max(1, u - k2 + 1)   (flush: where the next regular window starts)
    (4.3)  injected      "new": I = (u_prev, u],  "window": I = [s, u],  "last": I = {u}

After every update time u the window W = (s, u, I) is backpropagated through the kept segments
(segments.py), each step with the parameter values it ran with, and the shell steps the optimizer.
Pieces end at update times and window starts, so a window is a union of whole segments. The path
is chosen from the schedule alone: chained for k2 <= k1 (one backward() per update; with k1 = k2
the plain detach-every-k loop, operation for operation), overlapping for k2 > k1 (parameter
copies, the walk back through the segments). A segment's graph is freed once no later window
reaches it, so memory is bounded by k2 steps; no step is computed twice. The flush window is the
next regular window cut at the end of the stream, so it consists of kept segments like any other.

`Scheduled` is what every rule updating on a Truncation's grid shares (this rule, and RTRL's and
UORO's with Truncation(k1, k1, flush=True)): the pieces' ends, the windows due, the flush window,
the settings every process shares and the schedule's part of the saved state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import InputError
from ..schedule import Truncation, Window, from_options
from .segments import Segments

if TYPE_CHECKING:
    from .rule import Shell
    from .state import State

FORMAT = "tbptt.torch.TBPTT/2"


def rule(*, k1: int, k2: int, inject: str = "new", flush: bool = True) -> TruncationRule:
    """The rule of method tbptt from its options (tbptt.methods)."""
    return TruncationRule(from_options({"k1": k1, "k2": k2, "inject": inject, "flush": flush}))


class Scheduled:
    """A rule's updates on the grid of self.truncation (4.1), and its flush window at finish()."""

    truncation: Truncation

    def settings(self, shell: Shell) -> dict[str, int]:
        """The schedule's settings that every process must share (integers)."""
        tr = self.truncation
        inject = ("new", "window", "last").index(tr.inject)
        return {"k1": tr.k1, "k2": tr.k2, "inject": inject, "flush": int(tr.flush)}

    def boundary(self, shell: Shell) -> int:
        """The first segment boundary after step t: an update time u or a window start s - 1."""
        tr, t = self.truncation, shell.t
        u = tr.next_update(t)
        v = u
        while True:  # cuts s - 1 = u' - k2 of this and later windows, the first one after t
            cut = tr.window(v, v - tr.k1).s - 1
            if cut > t:
                return min(u, cut)
            v += tr.k1

    def due(self, shell: Shell) -> Window | None:
        """The window to backpropagate now that step t is computed, if t is an update time."""
        tr = self.truncation
        return tr.window(shell.t, shell.u_prev) if tr.is_update(shell.t) else None

    def final(self, shell: Shell) -> Window | None:
        """The flush window (4.4), if any."""
        return self.truncation.flush_window(shell.t)

    def saved_schedule(self) -> dict:
        """The schedule's part of the saved state."""
        tr = self.truncation
        return {"truncation": [tr.k1, tr.k2, tr.inject, tr.flush]}

    def check_schedule(self, sd: dict) -> None:
        """InputError unless the saved run had this schedule."""
        tr = self.truncation
        mine = [tr.k1, tr.k2, tr.inject, tr.flush]
        if list(sd["truncation"]) != mine:
            raise InputError(
                f"the saved run used Truncation{tuple(sd['truncation'])} (k1, k2, inject, flush), "
                f"this driver has Truncation{tuple(mine)}; resume with the same schedule"
            )


class TruncationRule(Scheduled):
    """TBPTT(k1, k2) by the canonical rule: updates after k1, 2 k1, ... (and the flush window at
    finish()), each window backpropagated through the kept segments (chained or overlapping)."""

    name = "TBPTT"
    format = FORMAT

    def __init__(self, truncation: Truncation) -> None:
        if not isinstance(truncation, Truncation):
            raise InputError(
                f"truncation must be a tbptt.Truncation, got {type(truncation).__name__}"
            )
        self.truncation = truncation
        self.segments = Segments(overlap=truncation.k2 > truncation.k1)

    def __repr__(self) -> str:
        return self.truncation.describe()

    def bind(self, shell: Shell) -> None:
        tr = self.truncation
        if shell.backward_fn is not None and self.segments.overlap:
            raise InputError(
                f"backward= applies when k2 <= k1 (here k1={tr.k1}, k2={tr.k2}): with k2 > k1 "
                "the driver differentiates its kept segments itself (torch.autograd.grad on "
                "parameter copies); use grad_hook= on the finished gradient"
            )

    def run(self, shell: Shell, x, y, mask, reset):
        """A piece as one segment; with k2 <= k1 its graph is kept from the window start on."""
        tr, start = self.truncation, 1
        if not self.segments.overlap:  # the first step s of the next window
            start = tr.window(tr.next_update(shell.t), shell.u_prev).s
        return self.segments.run(shell, x, y, mask, reset, start)

    def gradient(self, shell: Shell, w: Window, mean: bool) -> float:
        """(5.2), (5.3) of window w: one backward (k2 <= k1) or the walk (k2 > k1)."""
        if self.segments.overlap:
            tr = self.truncation
            self.segments.walk(shell, w, keep_from=tr.next_update(w.u) - tr.k2 + 1)
        else:
            self.segments.backward(shell, w)
        return self.segments.count(shell, w) if mean else 0.0

    def after(self, shell: Shell, w: Window | None) -> None:
        """The first step any future window reaches (the next window's, regular or flush) is
        next_update - k2 + 1; after an update, the next interval runs with copies of the new
        parameter values."""
        if w is not None:
            self.segments.copies = None
        self.segments.prune(self.truncation.next_update(shell.t) - self.truncation.k2 + 1)

    def release(self, shell: Shell, finished: bool) -> None:
        self.segments.release(finished)

    def state_dict(self, shell: Shell) -> dict:
        return {**self.saved_schedule(), **self.segments.state_dict(shell)}

    def stream_dims(self, shell: Shell, state: State | None, batch: int) -> list[int] | None:
        return shell.stream_dims(state, batch)

    def read(self, shell: Shell, sd: dict) -> Callable[[], State | None]:
        self.check_schedule(sd)
        return self.segments.read(shell, sd)
