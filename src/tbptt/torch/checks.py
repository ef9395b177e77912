"""Validation at the torch driver's boundary: each error names the argument, the value and the
expectation (CONTRIBUTING.md). Chunks are time-major (L, batch, ...) unless batch_first.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..inputs import OneHot
from ..schedule import Truncation
from . import state as st

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
) -> None:
    """The driver's constructor arguments, each of the kind and range it needs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(truncation, Truncation):
        raise TypeError(f"truncation must be a tbptt.Truncation, got {type(truncation).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (output, y) -> (L, batch), got {loss_fn!r}")
    if clip is not None and (
        isinstance(clip, bool)
        or not isinstance(clip, int | float)
        or not math.isfinite(clip)
        or clip <= 0
    ):
        raise ValueError(f"clip must be a positive number or None, got {clip!r}")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
    for name, v in (("batch_first", batch_first), ("checkpoint", checkpoint)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {v!r}")
    declared = getattr(model, "batch_first", None)
    if isinstance(declared, bool) and declared != batch_first:
        raise ValueError(
            f"batch_first={batch_first} but the model has batch_first={declared}; pass the same"
        )


def amp_setup(amp: object, device: torch.device) -> tuple[torch.dtype | None, object]:
    """The autocast dtype (None: off) and a GradScaler for float16 (True means float16 on CUDA)."""
    if amp is False or amp is None:
        return None, None
    if amp is True:
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    elif isinstance(amp, torch.dtype):
        dtype = amp
    else:
        raise TypeError(f"amp must be a bool or a torch.dtype, got {amp!r}")
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return dtype, scaler


def check_chunk(
    x: object, y: object, mask: object, reset: object, device: torch.device, batch_first: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, int]:
    """x, y, mask, reset as our own tensors on the model's device, and the chunk's batch size.

    The copies matter: the driver keeps chunks while a window can reach them, and a loader may
    refill its buffers.
    """
    lead_name = "(batch, L)" if batch_first else "(L, batch)"
    if isinstance(x, OneHot):  # integer inputs reach the module as their ids (L, batch)
        x = x.ids
    x = torch.as_tensor(x).detach().to(device, copy=True)
    y = torch.as_tensor(y).detach().to(device, copy=True)
    if x.dim() < 2:
        raise ValueError(f"x must have shape {lead_name[:-1]}, ...), got {tuple(x.shape)}")
    lead = tuple(x.shape[:2])
    if tuple(y.shape[:2]) != lead:
        raise ValueError(
            f"y must start with the shape {lead} of x {lead_name}, got {tuple(y.shape)}"
        )
    if mask is not None:
        mask = torch.as_tensor(mask).detach().to(device, copy=True)
        if tuple(mask.shape) != lead:
            raise ValueError(
                f"mask must have shape {lead} {lead_name} like x, got {tuple(mask.shape)}"
            )
    if reset is not None:
        reset = torch.as_tensor(reset).detach().to(device, copy=True)
        if reset.dtype != torch.bool:
            raise TypeError(f"reset must be a bool tensor, got dtype {reset.dtype}")
        if tuple(reset.shape) != lead:
            raise ValueError(
                f"reset must have shape {lead} {lead_name} like x, got {tuple(reset.shape)}"
            )
    return x, y, mask, reset, lead[0 if batch_first else 1]


def check_result(res: object, x: Tensor) -> tuple[Tensor, st.State]:
    """The module's result under the protocol (output, new_state), output starting like x."""
    if not (isinstance(res, tuple | list) and len(res) == 2):
        raise TypeError(
            "model must follow the protocol model(x, state) -> (output, new_state), "
            f"got a {type(res).__name__}"
        )
    out, new = res
    lead = tuple(x.shape[:2])
    if not isinstance(out, Tensor) or tuple(out.shape[:2]) != lead:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"model's output must start with the shape {lead} of x, got {got}")
    st.check(new, "the model's new_state")
    return out, new


def check_losses(losses: object, x: Tensor) -> Tensor:
    """loss_fn's result: per-step, per-stream losses shaped like x's first two axes."""
    want = tuple(x.shape[:2])
    if not isinstance(losses, Tensor) or tuple(losses.shape) != want:
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return per-step, per-stream losses of shape {want}, got {got}"
        )
    return losses
