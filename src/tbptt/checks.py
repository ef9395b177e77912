"""The checks of single values that every part of the project makes alike, and saved-state keys.

    check_int(name, value, least=1)      an integer (not a bool) >= least
    check_real(name, value, ...)         a real number (not a bool) in a range, finite by default
    prefixed(state, "model.")            {key without the prefix: value} of the keys that have it

Each raises tbptt.InputError naming the argument, the value and what was expected; arrays are
checked by each engine (tbptt.numpy.batch, tbptt.torch.checks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeVar

import numpy as np

from .errors import InputError

V = TypeVar("V")


def is_int(value: object) -> bool:
    """An integer of Python or numpy, not a bool."""
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


def is_real(value: object) -> bool:
    """A real number of Python or numpy (integers included), not a bool."""
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


def check_int(name: str, value: object, least: int = 1, what: str = "") -> int:
    """An integer >= least, or InputError "{name} must be an integer >= {least}{what}, got v"."""
    if not is_int(value) or value < least:  # type: ignore[operator]
        raise InputError(f"{name} must be an integer >= {least}{what}, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def check_real(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    open_low: bool = False,
    expected: str = "",
) -> float:
    """A finite real number in [low, high] ((low, high] with open_low), or InputError naming the
    argument, the value and `expected` (default: the range)."""
    if is_real(value):
        v = float(value)  # type: ignore[arg-type]
        if math.isfinite(v) and (v > low if open_low else v >= low) and v <= high:
            return v
    if not expected:
        if low == 0 and open_low and high == math.inf:
            expected = "a positive number"
        elif low == 0 and high == math.inf:
            expected = "a number >= 0"
        else:
            expected = f"a number in {'(' if open_low else '['}{low}, {high}]"
    raise InputError(f"{name} must be {expected}, got {value!r}")


def prefixed(state: Mapping[str, V], prefix: str) -> dict[str, V]:
    """The entries of `state` whose key starts with `prefix`, keyed without it."""
    n = len(prefix)
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix)}


def with_prefix(prefix: str, values: Mapping[str, V]) -> dict[str, V]:
    """The entries of `values` keyed with `prefix` in front (prefixed's inverse)."""
    return {f"{prefix}{k}": v for k, v in values.items()}
