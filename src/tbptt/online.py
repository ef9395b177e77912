"""Online TBPTT(k1, k2) on a stream, with the canonical rule of SEMANTICS.md 5.

The forward pass runs on chunks of any length from the carried state h. After every step u that the
schedule marks (4.1), the window W = (s, u, I) of (4.2)-(4.3) is backpropagated and the optimizer
updates the parameters; the next step runs with the new parameters from the same carried state.

Canonical rule (no recomputation): the update is the exact derivative of the injected losses through
the steps as they were computed, each with the parameter values in force when it ran. The steps
since the last update form a segment that holds those values; the backward recursion crosses
segments using each step's own A:

    (5.2)  delta_t = [t in I] C_t^T e_t + A_{t+1}^T (f'(a_{t+1}) * delta_{t+1}),   s <= t <= u
    (5.3)  g_A = sum_{t=s..u} r_t h_{t-1}^T   (r_t = delta_t * f'(a_t)), likewise B, b;
           g_C = sum_{t in I} e_t h_t^T, likewise c

where A_t, C_t are the values step t ran with and e_t was computed with C_t. Only the last k2
steps are kept, so memory does not grow with the stream. A reset restarts a stream from h0, a
constant (section 6): the gradient stops there and the schedule is unchanged.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from dataclasses import dataclass

import numpy as np

from .checks import check_batch, check_h0
from .elman import ElmanRNN, backprop, forward, parameter_gradients, project
from .functions import LOSSES, loss_and_error
from .optim import SGD, Adam, clip_grad_norm, grad_norm
from .schedule import Truncation

Array = np.ndarray


class NonFiniteError(FloatingPointError):
    """A NaN or inf appeared during training; the parameters keep their last finite values."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class Segment:
    """Steps t0..t0+L-1 computed with one set of parameter values (those in force then)."""

    t0: int  # first step, 1-based
    params: dict[str, Array]  # the values these steps ran with (never modified in place)
    x: Array  # (L, batch, m)
    h_prev: Array  # (L, batch, n)
    h: Array  # (L, batch, n)
    fprime: Array  # (L, batch, n)
    e: Array  # (L, batch, p) dl_t/dz_t, computed with this segment's C
    reset: Array | None  # (L, batch) bool

    @property
    def t1(self) -> int:
        """Last step of the segment."""
        return self.t0 + len(self.x) - 1

    def tail(self, start: int) -> Segment:
        """The part of the segment from step `start` on."""
        k = start - self.t0
        cut = lambda a: None if a is None else a[k:]  # noqa: E731
        return Segment(
            start, self.params, self.x[k:], self.h_prev[k:], self.h[k:], self.fprime[k:],
            self.e[k:], cut(self.reset),
        )  # fmt: skip


