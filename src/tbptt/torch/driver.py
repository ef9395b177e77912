"""Online TBPTT(k1, k2) for any PyTorch recurrent module, with the canonical rule (SEMANTICS.md 4-6).

The module follows the protocol module(x_chunk, state) -> (output_chunk, new_state); data comes as
chunks of any length. After every step u that the schedule marks (4.1), the window W = (s, u, I)
of (4.2)-(4.3) is backpropagated and the optimizer steps; the stream goes on from the carried
state with the new parameters.

    (4.1)  update times  u in {k1, 2 k1, ...}   (flush: also u = T at finish())
    (4.2)  window start  s = max(1, u - k2 + 1)
    (4.3)  injected      "new": I = (u_prev, u],  "window": I = [s, u],  "last": I = {u}
    (5.2), (5.3)         the update: the derivative of sum_{t in I} l_t through steps s..u as they
                         were computed, each with the parameter values it ran with (segments.py)

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

The flush window at the end of a stream (u = T, s = T - k2 + 1) generally starts inside a segment,
and it may reach steps whose graph an earlier update consumed. It is rebuilt from the segments'
records (inputs, entering state, parameter values, RNG state): the same computation with the same
parameter values, run again once at the end of the stream.

Under torch.distributed (distributed.py) each process runs this on its own streams; the update's
gradient is summed over the processes once, after the whole window (either path) and before
clipping and the step, so every process takes the step one process with all streams would take.
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

from ..errors import NonFiniteError
from ..schedule import Truncation, Window
from . import state as st
from .checks import amp_setup, check_arguments, check_chunk, check_hooks, check_losses, check_result
from .distributed import resolve
from .modules import l2_loss
from .resume import driver_state, load, load_driver_state, save
from .segments import Graph, Params, Segment, capture_rng, fork_rng, reset_rows

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Tensor], Tensor]


def _non_finite(message: str, step: int, update: int) -> NonFiniteError:
    return NonFiniteError(message, step, update)


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
            on the CPU; or a dtype). float16 brings a GradScaler.
        checkpoint: keep each segment's graph as a torch.utils.checkpoint (activations recomputed
            during backward); the same numbers for less memory.
        state0: the state a stream starts and restarts (after a reset) from; None: the module's
            zeros. A constant: no gradient reaches it.
        process_group: None: when torch.distributed is initialized (or the model is wrapped in
            DistributedDataParallel) this process trains its own streams and each update sums
            the gradient over the group's processes (distributed.py); False: never; or a
            torch.distributed.ProcessGroup.
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
        backward: Callable[[Tensor], object] | None = None,
        step: Callable[[], object] | None = None,
        grad_hook: Callable[[list[Tensor]], object] | None = None,
    ) -> None:
        model, self._comm = resolve(model, process_group)  # DDP: its .module and its group
        check_arguments(
            model, truncation, optimizer, loss_fn, clip, scheduler, batch_first, checkpoint
        )
        self._named: Params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self._named:
            raise ValueError("model has no parameters that require grad: nothing to train")
        self.model, self.truncation, self.optimizer = model, truncation, optimizer
        self.loss_fn, self.clip, self.scheduler = loss_fn, clip, scheduler
        self.batch_first, self.checkpoint = batch_first, checkpoint
        self._tdim = 1 if batch_first else 0  # the time axis of x, y, losses, masks, resets
        self.device = next(iter(self._named.values())).device
        self._amp_dtype, self.scaler = amp_setup(amp, self.device)
        check_hooks(backward, step, grad_hook, truncation, self.scaler is not None)
        self.backward_fn, self.step_fn, self.grad_hook = backward, step, grad_hook
        if state0 is not None:
            st.check(state0, "state0")
            state0 = st.tree_map(lambda s: s.detach().to(self.device), state0)
        self.state0 = state0
        self._overlap = truncation.k2 > truncation.k1  # kept graphs outlive optimizer steps
        self.t = 0  # steps computed so far: the position in the stream
        self.u_prev = 0  # the last update time: the schedule's phase
        self.updates = 0
        self.batch: int | None = None  # streams, fixed by the first chunk
        self.finished = False
        self.last_grad_norm: float | None = None
        self._state: st.State | None = state0  # the carried state, attached to the last graph
        self._segments: deque[Segment] = deque()
        self._copies: Params | None = None  # parameter copies of the current interval (overlap)
        self._sig: object = None  # the state's structure and shapes, fixed by the first call
        self._pending: list[Tensor] = []  # loss sums not yet checked for finiteness
        self._pending_from = 1
        self._chunk_total = 0.0
        if self._comm is not None:  # the same settings everywhere; rank 0's parameters
            self._comm.setup(self)

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
        j starts step t from state0 (6.1). All (batch, L, ...) when batch_first. Returns the
        chunk's mean loss per (unmasked) step and stream, as computed during the forward pass.
        """
        if self.finished:
            raise RuntimeError("the stream was finished; create a new TBPTT to train on another")
        x, y, mask, reset, batch = check_chunk(x, y, mask, reset, self.device, self.batch_first)
        if self.batch is None:
            self.batch = batch
        elif batch != self.batch:
            raise ValueError(
                f"x has {batch} streams (batch size), but this stream was started with "
                f"{self.batch}; the streams of a batch go on together, so the size cannot change"
            )
        T = x.shape[self._tdim]
        count = float(T * self.batch) if mask is None else float(mask.sum())
        self._chunk_total = 0.0
        start = 0
        while start < T:  # split at update times and window starts; chunk ends are free
            stop = min(T, start + self._next_boundary(self.t) - self.t)
            cut = lambda a: None if a is None else a.narrow(self._tdim, start, stop - start)  # noqa: E731, B023
            self._forward(cut(x), cut(y), cut(mask), cut(reset))
            if self.truncation.is_update(self.t):
                self._update(self.truncation.window(self.t, self.u_prev))
            self._prune()
            start = stop
        self._check_losses(
            f"no update used it yet (next: update {self.updates + 1})", self.updates + 1
        )
        return self._chunk_total / max(count, 1.0)

    def finish(self) -> None:
        """End of stream: the flush update (when asked for and k1 does not divide the length)."""
        if self.finished:
            return
        w = self.truncation.flush_window(self.t)
        if w is not None and w.u > self.u_prev:
            self._update(w, final=True)
        self._segments.clear()
        self._copies = None
        self.finished = True

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
            s = self.truncation.window(self.truncation.next_update(self.t), self.u_prev).s
            prev = self._segments[-1] if self._segments else None
            params, grad, leaf = None, t1 >= s, False
            link = grad and t0 > s and prev is not None and prev.graph is not None
            state_in = state if link else st.detach(state)
        rng, device_rng = capture_rng(self.device)
        seg = Segment(
            t0, L, x, y, mask, reset, st.detach(state), params, rng, device_rng, None, link
        )
        with nullcontext() if grad else torch.no_grad():
            losses, state_out = self._run(seg, state_in, 0, params, self.checkpoint and grad)
        if grad:
            seg.graph = Graph(state_in, losses, state_out, leaf)
        self._segments.append(seg)
        self._state = state_out
        self.t = t1
        self._pending.append(losses.detach().sum(dtype=torch.float64))

    def _run(
        self, seg: Segment, state: st.State | None, a: int, params: Params | None, ckpt: bool
    ) -> tuple[Tensor, st.State]:
        """Steps a..L-1 of the segment from `state`: the masked losses and the final state."""
        narrow = lambda v: v if v is None or a == 0 else v.narrow(self._tdim, a, seg.L - a)  # noqa: E731
        args = (narrow(seg.x), narrow(seg.y), narrow(seg.mask), narrow(seg.reset), state, params)
        if ckpt:
            return torch_checkpoint(self._steps, *args, use_reentrant=False)
        return self._steps(*args)

    def _steps(self, x, y, mask, reset, state, params) -> tuple[Tensor, st.State]:
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
            out, state = self._call(xa, state, params)
            outs.append(out)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=td)
        with self._autocast():
            losses = self.loss_fn(out, y)
        losses = check_losses(losses, x)
        if mask is not None:
            losses = losses * mask.to(losses.dtype)
        return losses, state

    def _autocast(self):
        if self._amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self._amp_dtype)

    def _call(self, x: Tensor, state, params: Params | None) -> tuple[Tensor, st.State]:
        """One call of the module (with the given parameter values), its result checked."""
        first = self._sig is None
        try:
            with self._autocast():
                if params is None:
                    res = self.model(x, state)
                else:
                    res = functional_call(self.model, params, (x, state))
        except TypeError as exc:
            if first:
                raise TypeError(
                    "model must follow the protocol model(x, state) -> (output, new_state); "
                    f"calling it raised: {exc}"
                ) from exc
            raise
        out, new = check_result(res, x)
        sig = st.signature(new)
        if first:
            if self.state0 is not None and st.signature(self.state0) != sig:
                raise ValueError(
                    f"state0 has shapes {st.signature(self.state0)}, but the model's state has {sig}"
                )
            self._sig = sig
        elif sig != self._sig:
            raise ValueError(f"the model returned a state of shapes {sig}, before {self._sig}")
        return out, new

    def _batch_dims(self, state) -> list[int] | None:
        d = getattr(self.model, "state_batch_dim", None)
        return None if d is None else [int(d)] * len(st.leaves(state))

    # -- the update -----------------------------------------------------------------------------
    def _update(self, w: Window, final: bool = False) -> None:
        """Backpropagate window w (5.2), (5.3) and step the optimizer: the update number n."""
        n = self.updates + 1
        self._check_losses(f"update {n} (after step {w.u}) was not applied", n, update=True)
        segs = [seg for seg in self._segments if seg.t1 >= w.s]
        for p in self._named.values():
            p.grad = None
        chained = (
            not self._overlap
            and all(seg.graph is not None for seg in segs)
            and segs[0].t0 == w.s
            and all(seg.link for seg in segs[1:])
        )
        if chained:  # one graph from s to u: one backward, as the plain detach loop does
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
            grads = self._window_grads(w, segs, final)
            for name, p in self._named.items():
                p.grad = grads.get(name)
        if self._comm is not None:  # (D.2): the gradient of the loss over all processes' streams
            self._comm.sum_grads(list(self._named.values()), n)
        self._step(n, w)

    def _injected(self, losses: Tensor, a: int) -> Tensor | None:
        """sum_{t in I} l_t over the streams, for the steps from index a of a segment on."""
        L = losses.shape[self._tdim]
        if a >= L:
            return None
        return losses.sum() if a == 0 else losses.narrow(self._tdim, a, L - a).sum()

    def _window_grads(self, w: Window, segs: list[Segment], final: bool) -> dict[str, Tensor]:
        """Walk the window from u back to s, one segment at a time (5.2), summing (5.3)."""
        tr = self.truncation
        keep_from = math.inf if final else tr.next_update(w.u) - tr.k2 + 1
        acc: dict[str, Tensor] = {}
        g_state: list[Tensor | None] | None = None  # dL_W / d(state entering the later segment)
        for seg in reversed(segs):
            start = max(seg.t0, w.s)
            need_state = start > w.s
            graph = seg.graph
            if graph is None or not graph.leaf or start > seg.t0:
                graph = self._rebuild(seg, start, need_state)
            outs, gouts = [], []
            part = self._injected(graph.losses, max(w.i, start) - start)
            if part is not None:
                outs.append(part if self.scaler is None else self.scaler.scale(part))
                gouts.append(torch.ones_like(outs[-1]))
            if g_state is not None:
                for o, g in zip(_diff_leaves(graph.state_out), g_state, strict=True):
                    if g is not None and o.requires_grad:
                        outs.append(o)
                        gouts.append(g)
            P = seg.params if seg.params is not None else self._named
            names = list(P)
            ins = [P[k] for k in names]
            sin = _diff_leaves(graph.state_in) if need_state and graph.state_in is not None else []
            retain = graph is seg.graph and seg.t1 >= keep_from
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

    def _rebuild(self, seg: Segment, start: int, need_state: bool) -> Graph:
        """Run a segment again from its record (same inputs, state, parameter values and RNG)."""
        a = start - seg.t0
        with fork_rng(seg, self.device):
            state = seg.state_in
            if a > 0:  # the window starts inside this segment: its first a steps carry no gradient
                with torch.no_grad():
                    _, state = self._run(_head(seg, a, self._tdim), state, 0, seg.params, False)
            state = st.as_leaf(state) if need_state else st.detach(state)
            losses, state_out = self._run(seg, state, a, seg.params, False)
        return Graph(state, losses, state_out, True)

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
            raise _non_finite(
                f"the gradient became non-finite at update {n} (window of steps {w.s}..{w.u}); "
                "the update was not applied and the parameters are untouched",
                w.u,
                n,
            )
        self._snapshot(w.u)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.step_fn is not None:
            self.step_fn()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.u_prev, self.updates = w.u, n
        self._copies = None  # the next interval runs with copies of the new values

    def _snapshot(self, u: int) -> None:
        """Before an in-place step: give the records a later flush window may rerun their values."""
        if not self.truncation.flush or self._overlap:
            return
        snap = None
        for seg in self._segments:
            if seg.params is None and seg.t1 >= u - self.truncation.k2 + 2:
                if snap is None:
                    snap = {k: p.detach().clone().requires_grad_() for k, p in self._named.items()}
                seg.params = snap

    def _prune(self) -> None:
        """Drop the segments no future window can reach: memory is bounded by k2 steps."""
        tr = self.truncation
        oldest = tr.next_update(self.t) - tr.k2 + 1  # the next regular window
        if tr.flush:  # a flush at T >= t (T > t right after an update) starts at T - k2 + 1
            oldest = min(oldest, self.t - tr.k2 + 1 + (self.u_prev == self.t))
        while self._segments and self._segments[0].t1 < oldest:
            self._segments.popleft()

    def _check_losses(self, what: str, n: int, update: bool = False) -> None:
        """Raise NonFiniteError before any update uses a non-finite loss (one sync).

        With several processes, also before every update: all at step t, all raise together.
        """
        if not self._pending and not (update and self._comm is not None):
            return
        v = 0.0
        if self._pending:
            total = (
                self._pending[0] if len(self._pending) == 1 else torch.stack(self._pending).sum()
            )
            v = float(total)
        first, self._pending, self._pending_from = self._pending_from, [], self.t + 1
        here = finite = math.isfinite(v)
        if self._comm is not None:  # a collective: every process at step t, all raise together
            finite = self._comm.check_step(self.t, here, n)
        if not finite:
            value = "in another process" if here else v
            raise _non_finite(
                f"the loss became non-finite ({value}) in steps {first}..{self.t}; {what}; the "
                f"parameters are untouched (updates so far: {self.updates})",
                self.t,
                n,
            )
        self._chunk_total += v

    # -- saving ---------------------------------------------------------------------------------
    def state_dict(self) -> dict | None:
        """Everything needed to continue exactly, as tensors and plain values (weights_only-safe).

        Several processes: a collective call; rank 0 gets the state over all streams, the others
        None.
        """
        if self._comm is not None:
            return self._comm.state_dict(self)
        return driver_state(self)

    def load_state_dict(self, sd: dict | None) -> None:
        """Restore what state_dict() returned (model, optimizer, scheduler, stream, kept steps).

        Several processes: a collective call; rank 0's sd is used, each process takes its streams.
        """
        if self._comm is not None:
            sd = self._comm.local_state(self, sd)
        load_driver_state(self, sd)

    def save(self, path: str | os.PathLike | None) -> None:
        """Write state_dict() atomically (a temporary file in the same folder, then a rename).

        Several processes: a collective call; rank 0 writes, and every process returns once the
        file is complete (the other ranks' path is not used).
        """
        if self._comm is not None:
            self._comm.save(self, path)
        else:
            save(self.state_dict(), path)

    def load(self, path: str | os.PathLike | None) -> None:
        """Read what save() wrote, with torch.load(weights_only=True): no arbitrary unpickling.

        Several processes: a collective call; rank 0 reads the file (the other ranks' path is not
        used) and sends it to the others; any number of processes that divides the streams.
        """
        if self._comm is not None:
            self.load_state_dict(self._comm.load(path))
        else:
            self.load_state_dict(load(path))


def _diff_leaves(state: st.State) -> list[Tensor]:
    return [t for t in st.leaves(state) if st.differentiable(t)]


def _head(seg: Segment, a: int, tdim: int) -> Segment:
    """The first a steps of a segment, as a segment."""
    cut = lambda v: None if v is None else v.narrow(tdim, 0, a)  # noqa: E731
    return Segment(
        seg.t0, a, cut(seg.x), cut(seg.y), cut(seg.mask), cut(seg.reset), seg.state_in,
        seg.params, seg.rng, seg.device_rng, None, False,
    )  # fmt: skip
