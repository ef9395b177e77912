"""The torch engine's trainer shell, tbptt.torch.TBPTT: online training of any PyTorch recurrent
module on a stream of chunks (SEMANTICS.md 5, 6), with TBPTT(k1, k2) or another method's rule.

The module follows the protocol module(x_chunk, state) -> (output_chunk, new_state); data comes as
chunks of any length. The shell holds what every method does alike:

    the stream   chunks checked and cut into pieces where the rule says (rule.boundary); the
                 position t, the carried state, the batch (fixed by the first chunk)
    the call     `outputs`: the one place the module runs on a piece (call.py), under autocast,
                 its result checked against the protocol; `losses` adds loss_fn and the mask
    an update    the rule's gradient of the window it says is due, then, in the order of
                 SEMANTICS.md 5: one collective (distributed.py: the sum over the processes, with
                 the loss checks), the mean's division (5.4), the grad scaler's unscale, the
                 gradient hook, clipping by the global norm, the optimizer step, the scheduler;
                 a non-finite loss or gradient stops it before the step (6)
    saving       the format, the shell's settings, the position, the model's, optimizer's,
                 scheduler's and grad scaler's state_dicts and torch's generators, beside the
                 rule's part; with several processes the streams of all of them (distributed.py)

The rule (rule.py: the protocol, and the view of the shell it may use) holds the rest: where
pieces end, how a piece runs and what it keeps, each update's gradient, its saved state. A
tbptt.Truncation is TBPTT's rule (tbptt.py); ARTBP, RTRL and UORO (artbp.py, rtrl.py, uoro.py)
build this shell with theirs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any, Protocol, TypedDict

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..errors import InputError, NonFiniteError
from ..files import atomic_write
from ..schedule import Truncation, Window
from . import call as calls
from . import distributed as dd
from . import state as st
from .checks import (
    amp_setup,
    check_arguments,
    check_autocast,
    check_chunk,
    check_hooks,
    check_ids,
    check_linked,
    check_losses,
    check_optimizer,
    check_result,
    check_signature,
    check_starts,
    check_state0,
    check_state0_batch,
    mask_total,
    nonfinite_input,
)
from .modules import kept_targets, l2_loss, masked
from .rule import Rule, Shell
from .saved import (
    check_counters,
    check_format,
    check_model_state,
    check_optimizer_state,
    check_saved,
    optimizer_kind,
)
from .tbptt import TruncationRule

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Tensor], Tensor]
__all__ = [
    "SHELL_OPTIONS",
    "TBPTT",
    "ForwardOptions",
    "LossFn",
    "Rule",
    "SegmentOptions",
    "Shell",
    "passed_on",
    "read",
    "shell_options",
]

# The shell's options besides model, truncation (or rule) and optimizer, as TBPTT's Args document
# them. The methods' factories (ARTBP, RTRL, UORO) take those of ForwardOptions or SegmentOptions
# below as **options and pass them on (passed_on); make_trainer picks them from its keywords
# (shell_options).
SHELL_OPTIONS = (
    "loss_fn",
    "clip",
    "scheduler",
    "batch_first",
    "amp",
    "checkpoint",
    "state0",
    "process_group",
    "reduction",
    "backward",
    "step",
    "grad_hook",
)


class Scheduler(Protocol):
    """What the shell calls on a scheduler (a torch.optim.lr_scheduler.LRScheduler, or any object
    with these methods): step() once per update, and its state saved and restored."""

    def step(self) -> object: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state_dict: dict, /) -> object: ...


def shell_options(keywords: dict) -> dict:
    """The shell's options among a factory's keywords (SHELL_OPTIONS), to pass on to TBPTT."""
    return {k: v for k, v in keywords.items() if k in SHELL_OPTIONS}


class ForwardOptions(TypedDict, total=False):
    """The shell's options that the factories of the forward-mode methods (tbptt.torch.RTRL,
    UORO) pass on, each as TBPTT's Args document it, with TBPTT's defaults."""

    loss_fn: LossFn
    clip: float | None
    scheduler: Scheduler | None
    batch_first: bool
    state0: st.State | None
    process_group: object | None
    reduction: str


class SegmentOptions(ForwardOptions, total=False):
    """ForwardOptions and the two of a method that keeps segments (tbptt.torch.ARTBP)."""

    amp: bool | torch.dtype
    checkpoint: bool


def passed_on(factory: str, options: Mapping[str, object], takes: type) -> dict[str, Any]:
    """A factory's **options, after a TypeError (Python's own message) for a keyword that is not
    one of `takes` (a TypedDict above)."""
    known = takes.__optional_keys__  # type: ignore[attr-defined]
    for name in options:
        if name not in known:
            raise TypeError(f"{factory}() got an unexpected keyword argument {name!r}")
    return dict(options)


class TBPTT:
    """Train a recurrent nn.Module online with TBPTT(k1, k2) on a stream of chunks.

    Args:
        model: called as model(x, state) -> (output, new_state); state None means its zeros.
            A forward that takes the keyword starts gets the resets itself, one call per piece:
            model(x, state, starts=reset) (SEMANTICS.md 10; call.py). Any other module's resets
            run packed, its streams' pieces as the rows of a few calls, unless it is not packable
            (an attribute packable = False, or a batch-norm layer in training mode:
            call.packable), whose calls are split at the resets instead.
        truncation: the schedule tbptt.Truncation(k1, k2, inject, flush), or a method's rule
            (rule.py; tbptt.torch.ARTBP, RTRL and UORO build this shell with theirs).
        optimizer: any torch.optim optimizer over the model's parameters.
        loss_fn: loss_fn(output, y) -> per-step, per-stream losses l_t of shape (L, batch)
            ((batch, L) when batch_first); the driver masks them and sums over the injected steps
            and the streams.
        clip: max global gradient norm per update (torch.nn.utils.clip_grad_norm_); None: none.
        scheduler: an LR scheduler, stepped once per update.
        batch_first: chunks (and outputs, losses, masks, resets) are (batch, L, ...).
        amp: run the module and the loss under torch.autocast (True: float16 on CUDA, bfloat16
            on the CPU; or a dtype). float16 brings a GradScaler, whose skipped steps are counted
            in `skipped`. A CPU that cannot run the module in bfloat16 is refused here.
        checkpoint: keep each segment's graph as a torch.utils.checkpoint (activations recomputed
            during backward); the same numbers for less memory.
        state0: the state a stream starts and restarts (after a reset) from; None: the module's
            zeros. A constant: no gradient reaches it.
        process_group: None: when torch.distributed is initialized (or the model is wrapped in
            DistributedDataParallel) this process trains its own streams and each update sums
            the gradient over the group's processes (distributed.py); False: never; or a
            torch.distributed.ProcessGroup.
        reduction: "sum" (the contract's L: each update differentiates the sum of its injected
            losses) or "mean" (that sum divided by the number of injected, unmasked (step,
            stream) losses, mask weights summed: what word_language_model, Lightning and Keras
            compute, a short last chunk included).
        backward: hooks for other trainers (docs/torch.md). backward(loss) is called instead of
            loss.backward() where the update is one backward() of the summed injected losses
            (k2 <= k1), e.g. accelerator.backward or LightningModule.manual_backward; refused
            with k2 > k1, where the driver differentiates its kept segments itself.
        step: called instead of optimizer.step() (after clipping; the scheduler is still the
            driver's to step).
        grad_hook: grad_hook(params) on the finished gradient of every update (summed over the
            processes, unscaled), before clipping and the step; it may change the .grad in place.

    feed(x, y, mask=None, reset=None) runs one chunk and updates where the schedule says;
    finish() does the flush update. state, t, updates: the carried state, the steps computed and
    the updates made. save/load write and read everything needed to continue exactly (with
    several processes: collective calls; rank 0 writes the streams of all of them).
    """

    def __init__(
        self,
        model: nn.Module,
        truncation: Truncation | Rule,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn = l2_loss,
        clip: float | None = None,
        scheduler: Scheduler | None = None,
        batch_first: bool = False,
        amp: bool | torch.dtype = False,
        checkpoint: bool = False,
        state0: st.State | None = None,
        process_group: object | None = None,
        reduction: str = "sum",
        backward: Callable[[Tensor], object] | None = None,
        step: Callable[[], object] | None = None,
        grad_hook: Callable[[list[Tensor]], object] | None = None,
    ) -> None:
        model, group = dd.resolve(model, process_group)  # DDP: its .module and its group
        args = (model, truncation, optimizer, loss_fn, clip, scheduler, batch_first, checkpoint)
        clip = check_arguments(*args, reduction)
        self.params: dict[str, Tensor] = {
            n: p for n, p in model.named_parameters() if p.requires_grad
        }
        if not self.params:
            raise InputError("model has no parameters that require grad: nothing to train")
        check_optimizer(optimizer, self.params)
        rule = TruncationRule(truncation) if isinstance(truncation, Truncation) else truncation
        self.model, self.rule, self.optimizer = model, rule, optimizer
        self.loss_fn, self.clip, self.scheduler = loss_fn, clip, scheduler
        self.batch_first, self.checkpoint, self.reduction = batch_first, checkpoint, reduction
        self.tdim = 1 if batch_first else 0  # the time axis of x, y, losses, masks, resets
        self.device = next(iter(self.params.values())).device
        self.amp_dtype, self.scaler = amp_setup(amp, self.device)
        check_hooks(backward, step, grad_hook, self.scaler is not None)
        check_autocast(model, self.device, self.amp_dtype)
        self.backward_fn, self.step_fn, self.grad_hook = backward, step, grad_hook
        self.state0 = check_state0(state0, self.params, self.device)
        self.starts = check_starts(model, self.state0)  # it takes the resets (SEMANTICS.md 10)
        self.batch_dim = getattr(model, "state_batch_dim", None)  # its states' stream axis
        dtypes = [p.dtype for p in self.params.values() if p.is_floating_point()]
        dense = dtypes and not getattr(model, "takes_ids", True)  # OneHot: one-hot rows
        self.onehot = dtypes[0] if dense else None  # (a Recurrent without an embedding)
        self.takes_ids = bool(getattr(model, "takes_ids", False))  # (a Recurrent with one)
        # t: the steps computed so far, u_prev: the last update time (the schedule's phase),
        # skipped: the updates whose step float16 loss scaling (the GradScaler) skipped
        self.t = self.u_prev = self.updates = self.skipped = 0
        self.batch: int | None = None  # streams, fixed by the first chunk
        self.chunk: tuple[int, ...] | None = None  # the shape of the chunk x being fed
        self._fed: tuple[Tensor, Tensor, Tensor | None] | None = None  # its x, y, mask
        self.finished, self.last_grad_norm = False, None
        self.carried: st.State | None = self.state0  # the carried state, attached to the last graph
        self._sig: object = None  # the state's structure and shapes, fixed by the first call
        self._linked = False  # the module's state was seen to depend on the state given (once)
        self._pending: list[Tensor] = []  # loss sums not yet checked for finiteness
        self._pending_from = 1
        self._chunk_total = self._chunk_count = self._chunk_local = 0.0
        self.comm = None if group is None else dd.Comm(group)
        if self.comm is not None:  # the same settings everywhere; rank 0's parameters
            params = list(self.params.values())
            mine = {"batch_first": int(batch_first), "reduction": int(reduction == "mean")}
            mine["parameters"] = len(params)
            mine["parameter elements"] = sum(p.numel() for p in params)
            self.comm.setup(
                {**rule.settings(self), **mine}, [*model.parameters(), *model.buffers()]
            )
        rule.bind(self)

    @property
    def truncation(self) -> Truncation:
        """The rule's grid of update times: TBPTT's schedule (ARTBP: its possible cuts)."""
        return self.rule.truncation

    @property
    def FORMAT(self) -> str:  # noqa: N802  (the name it had as a class attribute)
        """The format of state_dict(): the rule's."""
        return self.rule.format

    # -- the stream -----------------------------------------------------------------------------
    @property
    def state(self) -> st.State | None:
        """The carried state h_t (detached), None before the first chunk without state0."""
        return st.detach(self.carried)

    def feed(
        self, x: Tensor, y: Tensor, mask: Tensor | None = None, reset: Tensor | None = None
    ) -> float:
        """Run the next chunk x (L, batch, ...) with targets y, updating where the schedule says.

        mask (L, batch): weights of the losses (0 switches l_t off). reset (L, batch) bool: stream
        j starts step t from state0 (6.1). All (batch, L, ...) when batch_first. A chunk of one
        stream may leave out the batch axis: x (L, m) with y (L, p) or (L,). Returns the chunk's
        mean loss, sum(w l) / sum(w) over its steps and streams (w the mask, 1 without one), as
        computed during the forward pass; with several processes, over all of them.
        """
        rule = self.rule
        if self.finished:
            raise InputError(
                "feed after finish(): the stream was finished; create a new "
                f"{rule.name} to train on another"
            )
        check_ids(x, self.takes_ids)
        x, y, mask, reset, batch = check_chunk(
            x, y, mask, reset, self.device, self.batch_first, self.onehot
        )
        weights = None if mask is None else mask_total(mask, self.batch_first)  # (one sync)
        if self.batch is None:
            check_state0_batch(self.state0, batch, self.batch_dim)
            self.batch = batch
        elif batch != self.batch:
            raise InputError(
                f"x has {batch} streams (batch size), but this stream was started with "
                f"{self.batch}; the streams of a batch go on together, so the size cannot change"
            )
        try:
            self.chunk, self._fed = tuple(x.shape), (x, y, mask)
            return self._feed(x, y, mask, reset, weights)
        finally:
            self.chunk = self._fed = None

    def _feed(
        self, x: Tensor, y: Tensor, mask: Tensor | None, reset: Tensor | None, weights: float | None
    ) -> float:
        """feed's pieces and updates, on a checked chunk (weights: the mask's total)."""
        rule = self.rule
        assert self.batch is not None  # fixed by feed
        T = x.shape[self.tdim]
        count = float(T * self.batch) if weights is None else weights
        self._chunk_total, self._chunk_count, self._chunk_local = 0.0, count, count
        start = 0
        while start < T:  # pieces end where the rule says; chunk ends are free
            stop = min(T, start + rule.boundary(self) - self.t)
            piece = (calls.narrow(a, self.tdim, start, stop) for a in (x, y, mask, reset))
            losses, self.carried = rule.run(self, *piece)
            self._pending.extend(losses.unbind() if losses.dim() else (losses,))
            self.t += stop - start
            w = rule.due(self)
            if w is not None:
                self._update(w)
            rule.after(self, w)
            start = stop
        self._check_losses(
            f"no update used it yet (next: update {self.updates + 1})", self.updates + 1
        )
        rule.release(self, finished=False)
        return self._chunk_total / max(self._chunk_count, 1e-300)

    def finish(self) -> None:
        """End of stream: the rule's last update (the flush window, the pending contributions,
        the last cut), if there is one."""
        if self.finished:
            return
        w = self.rule.final(self)
        if w is not None and w.u > self.u_prev:
            self._update(w)
        self.rule.release(self, finished=True)
        self.finished = True

    def predict(
        self, x: Tensor, state: st.State | None = None, reset: Tensor | None = None
    ) -> tuple[Tensor, st.State]:
        """The module's output on x (L, batch, ...) from `state` (None: state0, or the module's
        zeros), restarting stream j from state0 where reset[t, j], as training does (6.1). No
        gradient, nothing kept; the stream being trained is not touched. Returns (output, state).
        """
        check_ids(x, self.takes_ids)
        x, _, _, reset, _ = check_chunk(
            x, None, None, reset, self.device, self.batch_first, self.onehot
        )
        state = self.state0 if state is None else state
        with torch.no_grad():
            out, state = self.outputs(x, state, reset, stream=False)
        return out, st.detach(state)

    # -- the module call ------------------------------------------------------------------------
    def outputs(
        self, x: Tensor, state, reset: Tensor | None, params: dict | None = None, stream=True
    ) -> tuple[Tensor, st.State]:
        """A piece's outputs and the state after it: the one module call site (call.py), with
        the parameter values `params` (None: the live ones); stream False: predict's."""

        def call(xa: Tensor, s: st.State | None, **kw: object) -> tuple[Tensor, st.State]:
            return self.call(xa, s, params, stream, **kw)

        kw = {"restart": self.state0, "batch_dim": self.batch_dim, "tdim": self.tdim}
        kw["starts"], kw["packed"] = self.starts, calls.packable(self.model)
        return calls.outputs(call, x, state, reset, **kw)

    def losses(
        self, x, y, mask, reset, state, params: dict | None = None, checkpoint: bool = False
    ) -> tuple[Tensor, st.State]:
        """A piece from `state`: its masked losses l_t (L, batch) and the state after it; with
        checkpoint, as a torch.utils.checkpoint (recomputed during backward)."""
        if not self._linked and state is not None and torch.is_grad_enabled():
            if not any(t.requires_grad for t in st.leaves(state)):  # once: a leaf copy, for the
                state = st.as_leaf(state)  # check of the state returned (call), the same values
        args = (x, y, mask, reset, state, params)
        if checkpoint:
            return torch_checkpoint(self._losses, *args, use_reentrant=False)
        return self._losses(*args)

    def _losses(self, x, y, mask, reset, state, params) -> tuple[Tensor, st.State]:
        out, state = self.outputs(x, state, reset, params)
        with self._autocast():
            losses = self.loss_fn(out, kept_targets(y, mask))
        return masked(check_losses(losses, x, self.chunk, self.tdim), mask), state

    def _autocast(self):
        dtype = self.amp_dtype
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def call(
        self, x: Tensor, state, params: dict | None = None, stream: bool = True, **kw: object
    ) -> tuple[Tensor, st.State]:
        """One call of the module (with the given parameter values; kw: starts=), its result
        checked; on the stream being trained (not predict's), the state's shapes must stay the
        same on the calls of all its streams (call.py checks the packed calls)."""
        first = self._sig is None
        try:
            with self._autocast():
                if params is None:
                    res = self.model(x, state, **kw)
                else:
                    res = functional_call(self.model, params, (x, state), kw or None)
        except InputError:  # the module's own check of its input (a TypeError too): as it is
            raise
        except TypeError as exc:
            if first:
                raise InputError(
                    "model must follow the protocol model(x, state) -> (output, new_state); "
                    f"calling it raised: {exc}"
                ) from exc
            raise
        out, new = check_result(res, x)
        if stream and self.batch in (None, x.shape[1 - self.tdim]):
            self._sig = check_signature(new, self._sig, self.state0)
            if not self._linked and torch.is_grad_enabled() and state is not None:
                self._linked = check_linked(self.model, state, new)
        return out, new

    def stream_dims(self, state: st.State | None, batch: int) -> list[int] | None:
        """The stream axis of each tensor of a state."""
        return st.stream_dims(state, batch, self.batch_dim)

    # -- the update -----------------------------------------------------------------------------
    def backward(self, loss: Tensor) -> None:
        """The update's one backward() of the summed injected losses: the caller's hook, or
        loss.backward() (scaled by the GradScaler with float16 amp)."""
        if self.backward_fn is not None:
            self.backward_fn(loss)
        else:
            self.scale(loss).backward()

    def scale(self, loss: Tensor) -> Tensor:
        return loss if self.scaler is None else self.scaler.scale(loss)

    def _update(self, w: Window) -> None:
        """The rule's gradient of window w, then SEMANTICS.md 5's pipeline: update number n."""
        n = self.updates + 1
        what = f"update {n} (after step {w.u}) was not applied"
        if self.comm is None:
            self._check_losses(what, n)
        for p in self.params.values():
            p.grad = None
        mean = self.reduction == "mean"
        count = self.rule.gradient(self, w, mean)
        if self.comm is not None:  # (D.2): the gradient of the loss over all processes' streams
            count = self._check_losses(what, n, count)
        if mean and count > 0:  # (5.4): the derivative of the mean is that of the sum / count
            for p in self.params.values():
                if p.grad is not None:
                    p.grad.div_(count)
        self.last_grad_norm, skipped = optimizer_step(self, n, w)
        self.skipped += skipped
        self.u_prev, self.updates = w.u, n

    def _check_losses(self, what: str, n: int, count: float | None = None) -> float:
        """Raise NonFiniteError (SEMANTICS.md 6) before any update uses a non-finite loss: one
        sync. With several processes, a collective: at an update (count given: the mean's) the
        update's one collective, which sums the gradients, the loss totals and the counts and
        checks every process's losses and step t; between updates a check of the same buffer
        (every process at step t, all raise together). Returns the count summed."""
        if not self._pending and count is None:
            return 0.0
        v, res = total(self._pending), None
        if self.comm is not None:
            res = self.comm.reduce(
                list(self.params.values()),
                grads=count is not None,
                t=self.t,
                finite=math.isfinite(v),
                values=[v if math.isfinite(v) else 0.0, self._chunk_local, count or 0.0],
                what=f"the check after step {self.t}" if count is None else f"update {n}",
            )
        first, self._pending, self._pending_from = self._pending_from, [], self.t + 1
        here = math.isfinite(v)
        if not (here if res is None else res.finite):
            value = "in another process" if here else v
            if self.updates and not all_finite(self.params):  # the last step made them so
                raise NonFiniteError(
                    f"the parameters became non-finite at update {self.updates} (after step "
                    f"{self.u_prev}): the gradient was finite, the step too large; the losses of "
                    f"steps {first}..{self.t} are {value}; no checkpoint holds these values",
                    self.u_prev,
                    self.updates,
                )
            bad = None if self._fed is None or here else nonfinite_input(*self._fed, self.tdim)
            if bad is not None:  # the input, not the training: say so
                raise InputError(
                    f"{bad}; the losses of steps {first}..{self.t} are {value}; {what}; updates "
                    f"so far: {self.updates}"
                )
            raise NonFiniteError(
                f"the loss became non-finite ({value}) in steps {first}..{self.t}; {what}; the "
                f"parameters are untouched (updates so far: {self.updates})",
                self.t,
                n,
            )
        if res is None:
            self._chunk_total += v
            return 0.0
        self._chunk_total += res.values[0]  # the mean over every process's streams
        self._chunk_count = res.values[1]
        return res.values[2]

    # -- saving ---------------------------------------------------------------------------------
    def state_dict(self) -> dict | None:
        """Everything needed to continue exactly, as tensors and plain values (weights_only-safe):
        the format, the shell's settings, the position, the model's, optimizer's, scheduler's and
        grad scaler's state_dict()s, torch's generators, and the rule's part (its settings, the
        carried state, what it keeps: kept segments' records, whose graphs load runs again; or
        the influence and the contributions since the last update).

        Several processes: a collective call; rank 0 gets the state over all streams (each
        per-stream tensor side by side on the stream axis, plus every rank's RNG states under
        "ranks"), the others None.
        """
        if not all_finite(self.params):  # section 6: the last checkpoint holds finite values
            raise NonFiniteError(
                f"the parameters are non-finite after update {self.updates}; their state is not "
                "saved (the last checkpoint holds finite values)",
                self.t,
                self.updates,
            )
        sched, cuda = self.scheduler, self.device.type == "cuda"
        sd = {
            "format": self.rule.format,
            "batch_first": self.batch_first,
            "reduction": self.reduction,
            "t": self.t,
            "u_prev": self.u_prev,
            "updates": self.updates,
            "skipped": self.skipped,
            "batch": self.batch,
            "finished": self.finished,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_class": optimizer_kind(self.optimizer),
            "scheduler": None if sched is None else sched.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
            "device_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
            **self.rule.state_dict(self),
        }
        if self.comm is None:
            return sd
        dims = self.rule.stream_dims(self, sd["state"], self.batch or 0)
        return self.comm.gather_streams(sd, axis=1 - self.tdim, dims=dims)

    def load_state_dict(self, sd: dict | str | None) -> None:
        """Restore what state_dict() returned, after checking all of it (saved.py, the rule's
        read): InputError, and nothing has changed, if it comes from another kind of trainer,
        other settings, another model or optimizer, or is incomplete.

        Several processes: a collective call; rank 0's sd is used, each process takes its share
        of the streams (any number of processes that divides them). A str (load's: rank 0 could
        not read the file) is raised as an InputError on every rank.
        """
        if self.comm is not None:
            sd = self.comm.broadcast(sd, "the checkpoint")
            if isinstance(sd, str):  # rank 0 could not read it: the message
                raise InputError(sd)
        check_format(sd, self.rule.format, self.rule.name)
        assert isinstance(sd, dict)  # check_format refused anything else
        if self.comm is not None:
            B = sd["batch"]
            dims = None if B is None else self.rule.stream_dims(self, sd["state"], B)
            sd = dd.split_streams(sd, self.comm.rank, self.comm.world, 1 - self.tdim, dims)
        # everything is checked (saved.py) before anything is written: all or nothing
        check_model_state(self.model, sd["model"])
        try:
            restore = self.rule.read(self, sd)  # checks the rule's part, changing nothing
        except KeyError as exc:
            raise InputError(f"the saved state is incomplete: it has no {exc}") from None
        settings = {"batch_first": self.batch_first, "reduction": self.reduction}
        check_saved(sd, settings, {"scheduler": self.scheduler, "scaler": self.scaler})
        check_optimizer_state(self.optimizer, sd["optimizer"], sd.get("optimizer_class"))
        check_counters(sd)
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(sd["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(sd["scaler"])
        self.t, self.u_prev, self.updates = int(sd["t"]), int(sd["u_prev"]), int(sd["updates"])
        self.skipped = int(sd["skipped"])
        self.batch, self.finished = sd["batch"], bool(sd["finished"])
        self._pending, self._pending_from = [], self.t + 1
        self.carried = restore()
        self._sig = None if self.carried is None else st.signature(self.carried)
        torch.set_rng_state(sd["rng"])
        if sd["device_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(sd["device_rng"], self.device)

    def save(self, path: str | os.PathLike | None) -> None:
        """Write state_dict() atomically (tbptt.files.atomic_write).

        Several processes: a collective call; rank 0 writes, and every process returns once the
        file is complete (the other ranks' path is not used).
        """
        comm = self.comm
        if comm is None:
            atomic_write(_path_given(path), lambda fh: torch.save(self.state_dict(), fh))
            return

        def write() -> None:
            sd = self.state_dict()
            if comm.rank == 0:
                if path is None:
                    raise InputError("path must be a file name on rank 0, got None")
                atomic_write(path, lambda fh: torch.save(sd, fh))

        comm.together(write, "writing the checkpoint")

    def load(self, path: str | os.PathLike | None) -> None:
        """Read what save() wrote, with torch.load(weights_only=True): no arbitrary unpickling.

        Several processes: a collective call; rank 0 reads the file (the other ranks' path is not
        used) and sends it to the others; any number of processes that divides the streams.
        """
        if self.comm is None:
            self.load_state_dict(read(_path_given(path)))
            return
        sd = None
        if self.comm.rank == 0:
            try:
                sd = read(_path_given(path))
            except InputError as exc:
                sd = str(exc)  # every rank raises it
        self.load_state_dict(sd)


def optimizer_step(shell: TBPTT, n: int, w: Window) -> tuple[float, int]:
    """The end of update n's pipeline (SEMANTICS.md 5), on the summed gradient in .grad: the
    grad scaler's unscale, the gradient hook, clipping by the global norm, the optimizer step (or
    the step hook), the scheduler. Returns the norm and whether the grad scaler skipped the step;
    NonFiniteError, with the parameters untouched, when the gradient is not finite (6)."""
    params, scaler, skipped = list(shell.params.values()), shell.scaler, 0
    if scaler is not None:
        scaler.unscale_(shell.optimizer)
    if shell.grad_hook is not None:
        shell.grad_hook(params)
    if shell.clip is not None:
        norm = float(torch.nn.utils.clip_grad_norm_(params, shell.clip))
    else:
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(()))
    if scaler is None and not math.isfinite(norm):
        for p in params:
            p.grad = None
        raise NonFiniteError(
            f"the gradient became non-finite at update {n} (window of steps {w.s}..{w.u}); "
            "the update was not applied and the parameters are untouched",
            w.u,
            n,
        )
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(shell.optimizer)
        scaler.update()
        skipped = int(scaler.get_scale() < scale)  # an inf/NaN step was skipped
    elif shell.step_fn is not None:
        shell.step_fn()
    else:
        shell.optimizer.step()
    if shell.scheduler is not None:
        shell.scheduler.step()
    return norm, skipped


def _path_given(path: str | os.PathLike | None) -> str | os.PathLike:
    """The path of save and load where it is used (one process; load's rank 0): None, which only
    the other ranks may give, raises the TypeError os.fspath raises for it."""
    if path is None:
        raise TypeError("expected str, bytes or os.PathLike object, not NoneType")
    return path


def all_finite(params: dict[str, Tensor]) -> bool:
    """Whether every parameter is finite (one sync). Section 6's step that makes a parameter
    non-finite shows in the next losses; this tells that case apart, and state_dict refuses to
    save such values, so no checkpoint holds them."""
    return bool(torch.stack([torch.isfinite(p.detach()).all() for p in params.values()]).all())


def total(pending: list[Tensor]) -> float:
    """The sum of the loss sums not yet checked (one sync)."""
    if not pending:
        return 0.0
    return float(pending[0] if len(pending) == 1 else torch.stack(pending).sum())


def read(path: str | os.PathLike) -> dict:
    """A saved driver state, read with weights_only=True onto the CPU; InputError if unreadable.

    The error names the file and never suggests loading it unsafely.
    """
    import pickle
    import zipfile

    path = os.fspath(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"checkpoint {path}: no such file") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Weights only load failed" in str(exc):
            first = "it holds objects other than tensors and plain values"
        raise InputError(
            f"checkpoint {path} is damaged or not a tbptt checkpoint ({first})"
        ) from None
