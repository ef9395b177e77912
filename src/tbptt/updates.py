"""What every online trainer does the same way (tbptt.TBPTT, RTRL, UORO, ARTBP).

- the checks of its settings (model, optimizer, loss, clip, reduction), one InputError each;
- the forward pass of a piece of the stream, with the non-finite check of SEMANTICS.md 6;
- one optimizer update: the global norm, the non-finite check of the gradient, clipping
  (Pascanu, Mikolov and Bengio 2013, with torch's 1e-6), the step, the non-finite check of the
  new parameters, and the model pointed at them (the old arrays are never modified);
- the file plumbing of save/load (atomic .npz, no pickles) and the checks of what is loaded;
- a random generator from a seed, and its state as one array (so a resumed run draws the same).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from .checks import Batch, check_batch
from .elman import ElmanRNN, Trajectory, forward
from .errors import InputError, NonFiniteError
from .files import atomic_write
from .functions import LOSSES, loss_and_error
from .optim import SGD, Adam, all_finite, clip_coefficient, grad_norm

REDUCTIONS = ("sum", "mean")

Array = np.ndarray


# -- settings -----------------------------------------------------------------------------------
def check_model(model: object) -> None:
    if not isinstance(model, ElmanRNN):
        raise InputError(f"model must be a tbptt.ElmanRNN, got {type(model).__name__}")


def check_settings(optimizer: object, loss: object, clip: object, reduction: object) -> None:
    """InputError naming the first bad one of optimizer, loss, clip, reduction."""
    if not isinstance(optimizer, SGD | Adam):
        raise InputError(
            f"optimizer must be tbptt.SGD or tbptt.Adam, got {type(optimizer).__name__}"
        )
    if loss not in LOSSES:
        raise InputError(f"loss must be 'l2' or 'cross_entropy', got {loss!r}")
    if clip is not None and (
        isinstance(clip, bool)
        or not isinstance(clip, int | float | np.integer | np.floating)
        or not 0 < clip < np.inf
    ):
        raise InputError(f"clip must be a positive finite number or None, got {clip!r}")
    if reduction not in REDUCTIONS:
        raise InputError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def check_chunk(model: ElmanRNN, loss: str, x, y, mask, reset) -> Batch:
    """A chunk fed to an online trainer, checked against its model and loss (checks.check_batch):
    x, y, mask, reset as (T, batch, ...) arrays of the model's dtype."""
    return check_batch(
        x, y, m=model.m, p=model.p, dtype=model.dtype, loss=loss, g=model.g, mask=mask, reset=reset
    )


def check_count(name: str, value: object) -> int:
    """An integer >= 1 (k1, b, ...), or InputError."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def as_generator(rng: object, name: str = "rng") -> np.random.Generator:
    """A numpy Generator from a seed (an integer >= 0), a Generator (used as it is) or None
    (fresh entropy from the operating system)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (
        not isinstance(rng, bool) and isinstance(rng, int | np.integer) and int(rng) >= 0
    ):
        return np.random.default_rng(None if rng is None else int(rng))
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


def set_rng_state(rng: np.random.Generator, saved: Array) -> None:
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


# -- the forward pass of a piece ----------------------------------------------------------------
def forward_checked(
    model: ElmanRNN,
    x: Array,
    y: Array,
    h: Array,
    h0: Array,
    loss: str,
    mask: Array | None,
    reset: Array | None,
    t: int,
    updates: int,
    hs: Array | None = None,
) -> tuple[Trajectory, Array, Array]:
    """Steps t+1..t+len(x) from the carried state h: the trajectory, l_t (L, batch) and e_t.

    NonFiniteError naming the first step whose state or loss is not finite (SEMANTICS.md 6)."""
    traj = forward(model, x, h, reset, h0, hs=hs)
    l, e = loss_and_error(model.g, loss, traj.z, y, mask)
    if not (np.isfinite(traj.h[-1]).all() and np.isfinite(l).all()):
        bad = ~(np.isfinite(traj.h).all(axis=(1, 2)) & np.isfinite(l).all(axis=1))
        step = t + 1 + int(np.argmax(bad))
        raise NonFiniteError(
            f"the state or loss became non-finite at step {step} (update {updates + 1}); "
            f"parameters kept at their last finite values",
            step,
        )
    return traj, l, e


# -- one update ---------------------------------------------------------------------------------
def optimizer_update(
    model: ElmanRNN,
    optimizer: SGD | Adam,
    opt_state: dict,
    grads: dict[str, Array],
    clip: float | None,
    u: int,
    updates: int,
) -> dict:
    """Clip and apply `grads` (fresh arrays, which the optimizer may overwrite) at the update after
    step u; point the model at the new parameters and return the new optimizer state.

    NonFiniteError, with the parameters untouched, when the gradient or the new parameters are not
    finite (SEMANTICS.md 6)."""
    norm = grad_norm(grads)  # one pass; look for the culprit only if needed
    if not math.isfinite(norm):
        for k, g in grads.items():
            if not np.isfinite(g).all():
                raise NonFiniteError(
                    f"the gradient of {k} became non-finite at the update after step {u} "
                    f"(update {updates + 1}); parameters kept at their last finite values",
                    u,
                )
    coef = 1.0 if clip is None else clip_coefficient(norm, clip)
    if coef < 1:  # clip_grad_norm, in place: the arrays are ours
        for g in grads.values():
            g *= coef
    params, opt_state = optimizer.step(model.params, grads, opt_state, reuse_grads=True)
    if not all_finite(params.values()):
        raise NonFiniteError(
            f"the parameters became non-finite at the update after step {u} "
            f"(update {updates + 1}); kept at their last finite values",
            u,
        )
    model._rebind(params)  # checked finite just above; the old arrays stay untouched
    return opt_state


# -- saving and loading -------------------------------------------------------------------------
def save_npz(path: str | os.PathLike, state: dict[str, Array]) -> None:
    """Write a state dict to an .npz file atomically (tbptt.files.atomic_write)."""
    atomic_write(path, lambda fh: np.savez(fh, **state))


def load_npz(path: str | os.PathLike, kind: str, load_state_dict) -> None:
    """Read what save_npz wrote (no pickled objects are read) and hand it to load_state_dict;
    InputError naming the file if it is missing, damaged or from another kind of trainer."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            state = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as exc:  # a truncated zip, a foreign format, an object array
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "pickle" in first:
            first = "it holds Python objects, not only arrays"
        raise InputError(f"{path} is damaged or not a {kind} state ({first})") from None
    try:
        load_state_dict(state)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def check_saved_params(
    state: dict[str, Array], model: ElmanRNN, prefixes: tuple[str, ...] = ("model.",)
) -> None:
    """InputError unless the saved model.* arrays have this model's names, shapes and dtype (and
    every float array under `prefixes` has its dtype; scalars are counters, any float)."""
    mine = {k: v.shape for k, v in model.params.items()}
    got = {k[6:]: np.shape(v) for k, v in state.items() if k.startswith("model.")}
    if got != mine:
        raise InputError(f"the saved parameters have shapes {got}; this model's are {mine}")
    dtype = model.dtype
    for k, v in state.items():
        a = np.asarray(v)
        if k.startswith(prefixes) and a.ndim and a.dtype.kind == "f" and a.dtype != dtype:
            raise InputError(f"the saved {k} is {v.dtype}; this model is {dtype}")


def check_saved_setting(name: str, saved: object, mine: object) -> None:
    if saved != mine:
        raise InputError(f"the saved run had {name}={saved!r}, this trainer {mine!r}")
