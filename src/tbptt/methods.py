"""The four ways to get the gradient of the seed's model, by name: one call builds each.

    method   options (defaults)                                  frozen estimate / online trainer
    tbptt    k1, k2 (= k1), inject ("new"), flush (True)         tbptt.gradients / tbptt.TBPTT
    rtrl     k1 (1), max_bytes (1 GiB)                           tbptt.rtrl_gradients / tbptt.RTRL
    uoro     k1 (1), rng, eps (1e-7)                             tbptt.uoro_gradients / tbptt.UORO
    artbp    c, b (1), rng, biased_max_length (None)             tbptt.artbp_gradients / tbptt.ARTBP

make_trainer(method, model, optimizer, loss=, clip=, h0=, reduction=, **options) is what
`tbptt train --method` needs; frozen_gradients(method, model, x, y, ..., **options) what an analysis
of bias and variance needs. An option the method does not take is a one-line InputError naming
the options it does take; nothing is built.
"""

from __future__ import annotations

import numpy as np

from .artbp import artbp_gradients
from .artbp_online import ARTBP
from .elman import ElmanRNN
from .errors import InputError
from .forward_online import RTRL, UORO
from .gradients import gradients
from .online import TBPTT
from .optim import SGD, Adam
from .rtrl import rtrl_gradients
from .schedule import Truncation
from .uoro import uoro_gradients

Array = np.ndarray

OPTIONS: dict[str, tuple[str, ...]] = {
    "tbptt": ("k1", "k2", "inject", "flush"),
    "rtrl": ("k1", "max_bytes"),
    "uoro": ("k1", "rng", "eps"),
    "artbp": ("c", "b", "rng", "biased_max_length"),
}
METHODS = tuple(OPTIONS)


def check_options(
    method: object, options: dict, table: dict[str, tuple[str, ...]] = OPTIONS
) -> None:
    """InputError unless `method` is one of METHODS and every option is one it takes (the
    torch engine passes its own table, with its extra options)."""
    if method not in table:
        raise InputError(f"method must be one of {', '.join(table)}, got {method!r}")
    unknown = sorted(set(options) - set(table[method]))
    if unknown:
        raise InputError(
            f"method {method} does not take {', '.join(unknown)}; its options are "
            f"{', '.join(table[method])}"
        )
    if method == "tbptt" and "k1" not in options:
        raise InputError("method tbptt needs k1 (and k2, which defaults to k1)")
    if method == "artbp" and "c" not in options:
        raise InputError("method artbp needs c, the probability of a cut (or a callable of L)")


def truncation(options: dict) -> Truncation:
    """tbptt's schedule from its options (k2 defaults to k1, flush to True)."""
    try:
        return Truncation(
            options["k1"],
            options.get("k2", options["k1"]),
            inject=options.get("inject", "new"),
            flush=options.get("flush", True),
        )
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from None


def make_trainer(
    method: str,
    model: ElmanRNN,
    optimizer: SGD | Adam,
    *,
    loss: str = "l2",
    clip: float | None = None,
    h0: Array | None = None,
    reduction: str = "sum",
    **options,
) -> TBPTT | RTRL | UORO | ARTBP:
    """The online trainer of `method` with its options; all four have feed(x, y, mask, reset),
    finish(), save(path), load(path), state_dict(), load_state_dict(state), model, updates."""
    check_options(method, options)
    common = {"loss": loss, "clip": clip, "h0": h0, "reduction": reduction}
    if method == "tbptt":
        return TBPTT(model, truncation(options), optimizer, **common)
    return {"rtrl": RTRL, "uoro": UORO, "artbp": ARTBP}[method](
        model, optimizer, **common, **options
    )


def frozen_gradients(
    method: str,
    model: ElmanRNN,
    x: Array,
    y: Array,
    h0: Array | None = None,
    loss: str = "l2",
    *,
    mask: Array | None = None,
    reset: Array | None = None,
    **options,
) -> dict[str, Array]:
    """The frozen gradient estimate of `method` (parameters fixed over the sequence), keyed
    A, B, C[, b, c] (h0's gradient, which only tbptt.gradients gives, is left out)."""
    check_options(method, options)
    kw = {"h0": h0, "loss": loss, "mask": mask, "reset": reset}
    if method == "tbptt":
        out = gradients(model, x, y, truncation(options), **kw)
        out.pop("h0")
        return out
    options = {k: v for k, v in options.items() if k != "k1"}  # rtrl, uoro: when to update
    if method in ("uoro", "artbp"):
        options = {"rng": None, **options}
    fn = {"rtrl": rtrl_gradients, "uoro": uoro_gradients, "artbp": artbp_gradients}[method]
    return fn(model, x, y, **kw, **options)
