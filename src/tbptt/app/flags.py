"""The library's argument names as the command line's flags, in its messages.

The commands let the library check what it is given (one validation path: tbptt.methods, the
schedule, the analysis) and show its InputError with each argument named by the flag that set it:
"c must be a probability in [0, 1]" reaches the user as "--cut must be a probability in [0, 1]".
The methods' options come from the table in tbptt.methods; the analysis adds its own.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Callable

from ..errors import InputError
from ..methods import METHODS

ANALYSIS = {
    "max_lag": "--max-lag",
    "fit_from": "--fit-from",
    "k_max": "--k-max",
    "delta": "--delta",
    "draws": "--draws",
}


def flags() -> dict[str, str]:
    """{argument name: flag} for every method option with a flag, the analysis' arguments and
    `method` itself."""
    out = {"method": "--method", **ANALYSIS}
    for method in METHODS.values():
        for o in method.options:
            if o.flag is not None and o.name != "rng":  # rng is drawn from --seed
                out.setdefault(o.name, o.flag)
    return out


def as_flags(message: str) -> str:
    """The message with the argument names replaced by their flags: a name of two letters or
    more wherever it stands as a word (name='value' becoming --flag value), a one-letter name
    (b, c) where it opens the message or follows "needs" or "least" (elsewhere b and c may be the
    model's biases)."""
    names = flags()
    long = [k for k in names if len(k) > 1]
    short = [k for k in names if len(k) == 1]
    valued = r"(?<![\w\-'.])(" + "|".join(map(re.escape, long)) + r")='([^']*)'"
    s = re.sub(valued, lambda m: f"{names[m.group(1)]} {m.group(2)}", message)
    words = r"(?<![\w\-'.])(" + "|".join(map(re.escape, long)) + r")(?![\w'(=])"
    letters = r"(?:^|(?<=needs )|(?<=least ))(" + "|".join(short) + r")(?![\w'(])"
    return re.sub(f"{words}|{letters}", lambda m: names[m.group(1) or m.group(2)], s)


def head_as_flag(message: str) -> str:
    """The message with its first word replaced by its flag, when it is an argument's name."""
    head, _, rest = message.partition(" ")
    flag = flags().get(head)
    return message if flag is None else f"{flag} {rest}"


def named_by_flags(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command whose library errors open with the flag (--max-lag must be ...), not the
    argument (max_lag must be ...)."""

    @functools.wraps(run)
    def command(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except InputError as exc:
            raise InputError(head_as_flag(str(exc))) from None

    return command
