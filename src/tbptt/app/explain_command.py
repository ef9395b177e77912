"""`tbptt explain`: draw a TBPTT(k1, k2) schedule, its per-loss use and its cost (SEMANTICS.md 3-4).

The text comes from tbptt.analysis.explain.render, the figure (--out) from plots.schedule_figure;
both read the windows of tbptt.Truncation, the object the engines use.
"""

from __future__ import annotations

import argparse
import os

from ..analysis.explain import render
from ..checks import check_int
from ..errors import InputError
from ..files import atomic_write
from ..schedule import INJECT_MODES, Truncation
from . import plots


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
    for name, metavar, help in (
        ("--k1", "K1", "steps between updates (Williams and Peng's h')"),
        ("--k2", "K2", "steps each update backpropagates (their h)"),
        ("--steps", "T", "length T of the sequence to draw"),
    ):  # read as text: the library checks the values (one line each)
        parser.add_argument(
            name, required=True, metavar=metavar, default=argparse.SUPPRESS, help=help
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
        help="also update at step T when k1 does not divide T, over the next window cut at T",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="also write the schedule as a figure (.png, .svg or .pdf)",
    )


def run_explain(args: argparse.Namespace) -> int:
    k1, k2, T = (_number(v) for v in (args.k1, args.k2, args.steps))
    truncation = Truncation(k1, k2, args.inject, args.flush)  # type: ignore[arg-type]
    T = check_int("--steps", T, what=" (the sequence length T)")
    text = render(truncation, T)
    out = getattr(args, "out", None)
    figure = None
    if out:
        fmt = plots.fmt_of(out)
        plots.require(f"--out {out}")
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise InputError(f"--out: the folder {folder!r} of {out!r} does not exist")
        figure = plots.schedule_figure(truncation, T, fmt)
    print(text, end="")
    if figure is not None:
        atomic_write(out, figure)  # type: ignore[arg-type]  (out is set when figure is)
        print(f"Wrote {out}")
    return 0
