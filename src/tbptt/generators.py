"""Random generators of the methods that draw (UORO's signs, ARTBP's cuts), on both engines.

    as_generator(rng)         a numpy Generator from a seed, a Generator or None (fresh entropy)
    rng_state(rng)            its full state as a 0-d string array (JSON): np.savez-ready
    set_rng_state(rng, s)     restore it; InputError if damaged or of another bit generator

Both engines draw from a numpy Generator, so a seed gives the same draws on either.
"""

from __future__ import annotations

import json

import numpy as np

from .checks import is_int
from .errors import InputError

Array = np.ndarray


def as_generator(rng: object, name: str = "rng") -> np.random.Generator:
    """A numpy Generator from a seed (an integer >= 0), a Generator (used as it is) or None
    (fresh entropy from the operating system)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (is_int(rng) and int(rng) >= 0):  # type: ignore[arg-type]
        return np.random.default_rng(None if rng is None else int(rng))  # type: ignore[arg-type]
    raise InputError(
        f"{name} must be a seed (an integer >= 0), a numpy Generator or None, got {rng!r}"
    )


def rng_state(rng: np.random.Generator) -> Array:
    """The generator's full state as a 0-d string array (JSON): np.savez-ready, no pickling."""
    plain = lambda v: v.tolist() if isinstance(v, np.ndarray) else v  # noqa: E731
    state = rng.bit_generator.state
    state = {
        k: {kk: plain(vv) for kk, vv in v.items()} if isinstance(v, dict) else plain(v)
        for k, v in state.items()
    }
    return np.asarray(json.dumps(state))


def set_rng_state(rng: np.random.Generator, saved: object) -> None:
    """Restore what rng_state saved; InputError if it is damaged or of another bit generator."""
    try:
        state = json.loads(str(saved))
        name = state["bit_generator"]
    except (ValueError, TypeError, KeyError):
        raise InputError("the saved random state is damaged") from None
    if name != type(rng.bit_generator).__name__:
        raise InputError(
            f"the saved random state is of {name}, this trainer's generator is "
            f"{type(rng.bit_generator).__name__}"
        )
    try:
        rng.bit_generator.state = state
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"the saved random state is damaged ({exc})") from None
