"""Validation at the torch driver's boundary: each error names the argument, the value and the
expectation (CONTRIBUTING.md). Chunks are time-major (L, batch, ...) unless batch_first.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import overload

import torch
from torch import nn

from ..errors import InputError
from ..inputs import OneHot
from ..schedule import Truncation
from . import state as st
from .call import takes_starts
from .rule import is_rule

Tensor = torch.Tensor


def check_arguments(
    model: object,
    truncation: object,
    optimizer: object,
    loss_fn: object,
    clip: object,
    scheduler: object,
    batch_first: object,
    checkpoint: object,
    reduction: object = "sum",
) -> float | None:
    """The driver's constructor arguments, each of the kind and range it needs; the clip as a
    float (numpy and torch scalars accepted)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(truncation, Truncation) and not is_rule(truncation):
        raise InputError(f"truncation must be a tbptt.Truncation, got {type(truncation).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InputError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not callable(loss_fn):
        raise InputError(f"loss_fn must be callable (output, y) -> (L, batch), got {loss_fn!r}")
    if clip is not None:
        if isinstance(clip, Tensor) and clip.numel() == 1 and not clip.dtype.is_complex:
            clip = clip.item()
        if isinstance(clip, bool) or not isinstance(clip, numbers.Real):
            raise InputError(f"clip must be a positive number or None, got {clip!r}")
        clip = float(clip)
        if not (math.isfinite(clip) and clip > 0):
            raise InputError(f"clip must be a positive number or None, got {clip!r}")
    if reduction not in ("sum", "mean"):
        raise InputError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise InputError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
    for name, v in (("batch_first", batch_first), ("checkpoint", checkpoint)):
        if not isinstance(v, bool):
            raise InputError(f"{name} must be a bool, got {v!r}")
    declared = getattr(model, "batch_first", None)
    if isinstance(declared, bool) and declared != batch_first:
        raise InputError(
            f"batch_first={batch_first} but the model has batch_first={declared}; pass the same"
        )
    return clip


def check_hooks(backward: object, step: object, grad_hook: object, scaler: bool) -> None:
    """The trainer hooks: callables (where backward= applies is the rule's to check)."""
    for name, fn in (("backward", backward), ("step", step), ("grad_hook", grad_hook)):
        if fn is not None and not callable(fn):
            raise InputError(f"{name} must be callable or None, got {fn!r}")
    if (backward is not None or step is not None) and scaler:
        raise InputError(
            "backward= and step= cannot be combined with the driver's float16 amp (its "
            "GradScaler scales the loss and steps the optimizer): let the trainer do both "
            "(its own mixed precision, amp=False), or use the driver's alone"
        )


def amp_setup(
    amp: object, device: torch.device
) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """The autocast dtype (None: off) and a GradScaler for float16 (True means float16 on CUDA,
    bfloat16 on the CPU).

    Whether this machine can run the model's recurrent layers (nn.RNN, nn.GRU, nn.LSTM) under
    autocast is tried by check_autocast, on one step of one stream: on the CPU, oneDNN runs
    nn.LSTM in bfloat16 only with AVX-512 (BF16) instructions, and an AVX2-only CPU would
    otherwise fail in the middle of training.
    """
    if amp is False or amp is None:
        return None, None
    if amp is True:
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    elif isinstance(amp, torch.dtype):
        if amp not in (torch.float16, torch.bfloat16):
            raise InputError(f"amp must be torch.float16 or torch.bfloat16 as a dtype, got {amp}")
        dtype = amp
    else:
        raise InputError(f"amp must be a bool or a torch.dtype, got {amp!r}")
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return dtype, scaler


def check_autocast(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """Try the model's recurrent layers (nn.RNN, nn.GRU, nn.LSTM) under autocast (amp_setup)."""
    if dtype is None:
        return
    for layer in model.modules():
        if isinstance(layer, nn.RNNBase):
            probe_autocast(layer, device, dtype)


def probe_autocast(layer: nn.RNNBase, device: torch.device, dtype: torch.dtype) -> None:
    """Run one step of `layer` forward and backward under autocast; InputError if it cannot."""
    x = torch.zeros(1, 1, layer.input_size, device=device)  # (L, batch, m) either layout
    params = [p for p in layer.parameters() if p.requires_grad]
    try:
        with torch.autocast(device.type, dtype=dtype):
            out, _ = layer(x)
        if params:
            torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        why = "bfloat16 nn.LSTM on a CPU needs AVX-512; " if dtype == torch.bfloat16 else ""
        raise InputError(
            f"amp={dtype}: this {device.type.upper()} cannot run {type(layer).__name__} in "
            f"{str(dtype).removeprefix('torch.')} ({why}{first}); train without amp, or on a "
            "device that supports it"
        ) from None


def check_state0(
    state0: object, params: Mapping[str, Tensor], device: torch.device
) -> st.State | None:
    """state0 detached on the model's device, of the parameters' floating dtype (or None)."""
    if state0 is None:
        return None
    st.check(state0, "state0")
    dtypes = {p.dtype for p in params.values() if p.is_floating_point()}
    for t in st.leaves(state0):
        if t.is_floating_point() and dtypes and t.dtype not in dtypes:
            raise InputError(
                f"state0 holds a {t.dtype} tensor, but the model's parameters are "
                f"{', '.join(sorted(map(str, dtypes)))}; give state0 the parameters' dtype"
            )
    return st.tree_map(lambda s: s.detach().to(device), state0)


@overload
def check_chunk(
    x: object, y: None, mask: object, reset: object, device: torch.device, batch_first: bool
) -> tuple[Tensor, None, Tensor | None, Tensor | None, int]: ...
@overload
def check_chunk(
    x: object, y: object, mask: object, reset: object, device: torch.device, batch_first: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, int]: ...
def check_chunk(
    x: object, y: object, mask: object, reset: object, device: torch.device, batch_first: bool
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, int]:
    """x, y, mask, reset as tensors on the model's device (y None: None), and the chunk's batch
    size.

    A floating x of two axes is one stream, (L, m), as torch.nn.RNN reads unbatched input: it
    gets a batch axis of 1, and so do y, mask and reset. (Integer inputs of two axes are token
    ids, (L, batch).) The tensors are not copied here: the driver copies the records it keeps
    beyond the call (TBPTT.feed).
    """
    lead_name = "(batch, L)" if batch_first else "(L, batch)"
    if isinstance(x, OneHot):  # integer inputs reach the module as their ids (L, batch)
        x = x.ids
    x = _tensor(x, "x", device)
    y = None if y is None else _tensor(y, "y", device)
    mask = None if mask is None else _tensor(mask, "mask", device)
    reset = None if reset is None else _tensor(reset, "reset", device)
    if x.dim() < 2:
        raise InputError(f"x must have shape {lead_name[:-1]}, ...), got {tuple(x.shape)}")
    if x.dim() == 2 and x.is_floating_point():  # one stream (L, m)
        ax = 0 if batch_first else 1
        x = x.unsqueeze(ax)
        if y is not None and y.dim() >= 1 and y.shape[0] == x.shape[1 - ax]:
            y = y.unsqueeze(ax)
        mask = None if mask is None or mask.dim() != 1 else mask.unsqueeze(ax)
        reset = None if reset is None or reset.dim() != 1 else reset.unsqueeze(ax)
    lead = tuple(x.shape[:2])
    if y is not None and tuple(y.shape[:2]) != lead:
        raise InputError(
            f"y must start with the shape {lead} of x {lead_name}, got {tuple(y.shape)}"
        )
    if mask is not None and tuple(mask.shape) != lead:
        raise InputError(f"mask must have shape {lead} {lead_name} like x, got {tuple(mask.shape)}")
    if reset is not None:
        if reset.dtype != torch.bool:
            raise InputError(f"reset must be a bool tensor, got dtype {reset.dtype}")
        if tuple(reset.shape) != lead:
            raise InputError(
                f"reset must have shape {lead} {lead_name} like x, got {tuple(reset.shape)}"
            )
    return x, y, mask, reset, lead[0 if batch_first else 1]


def _tensor(a: object, name: str, device: torch.device) -> Tensor:
    try:
        return torch.as_tensor(a).detach().to(device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(
            f"{name} must be a tensor or an array, got {type(a).__name__}: {exc}"
        ) from None


def check_result(res: object, x: Tensor) -> tuple[Tensor, st.State]:
    """The module's result under the protocol (output, new_state), output starting like x."""
    if not (isinstance(res, tuple | list) and len(res) == 2):
        raise InputError(
            "model must follow the protocol model(x, state) -> (output, new_state), "
            f"got a {type(res).__name__}"
        )
    out, new = res
    lead = tuple(x.shape[:2])
    if not isinstance(out, Tensor) or tuple(out.shape[:2]) != lead:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise InputError(f"model's output must start with the shape {lead} of x, got {got}")
    st.check(new, "the model's new_state")
    return out, new


def check_losses(losses: object, x: Tensor) -> Tensor:
    """loss_fn's result: floating per-step, per-stream losses shaped like x's first two axes,
    attached to the graph when gradients are being recorded."""
    want = tuple(x.shape[:2])
    if not isinstance(losses, Tensor) or tuple(losses.shape) != want:
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise InputError(
            f"loss_fn must return per-step, per-stream losses of shape {want}, got {got}"
        )
    if not losses.is_floating_point():
        raise InputError(f"loss_fn must return floating-point losses, got dtype {losses.dtype}")
    if torch.is_grad_enabled() and not losses.requires_grad:
        raise InputError(
            "the losses do not depend on the model's parameters (no gradient can flow): the "
            "model's output or loss_fn's result was detached, or computed under torch.no_grad()"
        )
    return losses


def check_starts(model: nn.Module, state0: object) -> bool:
    """Whether the module takes the resets itself (call.takes_starts; SEMANTICS.md 10), refused
    with a state0: such a module restarts its streams from its own initial state."""
    starts = takes_starts(model)
    if starts and state0 is not None:
        raise InputError(
            "state0 cannot be given for a module whose forward takes starts= (SEMANTICS.md 10): "
            "it restarts its streams from its own initial state"
        )
    return starts


def check_signature(new: st.State, before: object, state0: object) -> object:
    """The structure and shapes of the state a module returned on the stream being trained:
    those of state0 at the first call (before None), the same as before at the others."""
    sig = st.signature(new)
    if before is None:
        if state0 is not None and st.signature(state0) != sig:
            raise InputError(
                f"state0 has shapes {st.signature(state0)}, but the model's state has {sig}"
            )
    elif sig != before:
        raise InputError(f"the model returned a state of shapes {sig}, before {before}")
    return sig


def check_format(sd: object, fmt: str, kind: str) -> None:
    """A saved state of format `fmt` (from `kind`.state_dict()), or InputError."""
    if not isinstance(sd, dict) or sd.get("format") != fmt:
        got = sd.get("format") if isinstance(sd, dict) else type(sd).__name__
        raise InputError(f"state must be a {fmt!r} dict from {kind}.state_dict(), got {got!r}")


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
