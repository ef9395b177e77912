"""A saved driver state checked against the driver before load writes anything (all or nothing).

torch's own load_state_dict methods write as they go: nn.Module.load_state_dict copies every
tensor whose shape fits before it raises on the others, and an optimizer takes the state of
another kind of optimizer and fails at its next step. So TBPTT.load_state_dict (driver.py) checks
the whole saved state first, here, each error naming what differs:

    the shell's part   every key present, the settings (batch_first, reduction), the counters
                       integers, the generator's state a byte tensor of this torch's size
    model              the same keys, and each tensor of the same shape and dtype
    optimizer          the same class (saved beside its state_dict since issue 24; older files:
                       the same settings' names), the same groups of the same sizes, each
                       parameter's state (moments, momentum) of its parameter's shape
    scheduler, scaler  present or absent as in this driver, with the same keys

and the rule checks its own part (rule.read); only then is anything written.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import InputError

Tensor = torch.Tensor
SHELL_KEYS = (
    "batch_first",
    "reduction",
    "t",
    "u_prev",
    "updates",
    "skipped",
    "batch",
    "finished",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "device_rng",
)


def check_format(sd: object, fmt: str, kind: str) -> None:
    """A saved state of format `fmt` (from `kind`.state_dict()) holding the shell's keys, or
    InputError."""
    if not isinstance(sd, dict) or sd.get("format") != fmt:
        got = sd.get("format") if isinstance(sd, dict) else type(sd).__name__
        raise InputError(f"state must be a {fmt!r} dict from {kind}.state_dict(), got {got!r}")
    missing = [k for k in SHELL_KEYS if k not in sd]
    if missing:
        raise InputError(f"the saved state is incomplete: it has no {', '.join(missing)}")


def check_saved(sd: dict, settings: dict, parts: dict) -> None:
    """A saved state with these settings, and these parts (scheduler, scaler) present or absent
    as here; InputError naming the first difference."""
    for name, mine in settings.items():
        if sd[name] != mine:
            raise InputError(f"the saved run had {name}={sd[name]!r}, this driver {mine!r}")
    for name, obj in parts.items():
        if (sd[name] is None) != (obj is None):
            raise InputError(
                f"the saved run {'had' if sd[name] is not None else 'had no'} {name}, "
                f"this driver {'has none' if obj is None else 'has one'}"
            )
        if obj is not None:
            check_keys(name, sd[name], obj.state_dict())


def check_keys(name: str, saved: object, mine: object) -> None:
    """A saved state_dict with the keys of this object's (a scheduler's, a grad scaler's)."""
    if not isinstance(mine, Mapping):
        return
    if not isinstance(saved, Mapping) or set(saved) != set(mine):
        got = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
        raise InputError(
            f"the saved {name} state has the keys {got}, this driver's {sorted(mine)}: a "
            f"{name} of another kind"
        )


def check_counters(sd: dict) -> None:
    """The position: non-negative integers, the batch None or an integer, the generator's state
    a byte tensor that torch.set_rng_state takes."""
    for k in ("t", "u_prev", "updates", "skipped"):
        v = sd[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(f"the saved {k} must be an integer >= 0, got {v!r} (damaged)")
    b = sd["batch"]
    if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
        raise InputError(f"the saved batch must be None or an integer >= 1, got {b!r} (damaged)")
    rng, want = sd["rng"], torch.get_rng_state()
    if not (isinstance(rng, Tensor) and rng.dtype == want.dtype and rng.shape == want.shape):
        raise InputError("the saved rng is not a generator state of this torch (damaged)")


def check_model_state(model: nn.Module, saved: object) -> None:
    """A saved model state_dict with this model's keys, shapes and dtypes."""
    name = type(model).__name__
    if not isinstance(saved, Mapping):
        raise InputError(f"the saved model must be a state_dict, got {type(saved).__name__}")
    mine = model.state_dict()
    missing = [k for k in mine if k not in saved]
    extra = [k for k in saved if k not in mine]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}")
        if extra:
            parts.append(f"has {', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}")
        raise InputError(
            f"the saved model does not fit this {name}: it {' and '.join(parts)} (another "
            "architecture or cell, or an incomplete state)"
        )
    for k, v in mine.items():
        s = saved[k]
        if not isinstance(v, Tensor):
            continue
        if not isinstance(s, Tensor):
            raise InputError(f"the saved model's {k} is a {type(s).__name__}, not a tensor")
        if s.shape != v.shape:
            raise InputError(
                f"the saved model's {k} has shape {tuple(s.shape)}, this {name}'s "
                f"{tuple(v.shape)} (another cell, hidden size or layer?)"
            )
        if s.dtype != v.dtype:
            got, want = (str(d).removeprefix("torch.") for d in (s.dtype, v.dtype))
            raise InputError(f"the saved model's {k} is {got}, this {name}'s {want}")


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """The class name of the optimizer, under the wrappers that hold one as .optimizer
    (Accelerate's)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # type: ignore[attr-defined]
    return type(optimizer).__name__


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: object, kind: object) -> None:
    """A saved optimizer state_dict that this optimizer continues: the same class (kind, the
    saved class name; None in older files), settings, groups and per-parameter state shapes."""
    name = optimizer_kind(optimizer)
    if kind is not None and kind != name:
        raise InputError(
            f"the saved run's optimizer is {kind}, this driver's {name}: its state cannot "
            f"continue another optimizer's; resume with a {kind}"
        )
    if not (
        isinstance(saved, Mapping)
        and isinstance(saved.get("param_groups"), list)
        and isinstance(saved.get("state"), Mapping)
    ):
        raise InputError("the saved optimizer state is damaged (no param_groups and state)")
    groups, theirs = optimizer.state_dict()["param_groups"], saved["param_groups"]
    if len(theirs) != len(groups):
        raise InputError(
            f"the saved optimizer has {len(theirs)} parameter groups, this {name} {len(groups)}"
        )
    for i, (a, b) in enumerate(zip(groups, theirs, strict=True)):
        if not isinstance(b, Mapping) or len(b.get("params", ())) != len(a["params"]):
            got = len(b.get("params", ())) if isinstance(b, Mapping) else "no"
            raise InputError(
                f"the saved optimizer's group {i} holds {got} parameters, this {name}'s "
                f"{len(a['params'])}"
            )
        other = sorted(set(b) - set(a))
        if other:  # settings this optimizer does not have: another optimizer's
            raise InputError(
                f"the saved optimizer has the settings {', '.join(other)}, which this {name} "
                f"does not: the state of another optimizer"
            )
    params = [p for g in optimizer.param_groups for p in g["params"]]  # saved in this order
    index = dict(zip([i for b in theirs for i in b["params"]], params, strict=True))
    for i, state in saved["state"].items():
        p = index.get(i)
        if p is None or not isinstance(state, Mapping):
            raise InputError(f"the saved optimizer state names parameter {i!r}, which it lacks")
        for k, v in state.items():
            if isinstance(v, Tensor) and v.dim() and v.shape != p.shape:
                raise InputError(
                    f"the saved optimizer's {k} of parameter {i} has shape {tuple(v.shape)}, "
                    f"the parameter {tuple(p.shape)}"
                )
