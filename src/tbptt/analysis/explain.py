"""What a TBPTT(k1, k2) schedule does, as text: windows, per-loss use and cost (SEMANTICS.md 3-4).

Everything drawn comes from `tbptt.Truncation`, the object the engines use (schedule.py, where the
update times, window starts and injected losses of SEMANTICS.md 4 are written out). One row per
update: the update after step u backpropagates through the window W = (s, u, I) of section 3, so
the loss of a step t in I travels back t - s + 1 steps (its depth) and stops at the cut, where
h_{s-1} is a constant. The table gives, for every loss step, how many updates inject it and its
shortest and longest depth. The cost is Williams and Peng's: backward steps per forward step, k2/k1
once the windows are full (the first windows are shorter).

    render(truncation, T)          the text `tbptt explain` prints (diagram, legend, table, cost)
    summarize(truncation, T)       the numbers behind it (a Summary)

The figure of the same schedule is tbptt/app/plots.py's `schedule_figure`.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from ..checks import check_int
from ..errors import InputError
from ..schedule import Truncation, Window

WIDE = 24  # up to this many steps, each step gets 3 columns; beyond, one column
NARROW = 64  # beyond this many steps, draw the first NARROW steps and summarize the rest
WRAP = 92  # width of the running text
TABLE_ROWS = 40  # beyond this many steps, the per-loss table groups steps with equal numbers

INJECT_TEXT = {
    "new": "each update injects the losses of the steps since the previous update, so every "
    "loss is used exactly once (Williams and Peng).",
    "window": "each update injects every loss in its window, so a loss that lies in "
    "overlapping windows is counted again.",
    "last": "each update injects only the loss of the step it follows (the common forum "
    "snippet); the other losses of the window are not used.",
}

LEGEND = (
    "  *   loss injected by this update; its gradient travels left to the cut",
    "  o   step backpropagated through; its own loss is not injected by this update",
    "  |   the cut: h_(s-1) is held constant, the gradient stops there",
    "  .   step run forward only (state carried, no gradient); blank: not computed yet",
)


@dataclass(frozen=True)
class Summary:
    """The numbers `tbptt explain` shows, all taken from a Truncation."""

    truncation: Truncation
    T: int  # forward steps
    windows: list[Window]  # one per update, in order
    uses: list[tuple[int, int, int]]  # per loss step t = 1..T: (updates, shortest, longest depth)
    backward_steps: int  # sum over windows of u - s + 1

    @property
    def updates(self) -> int:
        return len(self.windows)

    @property
    def cost(self) -> float:
        """Backward steps per forward step over the whole sequence."""
        return self.backward_steps / self.T

    @property
    def steady_cost(self) -> float:
        """Williams and Peng's k2/k1: backward steps per forward step once the windows are full."""
        return self.truncation.k2 / self.truncation.k1

    @property
    def unused(self) -> list[int]:
        """Loss steps that no update injects."""
        return [t for t, (n, _, _) in enumerate(self.uses, 1) if n == 0]

    @property
    def repeated(self) -> list[int]:
        """Loss steps injected by more than one update."""
        return [t for t, (n, _, _) in enumerate(self.uses, 1) if n > 1]

    @property
    def exact(self) -> bool:
        """Whether the schedule is exact BPTT on T steps: one window over all, every loss once."""
        return self.windows == [Window(1, 1, self.T)]


def summarize(truncation: Truncation, T: int) -> Summary:
    """The windows of `truncation` on T steps, each loss step's use and the backward cost."""
    if not isinstance(truncation, Truncation):
        raise InputError(f"truncation must be a tbptt.Truncation, got {type(truncation).__name__}")
    check_int("steps", T, what=" (the sequence length T)")
    return Summary(
        truncation=truncation,
        T=T,
        windows=truncation.windows(T),
        uses=truncation.loss_uses(T),
        backward_steps=truncation.backward_steps(T),
    )


# -- the terminal diagram -------------------------------------------------------------------------
def _cell(w: Window, t: int, wide: bool) -> str:
    """How step t looks in the row of window w (3 characters if wide, else 1)."""
    if t > w.u:
        return "   " if wide else " "
    if t < w.s:
        if not wide and t == w.s - 1:
            return "|"  # narrow: the cut sits on h_{s-1}'s own column
        return "  ." if wide else "."
    node = "*" if t >= w.i else "o"
    if not wide:
        return node
    return (" |" if t == w.s else "<-") + node


def _ruler(T: int, lead: str) -> list[str]:
    """Two header lines for one column per step: numbers every 5 steps and tick marks."""
    numbers = [" "] * (T + 1)  # column 0 is h_0
    ticks = [" "] * (T + 1)
    for t in range(5, T + 1, 5):
        label = str(t)
        for j, ch in enumerate(label):
            numbers[t - len(label) + 1 + j] = ch
        ticks[t] = "+"
    ticks[1] = "+"
    numbers[1] = "1"
    return [lead + "".join(numbers).rstrip(), lead + "".join(ticks).rstrip()]


