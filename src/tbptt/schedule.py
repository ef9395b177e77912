"""The TBPTT(k1, k2) schedule: which steps each update backpropagates and which losses it injects.

This is the one definition of truncation that the numpy engine, the PyTorch engine, the explain
tool and the tests all use (SEMANTICS.md, sections 3 and 4). Steps are numbered 1..T as in the
contract.

A window W = (s, u, I) backpropagates through steps s..u and injects the losses of the steps in I;
h_{s-1} is a constant:

    (3.1)  delta^W_t = [t in I] C^T e_t + A^T (f'(a_{t+1}) * delta^W_{t+1}),  s <= t <= u,
           delta^W_{u+1} = 0

Sutskever's schedule places a window at every k1-th step:

    (4.1)  update times  u in {k1, 2 k1, ...}, u <= T   (flush: also u = T when k1 does not divide T
                         and the flush window is not empty)
    (4.2)  window start  s = max(1, u - k2 + 1)
    (4.4)  flush window  the next scheduled window (at u_prev + k1) cut at T:
                         s = max(1, u_prev + k1 - k2 + 1), u = T; none when s > T
    (4.3)  injected      "new":    I = (u_prev, u]
                         "window": I = [s, u]
                         "last":   I = {u}

The flush window reaches no further back than the next regular window would have, so an online
engine keeps exactly the steps a regular window needs; with k1 = k2 = k the last T mod k steps
are one more chunk, trained alone, as a detach-every-k loop trains its short last chunk.

In every mode I is a run of consecutive steps ending at u, so a window is stored as three integers
(s, i, u) with I = [i, u].
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from .checks import check_int
from .errors import InputError

INJECT_MODES = ("new", "window", "last")


@dataclass(frozen=True)
class Window:
    """One update: backpropagate through steps s..u, inject the losses of steps i..u (1-based)."""

    s: int  # first step the gradient reaches; h_{s-1} is a constant
    i: int  # first injected loss
    u: int  # update step: the last step computed before the update

    @property
    def steps(self) -> range:
        """Steps s..u that the gradient flows through."""
        return range(self.s, self.u + 1)

    @property
    def losses(self) -> range:
        """Steps whose losses are injected, I = [i, u]."""
        return range(self.i, self.u + 1)

    def depth(self, t: int) -> int:
        """How many steps the gradient of loss t travels in this window (t down to s)."""
        return t - self.s + 1


@dataclass(frozen=True)
class Truncation:
    """TBPTT(k1, k2): every k1 steps, backpropagate over the last k2 steps (SEMANTICS.md 4).

    k1 = k2 = T is exact BPTT; k1 = k2 = k (with flush) is detach-every-k; k1 = 1 with
    inject="new" is Williams and Peng's fully online BPTT(k2); k1 = T, k2 = k, inject="window" is
    Theano's scan(truncate_gradient=k).

    Args:
        k1: steps between updates (Williams and Peng's h').
        k2: how many steps each update backpropagates (their h).
        inject: which losses an update injects: "new" (each loss exactly once; needs k2 >= k1),
            "window" (every loss in the window, counted again where windows overlap) or
            "last" (only the loss at the update step, as the common forum snippet does).
        flush: also update at the end of the sequence when k1 does not divide its length, over
            the next regular window cut there (4.4); without it the last T mod k1 losses take
            part in no update.
    """

    k1: int
    k2: int
    inject: str = "new"
    flush: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "k1", check_int("k1", self.k1))
        object.__setattr__(self, "k2", check_int("k2", self.k2))
        if self.inject not in INJECT_MODES:
            raise InputError(f"inject must be one of {INJECT_MODES}, got {self.inject!r}")
        if not isinstance(self.flush, bool):
            raise InputError(f"flush must be a bool, got {self.flush!r}")
        if self.inject == "new" and self.k2 < self.k1:
            raise InputError(
                f"inject='new' needs k2 >= k1 (each new loss must lie inside its window), got "
                f"k2 {self.k2} < k1 {self.k1}; for k2 < k1 use inject='window' or 'last'"
            )

    # -- one definition of a window -------------------------------------------------------------
    def window(self, u: int, u_prev: int) -> Window:
        """The window of the update at step u, the previous one having been at u_prev (0: none)."""
        return self._window(max(1, u - self.k2 + 1), u, u_prev)  # (4.2)

    def _window(self, s: int, u: int, u_prev: int) -> Window:
        i = {"new": u_prev + 1, "window": s, "last": u}[self.inject]  # (4.3)
        return Window(s=s, i=i, u=u)

    def is_update(self, t: int) -> bool:
        """Whether an update follows step t (1-based) of an unbounded stream."""
        return t % self.k1 == 0  # (4.1)

    def next_update(self, t: int) -> int:
        """The first update time after step t (steps already computed: 1..t)."""
        return (t // self.k1 + 1) * self.k1

    def flush_window(self, T: int) -> Window | None:
        """The extra window at the end of a stream of length T (4.4), if flush asks for one and
        it is not empty: the next regular window, cut at T."""
        if not (self.flush and T >= 1 and T % self.k1 != 0):
            return None
        u_prev = (T // self.k1) * self.k1
        s = max(1, u_prev + self.k1 - self.k2 + 1)  # (4.4)
        return self._window(s, T, u_prev) if s <= T else None

    def update_times(self, T: int) -> list[int]:
        """Update steps u for a sequence of T steps (4.1)."""
        _check_T(T)
        times = list(range(self.k1, T + 1, self.k1))
        if self.flush_window(T) is not None:
            times.append(T)
        return times

    def windows(self, T: int) -> list[Window]:
        """Every window of a sequence of T steps, in order of update."""
        return list(self.iter_windows(T))

    def iter_windows(self, T: int) -> Iterator[Window]:
        _check_T(T)
        u_prev = 0
        for u in range(self.k1, T + 1, self.k1):
            yield self.window(u, u_prev)
            u_prev = u
        last = self.flush_window(T)
        if last is not None:
            yield last

    # -- what the schedule costs and keeps ------------------------------------------------------
    @property
    def keep(self) -> int:
        """How many past steps an online engine must keep to build the next window."""
        return self.k2

    @property
    def segment(self) -> int:
        """Length of the segments that tile every window: gcd(k1, k2)."""
        return math.gcd(self.k1, self.k2)

    def backward_steps(self, T: int) -> int:
        """Total backward steps over a sequence of T steps (Williams and Peng's cost)."""
        return sum(w.u - w.s + 1 for w in self.iter_windows(T))

    def loss_uses(self, T: int) -> list[tuple[int, int, int]]:
        """For each loss step t = 1..T: (updates that inject it, shortest depth, longest depth).

        The depth is how many steps its gradient travels (t down to s); 0 where no update uses it.
        """
        count = [0] * (T + 1)
        shortest = [0] * (T + 1)
        longest = [0] * (T + 1)
        for w in self.iter_windows(T):
            for t in w.losses:
                d = w.depth(t)
                shortest[t] = d if count[t] == 0 else min(shortest[t], d)
                longest[t] = max(longest[t], d)
                count[t] += 1
        return [(count[t], shortest[t], longest[t]) for t in range(1, T + 1)]

    # -- named schedules ------------------------------------------------------------------------
    @classmethod
    def exact(cls, T: int) -> Truncation:
        """Exact BPTT over T steps: one window, every loss (section 2)."""
        _check_T(T)
        return cls(T, T, inject="new", flush=False)

    @classmethod
    def detach_every(cls, k: int, flush: bool = True) -> Truncation:
        """Disjoint chunks of k steps with the state detached between them (k1 = k2 = k).

        With flush (the default) the last T mod k steps are one more, shorter chunk (4.4), as a
        detach-every-k loop trains its short last chunk; without it they take part in no update.
        """
        return cls(k, k, inject="new", flush=flush)

    def describe(self) -> str:
        """A one-line description, e.g. 'TBPTT(k1=4, k2=8, inject=new)'."""
        flush = ", flush" if self.flush else ""
        return f"TBPTT(k1={self.k1}, k2={self.k2}, inject={self.inject}{flush})"


def from_options(options: dict) -> Truncation:
    """The schedule of method tbptt's options k1, k2 (default k1), inject ("new"), flush (True)."""
    try:
        return Truncation(
            options["k1"],
            options.get("k2", options["k1"]),
            inject=options.get("inject", "new"),
            flush=options.get("flush", True),
        )
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from None


def _check_T(T: object) -> None:
    check_int("T", T, least=0, what=" (the number of steps)")
