"""The random draws of ARTBP (cuts) and UORO (signs) in the torch engine: numpy Generators.

The torch methods draw from a numpy Generator exactly as the numpy engine does (tbptt.artbp.Cuts:
one uniform number per possible boundary, in order; tbptt.uoro.signs: one uniform number per sign,
step by step, stream by stream), so the same seed gives both engines the same cuts and signs.
With several processes every process holds the same generator and draws the same numbers: the
cuts are shared, and each process takes the signs of its own streams from the draws for all.
The processes check at the start that their generators agree (a digest among the settings);
fresh entropy (rng=None) is rank 0's, sent to the others once.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..generators import rng_state, set_rng_state

if TYPE_CHECKING:
    from .distributed import Comm


def digest(rng: np.random.Generator, fresh: bool) -> int:
    """A 56-bit digest of the generator's state for the processes' check of their settings; 0
    for fresh entropy (rank 0's is sent to the others by share)."""
    if fresh:
        return 0
    return int.from_bytes(hashlib.sha256(str(rng_state(rng)).encode()).digest()[:7], "little")


def float_bits(v: float) -> int:
    """A float64's bits as a signed 64-bit integer (settings are compared as integers)."""
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def share(comm: Comm | None, rng: np.random.Generator, fresh: bool) -> None:
    """With several processes and fresh entropy, every process takes rank 0's generator state."""
    if comm is not None and fresh:
        saved = comm.broadcast(str(rng_state(rng)), "the random state")
        set_rng_state(rng, np.asarray(saved))


def saved(rng: np.random.Generator) -> str:
    """The generator's state as a plain string (torch.load(weights_only=True) reads it)."""
    return str(rng_state(rng))


def restored(rng: np.random.Generator, text: object) -> Mapping[str, Any]:
    """The bit generator state saved by `saved`, checked (InputError if damaged or of another
    bit generator), for rng.bit_generator.state = ... once everything else is checked."""
    probe = np.random.Generator(type(rng.bit_generator)())
    set_rng_state(probe, np.asarray("" if text is None else text))
    return probe.bit_generator.state