def diagram(summary: Summary) -> list[str]:
    """One row per update: which steps it backpropagates and which losses it injects."""
    T = min(summary.T, NARROW)
    wide = T <= WIDE
    shown = [w for w in summary.windows if w.u <= T]
    n_w, u_w = len(str(max(len(shown), 1))), len(str(T))
    label_head = f"{'update':>{max(n_w, 6)}}  {'after step':>{max(u_w, 10)}}"
    lead = " " * len(label_head) + "  "
    lines = []
    if wide:
        lines.append(label_head + "  " + "".join(f"{t:>3}" for t in range(1, T + 1)))
    else:
        ruler = _ruler(T, lead)
        lines.append(label_head + ruler[0][len(label_head) :])
        lines.append(ruler[1])
    for j, w in enumerate(shown, 1):
        label = f"{j:>{max(n_w, 6)}}  {w.u:>{max(u_w, 10)}}  "
        if wide:
            cells = "".join(_cell(w, t, True) for t in range(1, min(w.u, T) + 1))
        else:  # column 0 is h_0: the cut of a window that starts at step 1
            cells = ("|" if w.s == 1 else " ") + "".join(
                _cell(w, t, False) for t in range(1, min(w.u, T) + 1)
            )
        lines.append((label + cells).rstrip())
    if summary.T > T:
        rest = summary.updates - len(shown)
        lines.append(
            f"{lead}... steps {T + 1}-{summary.T} not drawn ({rest} more updates); "
            f"the pattern repeats every k1 = {summary.truncation.k1} steps"
        )
    return lines


def _ranges(steps: list[int], limit: int = 6) -> str:
    """[1, 2, 3, 7, 8, 9, 13] -> '1-3, 7-9, 13' (at most `limit` runs, then '...')."""
    runs: list[tuple[int, int]] = []
    for t in steps:
        if runs and t == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], t)
        else:
            runs.append((t, t))
    text = [f"{a}-{b}" if b > a else f"{a}" for a, b in runs]
    if len(text) > limit:
        text = [*text[: limit - 1], "...", text[-1]]
    return ", ".join(text)


def loss_table(summary: Summary) -> list[str]:
    """Per loss step: how many updates inject it, and its shortest and longest depth."""
    head = f"  {'loss of step':>12}  {'updates':>7}  {'shortest depth':>14}  {'longest depth':>13}"
    lines = [head]
    if summary.T <= TABLE_ROWS:
        for t, (n, lo, hi) in enumerate(summary.uses, 1):
            lo_s, hi_s = (f"{lo}", f"{hi}") if n else ("-", "-")
            lines.append(f"  {t:>12}  {n:>7}  {lo_s:>14}  {hi_s:>13}")
    else:  # group the steps that share their numbers
        groups: dict[tuple[int, int, int], list[int]] = {}
        for t, key in enumerate(summary.uses, 1):
            groups.setdefault(key, []).append(t)
        lines[0] = head + "  which steps"
        for (n, lo, hi), steps in sorted(groups.items(), key=lambda kv: kv[1][0]):
            lo_s, hi_s = (f"{lo}", f"{hi}") if n else ("-", "-")
            lines.append(f"  {len(steps):>8} x   {n:>7}  {lo_s:>14}  {hi_s:>13}  {_ranges(steps)}")
        lines[0] = lines[0].replace("loss of step", "  loss steps")
    return lines


def notes(summary: Summary) -> list[str]:
    """What the schedule is called, and the losses it drops or repeats."""
    tr = summary.truncation
    out = []
    if summary.exact:
        out.append("This is exact BPTT: one window over all T steps, every loss once.")
    elif tr.k1 == tr.k2 and tr.inject in ("new", "window"):
        out.append(
            f"k1 = k2: disjoint chunks of {tr.k1} steps with the state detached between them "
            "(PyTorch's .detach() every k steps, Keras stateful RNNs with return_sequences=True, "
            "Chainer's bproplen)."
        )
    elif tr.k1 == tr.k2 and tr.inject == "last":
        out.append(
            f"k1 = k2 with inject=last: chunks of {tr.k1} steps, the state detached between them, "
            "one loss each, at the chunk's last step (Keras stateful RNNs with "
            "return_sequences=False)."
        )
    elif tr.k1 == 1 and tr.inject == "new":
        out.append(
            f"k1 = 1: every step, the new loss is backpropagated {tr.k2} steps "
            f"(Williams and Peng's fully online BPTT({tr.k2}))."
        )
    if tr.inject == "new" and not summary.exact:
        out.append(f"Williams and Peng's BPTT(h = {tr.k2}; h' = {tr.k1}).")
    if summary.unused:
        hint = "" if tr.flush or tr.inject == "last" else "; --flush adds an update at step T"
        out.append(f"Losses used by no update: steps {_ranges(summary.unused)}{hint}.")
    if summary.repeated:
        out.append(f"Losses counted more than once: steps {_ranges(summary.repeated)}.")
    return out


def render(truncation: Truncation, T: int) -> str:
    """The whole text of `tbptt explain`: diagram, legend, per-loss table, cost."""
    s = summarize(truncation, T)
    tr = s.truncation
    intro = (
        f"Every k1 = {tr.k1} steps, backpropagate through the last k2 = {tr.k2} steps; "
        f"inject={tr.inject}: {INJECT_TEXT[tr.inject]}"
    )
    lines = [
        f"{tr.describe()} on T = {T} steps: {s.updates} update{'s' if s.updates != 1 else ''}.",
        *textwrap.wrap(intro, WRAP),
        "",
        *diagram(s),
        "",
        *LEGEND,
        "",
        "Depth: how many steps a loss's gradient travels back (t down to s).",
        *loss_table(s),
        "",
    ]
    tail = [
        f"Cost (Williams and Peng): {s.backward_steps} backward steps for {T} forward steps = "
        f"{s.cost:.2f} per step; k2/k1 = {s.steady_cost:.2f} once the windows are full.",
        f"Memory: the last {tr.keep} steps are kept for the next window.",
        *notes(s),
    ]
    for paragraph in tail:
        lines += textwrap.wrap(paragraph, WRAP, subsequent_indent="  ")
    return "\n".join(lines) + "\n"
