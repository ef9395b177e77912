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
    for name, layer in model.named_modules():  # a recurrent layer at any depth reads the layout
        if isinstance(layer, nn.RNNBase) and layer.batch_first != batch_first:
            raise InputError(
                f"batch_first={batch_first} but the model's {name or 'module'} "
                f"({type(layer).__name__}) has batch_first={layer.batch_first}: it would read "
                f"the chunks' {'time' if batch_first else 'stream'} axis as its steps; pass "
                f"batch_first={layer.batch_first} to the driver, or build the layer with "
                f"batch_first={batch_first}"
            )
    return clip


def check_optimizer(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]) -> None:
    """An optimizer that holds at least one of the model's trainable parameters (some may be left
    out: frozen layers); one over another model's parameters would leave this one unchanged."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in held for p in params.values()):
        raise InputError(
            f"optimizer ({type(optimizer).__name__}) holds none of the model's {len(params)} "
            "trainable parameters, so its steps would never change the model: build it over "
            "this model's parameters, e.g. torch.optim.SGD(model.parameters(), lr=...)"
        )


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


def check_state0_batch(state0: st.State | None, batch: int, declared: int | None) -> None:
    """state0 holds one state per stream of the first chunk: `batch` along its stream axis (the
    module's state_batch_dim, else some axis), or InputError naming state0."""
    for k, t in enumerate(st.leaves(state0) if state0 is not None else []):
        if declared is not None:
            ok = -t.dim() <= declared < t.dim() and t.shape[declared] == batch
            where = f"axis {declared} (the module's state_batch_dim)"
        else:
            ok = batch in t.shape
            where = "one axis"
        if not ok:
            n = len(st.leaves(state0))
            which = "state0" if n == 1 else f"state0's tensor {k} of {n}"
            raise InputError(
                f"{which} has shape {tuple(t.shape)}, but x has {batch} streams (batch): state0 "
                f"must hold one state per stream, {batch} along {where}"
            )


def check_ids(x: object, takes_ids: bool) -> None:
    """InputError when a module that looks up integer ids (a Recurrent with an embedding) is given
    floating x: said before check_chunk reads a floating (L, m) x as one stream of vectors."""
    if takes_ids and isinstance(x, torch.Tensor) and x.is_floating_point():
        raise InputError(
            f"x must hold integer ids (the model looks them up in its embedding), got {x.dtype} "
            f"of shape {tuple(x.shape)}; pass a LongTensor of token ids"
        )


@overload
def check_chunk(
    x: object,
    y: None,
    mask: object,
    reset: object,
    device: torch.device,
    batch_first: bool,
    onehot: torch.dtype | None = None,
) -> tuple[Tensor, None, Tensor | None, Tensor | None, int]: ...
@overload
def check_chunk(
    x: object,
    y: object,
    mask: object,
    reset: object,
    device: torch.device,
    batch_first: bool,
    onehot: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, int]: ...
def check_chunk(
    x: object,
    y: object,
    mask: object,
    reset: object,
    device: torch.device,
    batch_first: bool,
    onehot: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, int]:
    """x, y, mask, reset as tensors on the model's device (y None: None), and the chunk's batch
    size. A tbptt.OneHot x reaches the module as its ids, or as its one-hot rows of dtype
    `onehot` when given (a module without an embedding: takes_ids False).

    A floating x of two axes is one stream, (L, m), as torch.nn.RNN reads unbatched input: it
    gets a batch axis of 1, and so do y, mask and reset. (Integer inputs of two axes are token
    ids, (L, batch).) The tensors are not copied here: the driver copies the records it keeps
    beyond the call (TBPTT.feed).
    """
    lead_name = "(batch, L)" if batch_first else "(L, batch)"
    dense = isinstance(x, OneHot) and onehot is not None
    width = x.m if isinstance(x, OneHot) else 0
    if isinstance(x, OneHot):  # integer inputs reach the module as their ids (L, batch)
        x = x.ids
    x = _tensor(x, "x", device)
    if dense:  # or as their one-hot rows (L, batch, m)
        x = torch.nn.functional.one_hot(x.long(), width).to(onehot)
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


def mask_total(mask: Tensor, batch_first: bool) -> float:
    """The sum of the mask's weights (one sync, the one feed makes for the chunk's count), each
    weight checked finite and >= 0: a negative weight would make training climb its loss."""
    if not mask.numel():
        return 0.0
    total, low = torch.stack([mask.sum(dtype=torch.float64), mask.amin().double()]).tolist()
    if math.isfinite(total) and math.isfinite(low) and low >= 0:
        return total
    w = mask.double()
    bad = tuple(int(i) for i in torch.nonzero(~(torch.isfinite(w) & (w >= 0)))[0])
    t, j = bad[::-1] if batch_first else bad
    raise InputError(
        f"mask must hold finite weights >= 0 (0 switches a loss off), got {w[bad].item()} at "
        f"step {t}, stream {j} of the chunk"
    )


def nonfinite_input(x: Tensor, y: Tensor, mask: Tensor | None, tdim: int) -> str | None:
    """Where x, or y at a step that is not masked, holds a NaN or an infinity: a line naming the
    argument, the value and its step and stream in the chunk (None: both finite). Looked at only
    once a loss is non-finite, so a finite chunk costs nothing."""
    for name, a in (("x", x), ("y", y)):
        if not a.is_floating_point():
            continue
        bad = ~torch.isfinite(a)
        if name == "y" and mask is not None:  # a masked target is never read (B5)
            bad &= (mask > 0).view(*mask.shape, *(1,) * (a.dim() - mask.dim()))
        if bool(bad.any()):
            idx = tuple(int(i) for i in torch.nonzero(bad)[0])
            t, j = (idx[1], idx[0]) if tdim else (idx[0], idx[1])
            return (
                f"{name} must be finite, got {a[idx].item()} at step {t}, stream {j} of the chunk "
                f"(index {idx}): the input, not the training, made the loss non-finite"
            )
    return None


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


def check_losses(
    losses: object, x: Tensor, chunk: tuple[int, ...] | None = None, tdim: int = 0
) -> Tensor:
    """loss_fn's result: floating per-step, per-stream losses shaped like x's first two axes,
    attached to the graph when gradients are being recorded. x: the piece the loss was called
    on; chunk: the shape of the caller's chunk it is part of (the error quotes both), tdim: the
    time axis."""
    want = tuple(x.shape[:2])
    if not isinstance(losses, Tensor) or tuple(losses.shape) != want:
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        lead = "(batch, L)" if tdim else "(L, batch)"
        where = f"{want}"
        if chunk is not None and tuple(chunk[:2]) != want:
            where = (
                f"{tuple(chunk[:2])} for the chunk x of shape {chunk}; the driver calls it on "
                f"pieces of the chunk, here {x.shape[tdim]} of its {chunk[tdim]} steps: {want}"
            )
        elif chunk is not None:
            where = f"{want} for the chunk x of shape {chunk}"
        raise InputError(
            f"loss_fn must return per-step, per-stream losses shaped like x's first two axes "
            f"{lead}, {where}; got {got}"
        )
    if not losses.is_floating_point():
        raise InputError(f"loss_fn must return floating-point losses, got dtype {losses.dtype}")
    if torch.is_grad_enabled() and not losses.requires_grad:
        raise InputError(
            "the losses do not depend on the model's parameters (no gradient can flow): the "
            "model's output or loss_fn's result was detached, or computed under torch.no_grad()"
        )
    return losses


def check_linked(model: nn.Module, state: st.State, new: st.State) -> bool:
    """Whether the state a module returned was checked to be a differentiable function of the
    state it was given (SEMANTICS.md 6): False while the given state carries no gradient (nothing
    to tell); InputError, naming the module, if a returned tensor was cut from it (detached)."""
    if not any(st.differentiable(t) for t in st.leaves(state)):
        return True  # a state of integers carries no gradient: nothing to check
    if not any(t.requires_grad for t in st.leaves(state)):
        return False
    cut = [k for k, t in enumerate(st.leaves(new)) if st.differentiable(t) and not t.requires_grad]
    if cut:
        n = len(st.leaves(new))
        raise InputError(
            f"model {type(model).__name__} returned a state cut from the state it was given "
            f"(tensor {cut[0]} of {n} has no gradient: detached?), so no gradient would cross its "
            "calls; the protocol needs new_state to be a differentiable function of state: "
            "return it attached (the driver truncates where the schedule says)"
        )
    return True


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
