"""`tbptt explain`: draw a TBPTT(k1, k2) schedule, its per-loss use and its cost (SEMANTICS.md 3-4).

Everything drawn comes from `tbptt.Truncation`, the object the engines use. One row per update: the
update after step u backpropagates through the window W = (s, u, I) of the contract,

    (4.1)  update times  u in {k1, 2 k1, ...}, u <= T   (flush: also u = T)
    (4.2)  window start  s = max(1, u - k2 + 1)
    (4.3)  injected      "new": I = (u_prev, u],  "window": I = [s, u],  "last": I = {u}
    (3.1)  delta^W_t = [t in I] C^T e_t + A^T (f'(a_{t+1}) * delta^W_{t+1}),   s <= t <= u

so the loss of a step t in I travels back t - s + 1 steps (its depth) and stops at the cut, where
h_{s-1} is a constant. The table gives, for every loss step, how many updates inject it and its
shortest and longest depth. The cost is Williams and Peng's: backward steps per forward step, k2/k1
once the windows are full (the first windows are shorter).

    render(truncation, T)          the terminal text (diagram, legend, table, cost)
    summarize(truncation, T)       the numbers behind it (a Summary)
    plot(truncation, T, path)      the same as a figure (.png or .svg), written atomically
"""

from __future__ import annotations

import argparse
import os
import tempfile
import textwrap
from dataclasses import dataclass

from .schedule import INJECT_MODES, Truncation, Window

WIDE = 24  # up to this many steps, each step gets 3 columns; beyond, one column
PLOT_STEPS = 120  # the figure draws at most this many steps
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
        raise TypeError(f"truncation must be a tbptt.Truncation, got {type(truncation).__name__}")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"steps must be an integer >= 1 (the sequence length T), got {T!r}")
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


# -- the figure -----------------------------------------------------------------------------------
def plot(truncation: Truncation, T: int, path: str | os.PathLike) -> None:
    """Draw the schedule and the per-loss table as a figure; the format follows the suffix."""
    path = _check_out(path)
    s = summarize(truncation, T)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    full_T = T
    T = min(T, PLOT_STEPS)  # draw the first PLOT_STEPS steps; the pattern repeats every k1
    windows = [w for w in s.windows if w.u <= T]
    uses = s.uses[:T]
    rows = len(windows)
    height = min(1.2 + 0.3 * rows, 10.0) + 2.4
    fig, (ax, ax2) = plt.subplots(
        2,
        1,
        figsize=(min(3 + 0.32 * T, 16), height),
        gridspec_kw={"height_ratios": [max(rows, 2), 4]},
        sharex=True,
    )
    segments, fwd, inj, thru, cuts = [], [], [], [], []
    for j, w in enumerate(windows):
        y = -j
        segments.append([(w.s - 0.5, y), (w.u, y)])
        cuts.append([(w.s - 0.5, y - 0.35), (w.s - 0.5, y + 0.35)])
        fwd += [(t, y) for t in range(1, w.s)]
        thru += [(t, y) for t in range(w.s, w.i)]
        inj += [(t, y) for t in range(w.i, w.u + 1)]
    ax.add_collection(LineCollection(segments, colors="tab:blue", linewidths=1.5, zorder=1))
    ax.add_collection(LineCollection(cuts, colors="black", linewidths=2, zorder=2))
    size = max(8, min(40, 1200 / max(T, 1)))
    for pts, kw in (
        (fwd, dict(marker=".", color="0.7", s=size / 3, label="forward only")),
        (thru, dict(marker="o", facecolors="white", edgecolors="tab:blue", s=size,
                    label="backpropagated, loss not injected")),
        (inj, dict(marker="o", color="tab:red", s=size, label="loss injected")),
    ):  # fmt: skip
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, zorder=3, **kw)
    ax.plot([], [], color="black", lw=2, label="cut: $h_{s-1}$ held constant")
    ax.set_ylim(-rows + 0.4, 0.8)
    ax.set_yticks([-j for j in range(rows)] if rows <= 30 else [])
    if rows <= 30:
        ax.set_yticklabels([f"u={w.u}" for w in windows])
    ax.set_ylabel("update")
    ax.set_title(
        f"{truncation.describe()}, T = {full_T}"
        + (f" (first {T} steps drawn)" if full_T > T else "")
        + f": {s.backward_steps} backward steps, {s.cost:.2f} per forward step "
        f"(k2/k1 = {s.steady_cost:.2f})",
        fontsize=10,
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    # lower panel: each loss step's depth range, and how many updates inject it
    top = max([hi for _, _, hi in uses] + [1])
    for t, (n, lo, hi) in enumerate(uses, 1):
        if n == 0:
            ax2.text(t, 0.3, "0", ha="center", va="bottom", fontsize=7, color="0.4")
            continue
        ax2.plot([t, t], [lo, hi], color="tab:red", lw=3, solid_capstyle="butt")
        ax2.plot([t, t], [lo, hi], ls="", marker="o", ms=3, color="tab:red")
        if T <= 80:
            ax2.text(t, hi + 0.25, str(n), ha="center", va="bottom", fontsize=7, color="0.3")
    ax2.set_ylim(0, top + 1.2)
    ax2.set_ylabel("depth (steps)")
    ax2.set_xlabel("loss of step t")
    ax2.set_xlim(0.3, T + 0.7)
    ax2.set_title(
        "each loss: shortest to longest depth (steps its gradient travels back); "
        "the number is how many updates inject it",
        fontsize=8,
    )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _check_out(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() not in (".png", ".svg", ".pdf"):
        raise ValueError(f"out must end in .png, .svg or .pdf, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"out: the folder {folder!r} of {path!r} does not exist")
    return path


def save_figure(fig, path: str) -> None:
    """fig.savefig to a temporary file in the same folder, then rename: never half-written."""
    folder = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, format=suffix[1:], dpi=120, bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a figure is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -- the command ----------------------------------------------------------------------------------
def _number(text: str) -> int | float | str:
    """Command-line text to an int when it is one, else a float or the text, so the library's
    own check reports the value (one line) instead of argparse."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--k1",
        required=True,
        metavar="K1",
        default=argparse.SUPPRESS,
        help="steps between updates (Williams and Peng's h')",
    )
    parser.add_argument(
        "--k2",
        required=True,
        metavar="K2",
        default=argparse.SUPPRESS,
        help="steps each update backpropagates (their h)",
    )
    parser.add_argument(
        "--steps",
        required=True,
        metavar="T",
        default=argparse.SUPPRESS,
        help="length T of the sequence to draw",
    )
    parser.add_argument(
        "--inject",
        default="new",
        choices=INJECT_MODES,
        help="which losses an update injects: the new ones since the last update, every loss "
        "in the window, or only the last",
    )
    parser.add_argument(
        "--flush",
        action="store_true",
        help="also update at step T when k1 does not divide T",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="also write the schedule as a figure (.png or .svg)",
    )


def run_explain(args: argparse.Namespace) -> int:
    truncation = Truncation(_number(args.k1), _number(args.k2), args.inject, args.flush)
    T = _number(args.steps)
    out = getattr(args, "out", None)
    if out:
        _check_out(out)
    print(render(truncation, T), end="")
    if out:
        plot(truncation, T, out)
        print(f"Wrote {out}")
    return 0
