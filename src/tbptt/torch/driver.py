"""Online TBPTT(k1, k2) for any PyTorch recurrent module, by the canonical rule (SEMANTICS.md 4-6).

The module follows the protocol module(x_chunk, state) -> (output_chunk, new_state); data comes as
chunks of any length. After every step u that the schedule marks (4.1), the window W = (s, u, I)
of (4.2)-(4.3) is backpropagated and the optimizer steps; the stream goes on from the carried
state with the new parameters.

    (4.1)  update times  u in {k1, 2 k1, ...}   (flush: also u = T at finish())
    (4.2)  window start  s = max(1, u - k2 + 1)   (flush: where the next regular window starts)
    (4.3)  injected      "new": I = (u_prev, u],  "window": I = [s, u],  "last": I = {u}
    (5.2), (5.3)         the update: the derivative of sum_{t in I} l_t through steps s..u as they
                         were computed, each with the parameter values it ran with (segments.py)
    (5.4)  reduction     "sum": that derivative; "mean": divided by the number of injected,
                         unmasked (step, stream) losses (mask weights summed)

Two paths, chosen from the schedule alone:

    chained (k2 <= k1)   windows never overlap, so every step runs with the live parameters and
                         the segments of a window hang on one graph (the state is not cut inside
                         it); the update is one backward() of the summed injected losses. With
                         k1 = k2 this is the plain detach-every-k loop, operation for operation.
    overlapping (k2 > k1) each segment runs through torch.func.functional_call with a leaf copy of
                         the parameters taken after the last update (one copy per update, shared
                         by its segments) and from a leaf copy of the entering state, so the
                         in-place optimizer step leaves the kept graphs valid. An update walks its
                         segments from u back to s, passing the gradient of each segment's entering
                         state to the segment before as the grad_output of its final state; a
                         segment's graph is freed once no later window reaches it. No step is
                         computed twice.

The flush window (contract version 2) is the next regular window cut at the end of the stream, so
it consists of kept segments with their graphs, like any other window.

Under torch.distributed (distributed.py) each process runs this on its own streams; the update's
gradient is summed over the processes in one collective, after the whole window (either path) and
before clipping and the step, so every process takes the step one process with all streams would.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..errors import InputError, NonFiniteError
from ..files import atomic_write
from ..schedule import Truncation, Window
from . import distributed as dd
from . import state as st
from .checks import (
    amp_setup,
    check_arguments,
    check_autocast,
    check_chunk,
    check_hooks,
    check_losses,
    check_result,
    check_state0,
)
from .modules import l2_loss
from .segments import Graph, Params, Segment, capture_rng, fork_rng, reset_rows

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Tensor], Tensor]
FORMAT = "tbptt.torch.TBPTT/2"


class TBPTT:
    """Train a recurrent nn.Module online with TBPTT(k1, k2) on a stream of chunks.

    Args:
        model: called as model(x, state) -> (output, new_state); state None means its zeros.
        truncation: the schedule tbptt.Truncation(k1, k2, inject, flush).
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

    FORMAT = FORMAT  # of state_dict(); a subclass with another schedule has its own

    def __init__(
        self,
        model: nn.Module,
        truncation: Truncation,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn = l2_loss,
        clip: float | None = None,
        scheduler: object | None = None,
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
        clip = check_arguments(
            model,
            truncation,
            optimizer,
            loss_fn,
            clip,
            scheduler,
            batch_first,
            checkpoint,
            reduction,
        )
        self._named: Params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self._named:
            raise InputError("model has no parameters that require grad: nothing to train")
        self.model, self.truncation, self.optimizer = model, truncation, optimizer
        self.loss_fn, self.clip, self.scheduler = loss_fn, clip, scheduler
        self.batch_first, self.checkpoint, self.reduction = batch_first, checkpoint, reduction
        self._tdim = 1 if batch_first else 0  # the time axis of x, y, losses, masks, resets
        self.device = next(iter(self._named.values())).device
        self._amp_dtype, self.scaler = amp_setup(amp, self.device)
        check_hooks(backward, step, grad_hook, truncation, self.scaler is not None)
        check_autocast(model, self.device, self._amp_dtype)
        self.backward_fn, self.step_fn, self.grad_hook = backward, step, grad_hook
        self.state0 = check_state0(state0, self._named, self.device)
        self._overlap = truncation.k2 > truncation.k1  # kept graphs outlive optimizer steps
        self.t = 0  # steps computed so far: the position in the stream
        self.u_prev = 0  # the last update time: the schedule's phase
        self.updates = 0
        self.skipped = 0  # float16 loss scaling: updates whose step the GradScaler skipped
        self.batch: int | None = None  # streams, fixed by the first chunk
        self.finished = False
        self.last_grad_norm: float | None = None
        self._state: st.State | None = self.state0  # the carried state, attached to the last graph
        self._segments: deque[Segment] = deque()
        self._copies: Params | None = None  # parameter copies of the current interval (overlap)
        self._sig: object = None  # the state's structure and shapes, fixed by the first call
        self._pending: list[Tensor] = []  # loss sums not yet checked for finiteness
        self._pending_from = 1
        self._chunk_total = self._chunk_count = self._chunk_local = 0.0
        self._comm = None if group is None else dd.Comm(group)
        if self._comm is not None:  # the same settings everywhere; rank 0's parameters
            params = list(self._named.values())
            self._comm.setup(
                {
                    **self._schedule_settings(),
                    "batch_first": int(batch_first),
                    "reduction": int(reduction == "mean"),
                    "parameters": len(params),
                    "parameter elements": sum(p.numel() for p in params),
                },
                [*model.parameters(), *model.buffers()],
            )

    # -- the stream -----------------------------------------------------------------------------
    @property
    def state(self) -> st.State | None:
        """The carried state h_t (detached), None before the first chunk without state0."""
        return st.detach(self._state)

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
        if self.finished:
            raise RuntimeError(
                f"the stream was finished; create a new {type(self).__name__} to train on another"
            )
        x, y, mask, reset, batch = check_chunk(x, y, mask, reset, self.device, self.batch_first)
        if self.batch is None:
            self.batch = batch
        elif batch != self.batch:
            raise InputError(
                f"x has {batch} streams (batch size), but this stream was started with "
                f"{self.batch}; the streams of a batch go on together, so the size cannot change"
            )
        T = x.shape[self._tdim]
        count = float(T * self.batch) if mask is None else float(mask.sum())
        self._chunk_total, self._chunk_count, self._chunk_local = 0.0, count, count
        start = 0
        while start < T:  # split at update times and window starts; chunk ends are free
            stop = min(T, start + self._next_boundary(self.t) - self.t)
            self._forward(*(self._cut(a, start, stop) for a in (x, y, mask, reset)))
            w = self._due(self.t)
            if w is not None:
                self._update(w)
            self._prune()
            start = stop
        self._check_losses(
            f"no update used it yet (next: update {self.updates + 1})", self.updates + 1
        )
        for seg in self._segments:  # records that outlive this call: our own copies
            if not seg.owned:
                copy = lambda a: None if a is None else a.clone()  # noqa: E731
                seg.x, seg.y, seg.mask, seg.reset = map(copy, (seg.x, seg.y, seg.mask, seg.reset))
                seg.owned = True
        return self._chunk_total / max(self._chunk_count, 1e-300)

    def finish(self) -> None:
        """End of stream: the flush update (when asked for and its window is not empty)."""
        if self.finished:
            return
        w = self._final_window()
        if w is not None and w.u > self.u_prev:
            self._update(w)
        self._segments.clear()
        self._copies = None
        self.finished = True

    def _cut(self, a: Tensor | None, start: int, stop: int) -> Tensor | None:
        if a is None or (start == 0 and stop == a.shape[self._tdim]):
            return a
        return a.narrow(self._tdim, start, stop - start)

    # -- the schedule: what a driver with another schedule (tbptt.torch.ARTBP) replaces ---------
    def _due(self, t: int) -> Window | None:
        """The window to backpropagate now that step t is computed, if t is an update time."""
        tr = self.truncation
        return tr.window(t, self.u_prev) if tr.is_update(t) else None

    def _final_window(self) -> Window | None:
        """The window finish() backpropagates (the flush window), if any."""
        return self.truncation.flush_window(self.t)

    def _window_start(self) -> int:
        """The first step s of the next window (k2 <= k1: the steps before it need no graph)."""
        tr = self.truncation
        return tr.window(tr.next_update(self.t), self.u_prev).s

    def _oldest_kept(self) -> int:
        """The first step any future window reaches (the next window, regular or flush)."""
        tr = self.truncation
        return tr.next_update(self.t) - tr.k2 + 1

    def _link(self, t0: int, state: st.State) -> st.State:
        """The state passed on, attached, from step t0 - 1 to a segment starting at t0 inside
        a window; TBPTT passes it as it is."""
        return state

    def _schedule_settings(self) -> dict[str, int]:
        """The schedule's settings that every process must share (integers)."""
        tr = self.truncation
        return {
            "k1": tr.k1,
            "k2": tr.k2,
            "inject": ("new", "window", "last").index(tr.inject),
            "flush": int(tr.flush),
        }

    def _schedule_state(self) -> dict:
        """The schedule's part of state_dict()."""
        tr = self.truncation
        return {"truncation": [tr.k1, tr.k2, tr.inject, tr.flush]}

    def _check_schedule(self, sd: dict) -> None:
        """InputError unless the saved run had this schedule."""
        tr = self.truncation
        mine = [tr.k1, tr.k2, tr.inject, tr.flush]
        if list(sd["truncation"]) != mine:
            raise InputError(
                f"the saved run used Truncation{tuple(sd['truncation'])} (k1, k2, inject, flush), "
                f"this driver has Truncation{tuple(mine)}; resume with the same schedule"
            )

    def _restore_schedule(self, sd: dict) -> None:
        """Restore the schedule's part of a checked state_dict (TBPTT: the counters suffice)."""

    def _next_boundary(self, t: int) -> int:
        """The first segment boundary after step t: an update time u or a window start s - 1."""
        tr = self.truncation
        u = tr.next_update(t)
        v = u
        while True:  # cuts s - 1 = u' - k2 of this and later windows, the first one after t
            cut = tr.window(v, v - tr.k1).s - 1
            if cut > t:
                return min(u, cut)
            v += tr.k1

    # -- the forward pass -----------------------------------------------------------------------
    def _forward(self, x: Tensor, y: Tensor, mask: Tensor | None, reset: Tensor | None) -> None:
        """Run steps t+1..t+L as one segment, keeping its graph if a window will reach it."""
        L = x.shape[self._tdim]
        t0, t1 = self.t + 1, self.t + L
        state = self._state
        if self._overlap:  # every step lies in the next window, and the graph outlives the update
            if self._copies is None:
                self._copies = {
                    n: p.detach().clone().requires_grad_() for n, p in self._named.items()
                }
            params, grad, link, leaf = self._copies, True, False, True
            state_in = st.as_leaf(state)
        else:
            s = self._window_start()
            prev = self._segments[-1] if self._segments else None
            params, grad, leaf = None, t1 >= s, False
            link = grad and t0 > s and prev is not None and prev.graph is not None
            state_in = self._link(t0, state) if link else st.detach(state)
        rng, device_rng = capture_rng(self.device) if grad else (None, None)  # rerun on load
        seg = Segment(
            t0=t0,
            L=L,
            x=x,
            y=y,
            mask=mask,
            reset=reset,
            state_in=st.detach(state),
            params=params,
            rng=rng,
            device_rng=device_rng,
            link=link,
        )
        with nullcontext() if grad else torch.no_grad():
            losses, state_out = self._run(seg, state_in, params, self.checkpoint and grad)
        if grad:
            seg.graph = Graph(state_in=state_in, losses=losses, state_out=state_out, leaf=leaf)
        self._segments.append(seg)
        self._state = state_out
        self.t = t1
        self._pending.append(losses.detach().sum(dtype=torch.float64))

    def _run(
        self, seg: Segment, state: st.State | None, params: Params | None, ckpt: bool
    ) -> tuple[Tensor, st.State]:
        """The segment's steps from `state`: the masked losses and the final state."""
        args = (seg.x, seg.y, seg.mask, seg.reset, state, params)
        if ckpt:
            return torch_checkpoint(self._steps, *args, use_reentrant=False)
        return self._steps(*args)

    def _steps(self, x, y, mask, reset, state, params) -> tuple[Tensor, st.State]:
        """The segment's outputs (_outputs), then its masked losses l_t."""
        out, state = self._outputs(x, reset, state, params)
        with self._autocast():
            losses = self.loss_fn(out, y)
        losses = check_losses(losses, x)
        if mask is not None:
            losses = losses * mask.to(losses.dtype)
        return losses, state

    def _outputs(self, x, reset, state, params, stream=True) -> tuple[Tensor, st.State]:
        """One module call, and one more at each step where some stream resets (6.1)."""
        td = self._tdim
        L = x.shape[td]
        rows = reset_rows(reset, td)
        bounds = [0, *(r for r in rows if r > 0), L]
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=False):
            if a in rows and state is not None:
                state = st.restart(state, self.state0, reset.select(td, a), self._batch_dims(state))
            xa = x if b - a == L else x.narrow(td, a, b - a)
            out, state = self._call(xa, state, params, stream)
            outs.append(out)
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=td)), state

    def predict(
        self, x: Tensor, state: st.State | None = None, reset: Tensor | None = None
    ) -> tuple[Tensor, st.State]:
        """The module's output on x (L, batch, ...) from `state` (None: state0, or the module's
        zeros), restarting stream j from state0 where reset[t, j], as training does (6.1). No
        gradient, nothing kept; the stream being trained is not touched. Returns (output, state).
        """
        x, _, _, reset, _ = check_chunk(x, None, None, reset, self.device, self.batch_first)
        state = self.state0 if state is None else state
        with torch.no_grad():
            out, state = self._outputs(x, reset, state, None, stream=False)
        return out, st.detach(state)

    def _autocast(self):
        if self._amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self._amp_dtype)

    def _call(
        self, x: Tensor, state, params: Params | None, stream: bool = True
    ) -> tuple[Tensor, st.State]:
        """One call of the module (with the given parameter values), its result checked; on the
        stream being trained (not predict's), the state's shapes must stay the same."""
        first = self._sig is None
        try:
            with self._autocast():
                if params is None:
                    res = self.model(x, state)
                else:
                    res = functional_call(self.model, params, (x, state))
        except TypeError as exc:
            if first:
                raise InputError(
                    "model must follow the protocol model(x, state) -> (output, new_state); "
                    f"calling it raised: {exc}"
                ) from exc
            raise
        out, new = check_result(res, x)
        if not stream:
            return out, new
        sig = st.signature(new)
        if first:
            if self.state0 is not None and st.signature(self.state0) != sig:
                raise InputError(
                    f"state0 has shapes {st.signature(self.state0)}, but the model's state has "
                    f"{sig}"
                )
            self._sig = sig
        elif sig != self._sig:
            raise InputError(f"the model returned a state of shapes {sig}, before {self._sig}")
        return out, new

    def _batch_dims(self, state) -> list[int] | None:
        d = getattr(self.model, "state_batch_dim", None)
        return None if d is None else [int(d)] * len(st.leaves(state))

    def _state_dims(self, state: st.State | None, batch: int) -> list[int] | None:
        """The stream axis of each tensor of a state (for the processes' checkpoints)."""
        if state is None:
            return None
        dims = self._batch_dims(state)
        return dims if dims is not None else [st.batch_dim(t, batch) for t in st.leaves(state)]

    # -- the update -----------------------------------------------------------------------------
    def _update(self, w: Window) -> None:
        """Backpropagate window w (5.2), (5.3) and step the optimizer: the update number n."""
        n = self.updates + 1
        if self._comm is None:
            self._check_losses(f"update {n} (after step {w.u}) was not applied", n)
        segs = [seg for seg in self._segments if seg.t1 >= w.s]
        for p in self._named.values():
            p.grad = None
        if not self._overlap:  # one graph from s to u (4.2): one backward, as the detach loop does
            total = None
            for seg in segs:
                part = self._injected(seg.graph.losses, max(w.i, seg.t0) - seg.t0)
                if part is not None:
                    total = part if total is None else total + part
            if total is not None and self.backward_fn is not None:  # the caller's backward
                self.backward_fn(total)
            elif total is not None:
                (total if self.scaler is None else self.scaler.scale(total)).backward()
            for seg in segs:
                seg.graph = None
        else:
            grads = self._window_grads(w, segs)
            for name, p in self._named.items():
                p.grad = grads.get(name)
        mean = self.reduction == "mean"
        count = self._count(w, segs) if mean else 0.0
        if self._comm is not None:  # (D.2): the gradient of the loss over all processes' streams
            count = self._sync(n, w, count)
        if mean and count > 0:  # (5.4): the derivative of the mean is that of the sum / count
            for p in self._named.values():
                if p.grad is not None:
                    p.grad.div_(count)
        self._step(n, w)

    def _injected(self, losses: Tensor, a: int) -> Tensor | None:
        """sum_{t in I} l_t over the streams, for the steps from index a of a segment on."""
        L = losses.shape[self._tdim]
        if a >= L:
            return None
        return losses.sum() if a == 0 else losses.narrow(self._tdim, a, L - a).sum()

    def _count(self, w: Window, segs: list[Segment]) -> float:
        """(5.4): the number of injected (step, stream) losses, mask weights summed."""
        total = 0.0
        for seg in segs:
            a = max(w.i, seg.t0) - seg.t0
            if a < seg.L:
                steps = seg.L - a
                total += (
                    steps * self.batch
                    if seg.mask is None
                    else float(self._cut(seg.mask, a, seg.L).sum())
                )
        return total

    def _window_grads(self, w: Window, segs: list[Segment]) -> dict[str, Tensor]:
        """Walk the window from u back to s, one segment at a time (5.2), summing (5.3)."""
        tr = self.truncation
        keep_from = tr.next_update(w.u) - tr.k2 + 1  # the next window's first step
        acc: dict[str, Tensor] = {}
        g_state: list[Tensor | None] | None = None  # dL_W / d(state entering the later segment)
        for seg in reversed(segs):
            need_state = seg.t0 > w.s
            graph = seg.graph
            outs, gouts = [], []
            part = self._injected(graph.losses, max(w.i, seg.t0) - seg.t0)
            if part is not None:
                outs.append(part if self.scaler is None else self.scaler.scale(part))
                gouts.append(torch.ones_like(outs[-1]))
            if g_state is not None:
                for o, g in zip(_diff_leaves(graph.state_out), g_state, strict=True):
                    if g is not None and o.requires_grad:
                        outs.append(o)
                        gouts.append(g)
            P = seg.params
            names = list(P)
            ins = [P[k] for k in names]
            sin = _diff_leaves(graph.state_in) if need_state and graph.state_in is not None else []
            retain = seg.t1 >= keep_from
            res = [None] * (len(ins) + len(sin))
            if outs:
                res = torch.autograd.grad(
                    outs, ins + sin, gouts, retain_graph=retain, allow_unused=True
                )
            for k, g in zip(names, res[: len(ins)], strict=True):
                if g is not None:
                    acc[k] = g if k not in acc else acc[k] + g
            g_state = list(res[len(ins) :]) if need_state else None
            if not retain:
                seg.graph = None
        return acc

    def _sync(self, n: int, w: Window, count: float) -> float:
        """One collective for the update: gradients summed, the finiteness of every process's
        losses and its step t checked, the loss totals and the mean's count summed."""
        v = self._pending_total()
        res = self._comm.reduce(
            list(self._named.values()),
            t=self.t,
            finite=math.isfinite(v),
            values=[v if math.isfinite(v) else 0.0, self._chunk_local, count],
            what=f"update {n}",
        )
        self._after_check(res, v, f"update {n} (after step {w.u}) was not applied", n)
        return res.values[2]

    def _step(self, n: int, w: Window) -> None:
        params = list(self._named.values())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_hook is not None:
            self.grad_hook(params)
        if self.clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self.last_grad_norm = float(norm)
        if self.scaler is None and not math.isfinite(self.last_grad_norm):
            for p in params:
                p.grad = None
            raise NonFiniteError(
                f"the gradient became non-finite at update {n} (window of steps {w.s}..{w.u}); "
                "the update was not applied and the parameters are untouched",
                w.u,
                n,
            )
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.skipped += int(self.scaler.get_scale() < scale)  # an inf/NaN step was skipped
        elif self.step_fn is not None:
            self.step_fn()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.u_prev, self.updates = w.u, n
        self._copies = None  # the next interval runs with copies of the new values

    def _parameters_finite(self) -> bool:
        """Whether every parameter is finite (one sync). Section 6's step that makes a parameter
        non-finite shows in the next losses; this tells that case apart, and state_dict refuses
        to save such values, so no checkpoint holds them."""
        params = list(self._named.values())
        return bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all())

    def _prune(self) -> None:
        """Drop the segments no future window can reach: memory is bounded by k2 steps."""
        oldest = self._oldest_kept()
        while self._segments and self._segments[0].t1 < oldest:
            self._segments.popleft()

    def _pending_total(self) -> float:
        if not self._pending:
            return 0.0
        total = self._pending[0] if len(self._pending) == 1 else torch.stack(self._pending).sum()
        return float(total)

    def _check_losses(self, what: str, n: int) -> None:
        """Raise NonFiniteError before any update uses a non-finite loss (one sync).

        With several processes, a collective (every process at step t, all raise together); the
        update's own check travels with its gradients (_sync).
        """
        if self._comm is None:
            if not self._pending:
                return
            v = self._pending_total()
            self._after_check(None, v, what, n)
            return
        if not self._pending:
            return
        v = self._pending_total()
        res = self._comm.reduce(
            list(self._named.values()),
            grads=False,
            t=self.t,
            finite=math.isfinite(v),
            values=[v if math.isfinite(v) else 0.0, self._chunk_local, 0.0],
            what=f"the check after step {self.t}",
        )
        self._after_check(res, v, what, n)

    def _after_check(self, res: dd.Reduced | None, v: float, what: str, n: int) -> None:
        first, self._pending, self._pending_from = self._pending_from, [], self.t + 1
        here = math.isfinite(v)
        finite = here if res is None else res.finite
        if not finite:
            value = "in another process" if here else v
            if self.updates and not self._parameters_finite():  # the last step made them so
                raise NonFiniteError(
                    f"the parameters became non-finite at update {self.updates} (after step "
                    f"{self.u_prev}): the gradient was finite, the step too large; the losses of "
                    f"steps {first}..{self.t} are {value}; no checkpoint holds these values",
                    self.u_prev,
                    self.updates,
                )
            raise NonFiniteError(
                f"the loss became non-finite ({value}) in steps {first}..{self.t}; {what}; the "
                f"parameters are untouched (updates so far: {self.updates})",
                self.t,
                n,
            )
        if res is None:
            self._chunk_total += v
        else:  # the mean over every process's streams
            self._chunk_total += res.values[0]
            self._chunk_count = res.values[1]

    # -- saving ---------------------------------------------------------------------------------
    def state_dict(self) -> dict | None:
        """Everything needed to continue exactly, as tensors and plain values (weights_only-safe).

        model, optimizer, scheduler, grad scaler: their state_dict()s; the stream: t, u_prev,
        updates, batch and the carried state; the kept steps: each segment's record (inputs,
        targets, mask, reset flags, entering state, the parameter values it ran with, shared per
        update, and RNG state); torch's generators. The kept graphs are not saved: on load every
        segment that had one is run again from its record, in the same module calls, so the
        rebuilt graph and the carried state are those of the uninterrupted run.

        Several processes: a collective call; rank 0 gets the state over all streams (each
        per-stream tensor side by side on the stream axis, plus every rank's RNG states under
        "ranks"), the others None.
        """
        if not self._parameters_finite():  # section 6: the last checkpoint holds finite values
            raise NonFiniteError(
                f"the parameters are non-finite after update {self.updates}; their state is not "
                "saved (the last checkpoint holds finite values)",
                self.t,
                self.updates,
            )
        sets: list[dict[str, Tensor]] = []
        index: dict[int, int] = {}

        def set_id(P: dict | None) -> int:
            if P is None:
                return -1
            if id(P) not in index:
                index[id(P)] = len(sets)
                sets.append({k: v.detach() for k, v in P.items()})
            return index[id(P)]

        segments = [
            {
                "t0": seg.t0,
                "L": seg.L,
                **{k: getattr(seg, k) for k in dd.PER_STREAM},
                "state_in": seg.state_in,
                "params": set_id(seg.params),
                "rng": seg.rng,
                "device_rng": seg.device_rng,
                "graph": seg.graph is not None,
                "leaf": seg.graph is not None and seg.graph.leaf,
                "link": seg.link,
            }
            for seg in self._segments
        ]
        sd = {
            **self._common_state(),
            "state": self.state,
            "copies": set_id(self._copies),
            "param_sets": sets,
            "segments": segments,
        }
        if self._comm is None:
            return sd
        return self._comm.gather_streams(
            sd, axis=1 - self._tdim, dims=self._state_dims(self._state, self.batch or 0)
        )

    def _common_state(self) -> dict:
        """What every trainer of this engine saves alike: the format, schedule and settings, the
        position in the stream, the model's, optimizer's, scheduler's and grad scaler's
        state_dicts, and torch's generators (CPU and CUDA)."""
        sched, cuda = self.scheduler, self.device.type == "cuda"
        return {
            "format": self.FORMAT,
            **self._schedule_state(),
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
            "scheduler": None if sched is None else sched.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
            "device_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
        }

    def load_state_dict(self, sd: dict | None) -> None:
        """Restore what state_dict() returned; the kept graphs are rebuilt from the records.

        Several processes: a collective call; rank 0's sd is used, each process takes its share
        of the streams (any number of processes that divides them).
        """
        if self._comm is not None:
            sd = self._comm.broadcast(sd, "the checkpoint")
            if isinstance(sd, str):  # rank 0 could not read it: the message
                raise InputError(sd)
        self._check_saved(sd)
        if self._comm is not None:
            B = sd["batch"]
            dims = None if B is None else self._state_dims(sd["state"], B)
            sd = dd.split_streams(sd, self._comm.rank, self._comm.world, 1 - self._tdim, dims)
        self._restore_schedule(sd)
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(sd["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(sd["scaler"])
        self.t, self.u_prev, self.updates = int(sd["t"]), int(sd["u_prev"]), int(sd["updates"])
        self.skipped = int(sd["skipped"])
        self.batch, self.finished = sd["batch"], bool(sd["finished"])
        dev = lambda v: None if v is None else st.tree_map(lambda t: t.to(self.device), v)  # noqa: E731
        sets = [
            {k: v.to(self.device).detach().requires_grad_() for k, v in P.items()}
            for P in sd["param_sets"]
        ]
        self._copies = sets[sd["copies"]] if sd["copies"] >= 0 else None
        self._segments.clear()
        self._pending, self._pending_from = [], self.t + 1
        prev: Segment | None = None
        for r in sd["segments"]:
            seg = Segment(
                t0=int(r["t0"]),
                L=int(r["L"]),
                **{k: dev(r[k]) for k in dd.PER_STREAM},
                state_in=dev(r["state_in"]),
                params=sets[r["params"]] if r["params"] >= 0 else None,
                rng=r["rng"],
                device_rng=r["device_rng"],
                link=bool(r["link"]),
                owned=True,
            )
            if r["graph"]:  # run it again: the same module calls on the same values
                if r["leaf"]:
                    entering = st.as_leaf(seg.state_in)
                elif seg.link and prev is not None and prev.graph is not None:
                    entering = self._link(seg.t0, prev.graph.state_out)
                else:
                    entering = st.detach(seg.state_in)
                with fork_rng(seg, self.device):
                    losses, out = self._run(seg, entering, seg.params, self.checkpoint)
                seg.graph = Graph(
                    state_in=entering, losses=losses, state_out=out, leaf=bool(r["leaf"])
                )
            self._segments.append(seg)
            prev = seg
        state = dev(sd["state"])
        if prev is not None and prev.graph is not None and prev.t1 == self.t:
            state = prev.graph.state_out  # attached, as in the uninterrupted run
        self._state = state
        self._sig = None if state is None else st.signature(state)
        torch.set_rng_state(sd["rng"])
        if sd["device_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(sd["device_rng"], self.device)

    def _check_saved(self, sd: object) -> None:
        """A state from this kind of driver with the same schedule and settings, or InputError."""
        if not isinstance(sd, dict) or sd.get("format") != self.FORMAT:
            got = sd.get("format") if isinstance(sd, dict) else type(sd).__name__
            raise InputError(
                f"state must be a {self.FORMAT!r} dict from {type(self).__name__}.state_dict(), "
                f"got {got!r}"
            )
        self._check_schedule(sd)
        for name in ("batch_first", "reduction"):
            if sd[name] != getattr(self, name):
                raise InputError(
                    f"the saved run had {name}={sd[name]!r}, this driver {getattr(self, name)!r}"
                )
        for name, obj in (("scheduler", self.scheduler), ("scaler", self.scaler)):
            if (sd[name] is None) != (obj is None):
                raise InputError(
                    f"the saved run {'had' if sd[name] is not None else 'had no'} {name}, "
                    f"this driver {'has none' if obj is None else 'has one'}"
                )

    def save(self, path: str | os.PathLike | None) -> None:
        """Write state_dict() atomically (tbptt.files.atomic_write).

        Several processes: a collective call; rank 0 writes, and every process returns once the
        file is complete (the other ranks' path is not used).
        """
        if self._comm is None:
            atomic_write(path, lambda fh: torch.save(self.state_dict(), fh))
            return

        def write() -> None:
            sd = self.state_dict()
            if self._comm.rank == 0:
                if path is None:
                    raise InputError("path must be a file name on rank 0, got None")
                atomic_write(path, lambda fh: torch.save(sd, fh))

        self._comm.together(write, "writing the checkpoint")

    def load(self, path: str | os.PathLike | None) -> None:
        """Read what save() wrote, with torch.load(weights_only=True): no arbitrary unpickling.

        Several processes: a collective call; rank 0 reads the file (the other ranks' path is not
        used) and sends it to the others; any number of processes that divides the streams.
        """
        if self._comm is None:
            self.load_state_dict(read(path))
            return
        sd = None
        if self._comm.rank == 0:
            try:
                sd = read(path)
            except InputError as exc:
                sd = str(exc)  # every rank raises it
        self.load_state_dict(sd)


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


def _diff_leaves(state: st.State) -> list[Tensor]:
    return [t for t in st.leaves(state) if st.differentiable(t)]