class TBPTT:
    """Train an ElmanRNN online with TBPTT(k1, k2) on a stream of chunks.

    Args:
        model: the initial ElmanRNN; `self.model` holds the current one.
        truncation: the schedule (k1, k2, inject, flush).
        optimizer: tbptt.SGD or tbptt.Adam.
        loss: "l2" or "cross_entropy".
        clip: max global gradient norm per update (None: no clipping).
        h0: the state a stream starts (and restarts) from: (n,) or (batch, n); None means zeros.

    Feed chunks with `feed(x, y, mask=None, reset=None)`; chunk lengths are free and do not change
    the update times. Call `finish()` at the end of the stream for the flush update.
    """

    def __init__(
        self,
        model: ElmanRNN,
        truncation: Truncation,
        optimizer: SGD | Adam,
        *,
        loss: str = "l2",
        clip: float | None = None,
        h0: Array | None = None,
    ) -> None:
        if not isinstance(model, ElmanRNN):
            raise TypeError(f"model must be a tbptt.ElmanRNN, got {type(model).__name__}")
        if not isinstance(truncation, Truncation):
            raise TypeError(
                f"truncation must be a tbptt.Truncation, got {type(truncation).__name__}"
            )
        if not isinstance(optimizer, SGD | Adam):
            raise TypeError(
                f"optimizer must be tbptt.SGD or tbptt.Adam, got {type(optimizer).__name__}"
            )
        if loss not in LOSSES:
            raise ValueError(f"loss must be 'l2' or 'cross_entropy', got {loss!r}")
        if clip is not None and (
            isinstance(clip, bool)
            or not isinstance(clip, int | float | np.integer | np.floating)
            or not 0 < clip < np.inf
        ):
            raise ValueError(f"clip must be a positive finite number or None, got {clip!r}")
        self.model = model
        self.truncation = truncation
        self.optimizer = optimizer
        self.loss = loss
        self.clip = clip
        self._h0_arg = h0
        self.opt_state = optimizer.init(model.params)
        self.h0: Array | None = None  # (batch, n), fixed by the first chunk
        self.h: Array | None = None  # (batch, n) the carried state h_t
        self.t = 0  # steps computed so far: the position in the stream
        self.u_prev = 0  # the last update time (the schedule's phase)
        self.updates = 0
        self.segments: deque[Segment] = deque()
        self.finished = False

    # -- the stream -----------------------------------------------------------------------------
    @property
    def batch(self) -> int | None:
        return None if self.h is None else self.h.shape[0]

    def feed(
        self, x: Array, y: Array, mask: Array | None = None, reset: Array | None = None
    ) -> float:
        """Run the next chunk (T_c, [batch,] m), updating wherever the schedule says.

        Returns the chunk's mean loss per (unmasked) step and stream, computed during the forward
        pass with the parameters in force at each step.
        """
        if self.finished:
            raise RuntimeError("the stream was finished; create a new TBPTT to train on another")
        data = check_batch(
            x, y, m=self.model.m, p=self.model.p, dtype=self.model.dtype, loss=self.loss,
            g=self.model.g, mask=mask, reset=reset,
        )  # fmt: skip
        T, batch, _ = data.x.shape
        if self.h is None:
            self.h0 = np.array(check_h0(self._h0_arg, self.model.n, batch, self.model.dtype))
            self.h = self.h0.copy()
        elif batch != self.batch:
            raise ValueError(
                f"x has {batch} streams, but this stream was started with {self.batch}"
            )
        total, count = 0.0, 0.0
        start = 0
        while start < T:  # split the chunk at update times; chunk bounds are not update bounds
            stop = min(T, start + self.truncation.next_update(self.t) - self.t)
            sl = slice(start, stop)
            total += self._forward(
                data.x[sl], data.y[sl],
                None if data.mask is None else data.mask[sl],
                None if data.reset is None else data.reset[sl],
            )  # fmt: skip
            count += (stop - start) * batch if data.mask is None else float(data.mask[sl].sum())
            if self.truncation.is_update(self.t):
                self._update(self.truncation.window(self.t, self.u_prev))
            start = stop
        return total / max(count, 1.0)

    def finish(self) -> None:
        """End of stream: the flush update (when asked for and k1 does not divide the length)."""
        w = self.truncation.flush_window(self.t)
        if w is not None and w.u > self.u_prev:
            self._update(w)
        self.finished = True

    def _forward(self, x: Array, y: Array, mask: Array | None, reset: Array | None) -> float:
        """Run steps t+1..t+len(x) with the current parameters; keep them as one segment."""
        model = self.model
        x = np.array(x)  # our own copy: the caller may refill its buffer while we keep the graph
        traj = forward(model, x, self.h, reset, self.h0)
        l, e = loss_and_error(model.g, self.loss, traj.z, y, mask)
        if not (np.isfinite(traj.h[-1]).all() and np.isfinite(l).all()):
            bad = ~(np.isfinite(traj.h).all(axis=(1, 2)) & np.isfinite(l).all(axis=1))
            step = self.t + 1 + int(np.argmax(bad))
            raise NonFiniteError(
                f"the state or loss became non-finite at step {step} (update {self.updates + 1}); "
                f"parameters kept at their last finite values",
                step,
            )
        self.segments.append(
            Segment(self.t + 1, model.params, x, traj.h_prev, traj.h, traj.fprime, e, reset)
        )
        self.h = traj.h[-1]
        self.t += len(x)
        # keep only what a window can still reach: the update at u = t itself (regular or flush)
        # starts at s = t - k2 + 1 (4.2), later ones later
        oldest = self.t + 1 - self.truncation.keep
        while self.segments and self.segments[0].t1 < oldest:
            self.segments.popleft()
        return float(l.sum())

    @property
    def phase(self) -> int:
        """Steps computed since the last update (0 right after an update)."""
        return self.t - self.u_prev

    def _update(self, w) -> None:
        """Backpropagate window w through the kept segments (5.2), (5.3), then step the optimizer."""
        names = list(self.model.params)
        grads: dict[str, Array] | None = None
        back = None  # A_{t+1}^T r_{t+1} flowing into the later end of each segment
        for seg in reversed(self.segments):
            if seg.t0 > w.u or seg.t1 < w.s:
                continue
            part = seg.tail(max(seg.t0, w.s))  # steps max(t0, s)..t1 of this segment
            first_loss = max(w.i, part.t0) - part.t0  # index of the first injected step
            e_inj = part.e[first_loss:]  # (K, batch, p)
            dh = project(e_inj, part.params["C"])  # C_t^T e_t for t in I
            R, back = backprop(part.fprime, part.params["A"], dh, back, part.reset)
            g = parameter_gradients(
                R, part.h_prev, part.x, e_inj, part.h[first_loss:], "b" in names, "c" in names
            )
            if grads is None:
                grads = g  # the newest segment's own arrays: nothing else holds them
            else:
                for k in names:
                    grads[k] += g[k]
        if grads is None:  # no kept step in the window (a k2 raised mid-stream, say)
            grads = {k: np.zeros_like(v) for k, v in self.model.params.items()}
        if not np.isfinite(grad_norm(grads)):  # one pass; look for the culprit only if needed
            for k, g in grads.items():
                if not np.isfinite(g).all():
                    raise NonFiniteError(
                        f"the gradient of {k} became non-finite at the update after step {w.u} "
                        f"(update {self.updates + 1}); parameters kept at their last finite values",
                        w.u,
                    )
        if self.clip is not None:
            grads, _ = clip_grad_norm(grads, self.clip)
        params, opt_state = self.optimizer.step(self.model.params, grads, self.opt_state)
        if not all(np.isfinite(v).all() for v in params.values()):
            raise NonFiniteError(
                f"the parameters became non-finite at the update after step {w.u} "
                f"(update {self.updates + 1}); kept at their last finite values",
                w.u,
            )
        self.u_prev = w.u
        self.updates += 1
        self.model = self.model._updated(params)  # checked finite just above
        self.opt_state = opt_state

    # -- inspection and saving ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Array]:
        """Everything needed to continue exactly: parameters, optimizer, carried state, phase and
        the kept segments, as a flat dict of arrays (np.savez-ready, no pickling)."""
        out: dict[str, Array] = {f"model.{k}": v for k, v in self.model.params.items()}
        out.update({f"opt.{k}": np.asarray(v) for k, v in self.opt_state.items()})
        out["t"] = np.asarray(self.t)
        out["u_prev"] = np.asarray(self.u_prev)
        out["updates"] = np.asarray(self.updates)
        if self.h is not None:
            out["h"], out["h0"] = self.h, self.h0
        for j, seg in enumerate(self.segments):
            out[f"seg{j}.t0"] = np.asarray(seg.t0)
            for k, v in seg.params.items():
                out[f"seg{j}.param.{k}"] = v
            for k in ("x", "h_prev", "h", "fprime", "e", "reset"):
                if getattr(seg, k) is not None:
                    out[f"seg{j}.{k}"] = getattr(seg, k)
        return out

    def load_state_dict(self, state: dict[str, Array]) -> None:
        """Restore what state_dict saved (the model's f, g, schedule and optimizer are this object's)."""
        params = {k[6:]: np.array(v) for k, v in state.items() if k.startswith("model.")}
        if set(params) != set(self.model.params):
            raise ValueError(
                f"state holds parameters {sorted(params)}, the model has {sorted(self.model.params)}"
            )
        self.model = self.model.replace(**params)
        self.opt_state = {k[4:]: np.array(v) for k, v in state.items() if k.startswith("opt.")}
        self.t, self.u_prev = int(state["t"]), int(state["u_prev"])
        self.updates = int(state["updates"])
        self.h = np.array(state["h"]) if "h" in state else None
        self.h0 = np.array(state["h0"]) if "h0" in state else None
        self.segments = deque()
        j = 0
        while f"seg{j}.t0" in state:
            get = lambda k: np.array(state[f"seg{j}.{k}"]) if f"seg{j}.{k}" in state else None  # noqa: E731, B023
            seg_params = {k: get(f"param.{k}") for k in params}
            self.segments.append(
                Segment(int(state[f"seg{j}.t0"]), seg_params, get("x"), get("h_prev"), get("h"),
                        get("fprime"), get("e"), get("reset"))
            )  # fmt: skip
            j += 1

    def save(self, path: str | os.PathLike) -> None:
        """Write state_dict() to an .npz file atomically (temp file in the same folder, then rename)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **self.state_dict())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load(self, path: str | os.PathLike) -> None:
        """Load what save() wrote (no pickled objects are read)."""
        with np.load(os.fspath(path), allow_pickle=False) as data:
            self.load_state_dict({k: data[k] for k in data.files})
