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

where A_t, C_t are the values step t ran with and e_t was computed with C_t. The recursion (5.2)
runs segment by segment; the kept x_t, h_t and e_t lie in one History, contiguous across segments,
so each sum (5.3) is one matrix product over the window's stacked steps. Only the steps the next
window reaches are kept (at most k2), so memory does not grow with the stream; the flush window
(4.4) starts where the next regular window would, so it needs nothing more. A reset restarts a
stream from h0, a constant (section 6): the gradient stops there and the schedule is unchanged.

    (5.4)  reduction="mean": the update (5.3) divided by N, the number of injected, unmasked
           (step, stream) losses (the mask weights summed over t in I and the streams)

The model is trained as torch.optim trains a module: after each update its attributes A, B, C,
b, c name the new values. The arrays themselves are never modified, so the segments of an
overlapping window keep the values they ran with at no cost.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass

import numpy as np

from .checks import check_h0
from .elman import ElmanRNN, backprop, parameter_gradients, project
from .errors import InputError
from .inputs import OneHot
from .optim import SGD, Adam
from .schedule import Truncation
from .updates import (
    REDUCTIONS,  # noqa: F401  (online.REDUCTIONS, as before)
    check_chunk,
    check_model,
    check_saved_params,
    check_saved_setting,
    check_settings,
    forward_checked,
    load_npz,
    optimizer_update,
    save_npz,
)

FORMAT = "tbptt.TBPTT/2"

Array = np.ndarray


@dataclass
class Segment:
    """Steps t0..t0+L-1, computed with one set of parameter values (those in force then).

    Their x_t, h_t and e_t live in the driver's History; what differs from segment to segment
    stays here: the parameters and f'(a_t), which the backward recursion (5.2) reads per segment.
    """

    t0: int  # first step, 1-based
    params: dict[str, Array]  # the values these steps ran with (never modified in place)
    fprime: Array  # (L, batch, n) f'(a_t)
    reset: Array | None  # (L, batch) bool: the step restarted from h0
    weight: Array | None  # (L,) the mask weights summed over the streams; None: no mask

    @property
    def t1(self) -> int:
        """Last step of the segment."""
        return self.t0 + len(self.fprime) - 1


class History:
    """x_t, h_t and e_t of the kept steps, contiguous in time across segments.

    A window's parameter gradients (5.3) are then one product each over its stacked steps, however
    many segments (parameter values) it spans. Row j of x and e holds step `first` + j; row j of
    h holds h_{first + j - 1}, so steps s..u read h_{t-1} as h[s - first : u - first + 1] and h_t
    one row later. The forward pass writes its states straight into h. Steps no window can reach
    are dropped by moving the kept rows to the front when room is needed (amortized: the buffers
    hold at least twice what is kept).
    """

    def __init__(self, h: Array, m: int, p: int, onehot: bool = False) -> None:
        self.batch, self.n = h.shape
        self.m, self.p, self.dtype = m, p, h.dtype
        self.onehot = onehot  # x holds the ids (cap, batch) of one-hot inputs
        self.first, self.rows = 1, 0  # step held by row 0, number of steps held
        self._alloc(0)
        self.h[0] = h

    def _alloc(self, cap: int) -> None:
        b, dt = self.batch, self.dtype
        self.cap = cap
        self.x = np.empty((cap, b), np.intp) if self.onehot else np.empty((cap, b, self.m), dt)
        self.h = np.empty((cap + 1, b, self.n), dt)  # (cap + 1, batch, n)
        self.e = np.empty((cap, b, self.p), dt)  # (cap, batch, p)

    def reserve(self, L: int, keep_from: int) -> int:
        """Room for L more steps, dropping the steps before keep_from; returns the next free row."""
        if self.rows + L <= self.cap:
            return self.rows
        drop = min(max(0, keep_from - self.first), self.rows)
        kept = self.rows - drop
        old = (self.x, self.h, self.e)
        if kept + L > self.cap // 2:  # grow: keep the buffers at least twice what they hold
            self._alloc(2 * (kept + L))
        self.x[:kept] = old[0][drop : self.rows]  # numpy copies overlapping rows safely
        self.h[: kept + 1] = old[1][drop : self.rows + 1]
        self.e[:kept] = old[2][drop : self.rows]
        self.first += drop
        self.rows = kept
        return kept

    def inputs(self, a: int, c: int) -> Array | OneHot:
        """x_t of rows a..c-1: (c - a, batch, m), or a OneHot of their ids."""
        return OneHot._of(self.x[a:c], self.m) if self.onehot else self.x[a:c]


class TBPTT:
    """Train an ElmanRNN online with TBPTT(k1, k2) on a stream of chunks.

    Args:
        model: the ElmanRNN to train. It is trained in place, as torch.optim trains a module:
            after each update (and after load) `model.A` (and B, C, b, c) is the new value, and
            `self.model` is `model`. The new values are new arrays: an array read from the model
            earlier (`A = model.A`) keeps the value it had.
        truncation: the schedule (k1, k2, inject, flush).
        optimizer: tbptt.SGD or tbptt.Adam.
        loss: "l2" or "cross_entropy".
        clip: max global gradient norm per update (None: no clipping).
        h0: the state a stream starts (and restarts) from: (n,) or (batch, n); None means zeros.
        reduction: "sum" (each update differentiates the sum of its injected losses, the
            contract's L) or "mean" (that sum divided by the number of its injected, unmasked
            (step, stream) losses, mask weights summed), (5.4).

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
        reduction: str = "sum",
    ) -> None:
        check_model(model)
        if not isinstance(truncation, Truncation):
            raise InputError(
                f"truncation must be a tbptt.Truncation, got {type(truncation).__name__}"
            )
        check_settings(optimizer, loss, clip, reduction)  # shared with RTRL, UORO, ARTBP
        self.model = model
        self.reduction = reduction
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
        self.history: History | None = None  # x_t, h_t, e_t of the kept steps
        self.finished = False

    # -- the stream -----------------------------------------------------------------------------
    @property
    def batch(self) -> int | None:
        return None if self.h is None else self.h.shape[0]

    def feed(
        self, x: Array, y: Array, mask: Array | None = None, reset: Array | None = None
    ) -> float:
        """Run the next chunk x (T_c, [batch,] m) or tbptt.OneHot, updating where the schedule says.

        Returns the chunk's mean loss sum(w l) / sum(w) over its steps and streams (w the mask
        weights, 1 without a mask; 0 when every weight is 0), computed during the forward pass
        with the parameters in force at each step.
        """
        if self.finished:
            raise RuntimeError("the stream was finished; create a new TBPTT to train on another")
        data = check_chunk(self.model, self.loss, x, y, mask, reset)
        T, batch, _ = data.x.shape
        if self.h is None:
            self.h0 = np.array(check_h0(self._h0_arg, self.model.n, batch, self.model.dtype))
            self.h = self.h0.copy()
            self.history = History(self.h, self.model.m, self.model.p)
        elif batch != self.batch:
            raise InputError(
                f"x has {batch} streams, but this stream was started with {self.batch}"
            )
        total, count = 0.0, 0.0
        start = 0
        while start < T:  # split the chunk at update times; chunk bounds are not update bounds
            stop = min(T, start + self.truncation.next_update(self.t) - self.t)
            sl = slice(start, stop)
            total += self._forward(
                data.x[sl],
                data.y[sl],
                None if data.mask is None else data.mask[sl],
                None if data.reset is None else data.reset[sl],
            )
            count += (stop - start) * batch if data.mask is None else float(data.mask[sl].sum())
            if self.truncation.is_update(self.t):
                self._update(self.truncation.window(self.t, self.u_prev))
            start = stop
        return total / count if count > 0 else 0.0

    def finish(self) -> None:
        """End of stream: the flush update (when asked for and k1 does not divide the length)."""
        w = self.truncation.flush_window(self.t)
        if w is not None and w.u > self.u_prev:
            self._update(w)
        self.finished = True

    def _forward(self, x: Array, y: Array, mask: Array | None, reset: Array | None) -> float:
        """Run steps t+1..t+len(x) with the current parameters; keep them as one segment."""
        model, hist, L = self.model, self.history, len(x)
        if isinstance(x, OneHot) != hist.onehot:
            hist = self._switch_inputs(isinstance(x, OneHot))
        row = hist.reserve(L, self.segments[0].t0 if self.segments else self.t + 1)
        # our own copy of x (L, batch, m) or its ids (L, batch): the caller may refill its buffer
        hist.x[row : row + L] = x.ids if hist.onehot else x
        xs = hist.inputs(row, row + L)
        hs = hist.h[row : row + L + 1]  # the forward pass writes its states here
        args = (xs, y, self.h, self.h0, self.loss, mask, reset, self.t, self.updates)
        traj, l, e = forward_checked(model, *args, hs=hs)
        hist.e[row : row + L] = e
        hist.rows = row + L
        weight = None if mask is None else mask.sum(axis=1)  # (L,)
        self.segments.append(Segment(self.t + 1, model.params, traj.fprime, reset, weight))
        self.h = traj.h[-1].copy()  # the carried state; the history's rows may move
        self.t += L
        return float(l.sum())

    def _prune(self) -> None:
        """Keep only what a window can still reach: the next one, regular (4.2) or flush (4.4),
        starts at s = next_update - k2 + 1, later ones later."""
        oldest = self.truncation.next_update(self.t) - self.truncation.k2 + 1
        while self.segments and self.segments[0].t1 < oldest:
            self.segments.popleft()

    def _switch_inputs(self, onehot: bool) -> History:
        """A History for the other kind of x (arrays or OneHot ids), when no kept step needs x."""
        if self.segments:
            raise InputError(
                f"x must be {'a tbptt.OneHot' if self.history.onehot else 'an array'} like the "
                "earlier chunks while their steps are kept for an update"
            )
        self.history = History(self.h, self.model.m, self.model.p, onehot)
        self.history.first = self.t + 1
        return self.history

    @property
    def phase(self) -> int:
        """Steps computed since the last update (0 right after an update)."""
        return self.t - self.u_prev

    def _window_gradients(self, w) -> dict[str, Array]:
        """(5.2) through the kept segments of window w, each with its own A and C, then (5.3) as
        one product per parameter over the window's stacked steps."""
        hist, names = self.history, list(self.model.params)
        segs = [seg for seg in self.segments if seg.t1 >= w.s and seg.t0 <= w.u]
        if not segs:  # no kept step in the window (a k2 raised mid-stream, say)
            return {k: np.zeros_like(v) for k, v in self.model.params.items()}
        s, u = max(w.s, segs[0].t0), min(w.u, segs[-1].t1)  # the kept steps of the window
        i = max(w.i, s)  # the first injected step: I = i..u
        a, c, first = s - hist.first, u - hist.first + 1, hist.first  # rows of steps s..u
        R = np.empty((u - s + 1, hist.batch, hist.n), hist.dtype)  # (L, batch, n) r_t
        back = None  # A_{t+1}^T r_{t+1} flowing into the later end of each segment
        resets = any(seg.reset is not None for seg in segs)
        cuts = []  # (L_seg, batch) reset flags, newest segment first, when some stream restarted
        for seg in reversed(segs):
            lo, hi = max(seg.t0, s), min(seg.t1, u)  # this segment's steps in the window
            dh = project(hist.e[max(i, lo) - first : hi - first + 1], seg.params["C"])  # C_t^T e_t
            part = slice(lo - seg.t0, hi - seg.t0 + 1)
            cut = None if seg.reset is None else seg.reset[part]
            _, back = backprop(
                seg.fprime[part], seg.params["A"], dh, back, cut, out=R[lo - s : hi - s + 1]
            )
            if resets:
                cuts.append(np.zeros((hi - lo + 1, hist.batch), bool) if cut is None else cut)
        h_prev = hist.h[a:c]  # (L, batch, n) h_{t-1}
        if resets:  # h_0 where a stream restarted
            h_prev = np.where(np.concatenate(cuts[::-1])[:, :, None], self.h0, h_prev)
        e_inj = hist.e[i - first : c]  # (K, batch, p) e_t, t in I
        h_inj = hist.h[i - first + 1 : c + 1]  # (K, batch, n) h_t, t in I
        return parameter_gradients(
            R, h_prev, hist.inputs(a, c), e_inj, h_inj, "b" in names, "c" in names
        )

    def _count(self, w) -> float:
        """(5.4): N, the injected (step, stream) losses of window w, mask weights summed."""
        total = 0.0
        for seg in self.segments:
            lo, hi = max(seg.t0, w.i), min(seg.t1, w.u)
            if lo <= hi:
                rows = slice(lo - seg.t0, hi - seg.t0 + 1)
                total += (
                    (hi - lo + 1) * self.batch if seg.weight is None else seg.weight[rows].sum()
                )
        return float(total)

    def _update(self, w) -> None:
        """Backpropagate window w through the kept segments (5.2), (5.3); step the optimizer."""
        grads = self._window_gradients(w)  # fresh arrays: the optimizer may write into them
        if self.reduction == "mean":  # (5.4): the derivative of sum / N is the derivative / N
            N = self._count(w)
            for g in grads.values():
                g /= N if N > 0 else 1.0
        self.opt_state = optimizer_update(  # clipping, the step, the non-finite checks
            self.model, self.optimizer, self.opt_state, grads, self.clip, w.u, self.updates
        )
        self.u_prev = w.u
        self.updates += 1
        self._prune()

    # -- inspection and saving ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Array]:
        """Everything needed to continue exactly: parameters, optimizer, carried state, phase,
        the schedule and settings it was made with, and the kept segments, as a flat dict of
        arrays (np.savez-ready, no pickling)."""
        tr = self.truncation
        out: dict[str, Array] = {
            "format": np.asarray(FORMAT),
            "truncation": np.asarray([tr.k1, tr.k2]),
            "inject": np.asarray(tr.inject),
            "flush": np.asarray(tr.flush),
            "loss": np.asarray(self.loss),
            "reduction": np.asarray(self.reduction),
            "t": np.asarray(self.t),
            "u_prev": np.asarray(self.u_prev),
            "updates": np.asarray(self.updates),
        }
        out.update({f"model.{k}": v for k, v in self.model.params.items()})
        out.update({f"opt.{k}": np.asarray(v) for k, v in self.opt_state.items()})
        if self.h is not None:
            out["h"], out["h0"] = self.h, self.h0
        hist = self.history
        for j, seg in enumerate(self.segments):
            rows = slice(seg.t0 - hist.first, seg.t1 - hist.first + 1)
            h_prev = hist.h[rows.start : rows.stop]
            if seg.reset is not None:
                h_prev = np.where(seg.reset[:, :, None], self.h0, h_prev)
            out[f"seg{j}.t0"] = np.asarray(seg.t0)
            for k, v in seg.params.items():
                out[f"seg{j}.param.{k}"] = v
            out[f"seg{j}.x"], out[f"seg{j}.e"] = hist.x[rows], hist.e[rows]
            out[f"seg{j}.h_prev"], out[f"seg{j}.h"] = h_prev, hist.h[rows.start + 1 : rows.stop + 1]
            out[f"seg{j}.fprime"] = seg.fprime
            if seg.reset is not None:
                out[f"seg{j}.reset"] = seg.reset
            if seg.weight is not None:
                out[f"seg{j}.weight"] = seg.weight
        return out

    def load_state_dict(self, state: dict[str, Array]) -> None:
        """Restore what state_dict saved, after checking it belongs to a trainer like this one
        (the same schedule, loss, reduction and parameter shapes); InputError if not."""
        _check_saved(state, self)
        params = {k[6:]: np.array(v) for k, v in state.items() if k.startswith("model.")}
        self.model._rebind(params)
        self.opt_state = {k[4:]: np.array(v) for k, v in state.items() if k.startswith("opt.")}
        self.t, self.u_prev = int(state["t"]), int(state["u_prev"])
        self.updates = int(state["updates"])
        self.h = np.array(state["h"]) if "h" in state else None
        self.h0 = np.array(state["h0"]) if "h0" in state else None
        self.segments, self.history = deque(), None
        if self.h is None:
            return
        n_segs = sum(1 for k in state if k.endswith(".t0") and k.startswith("seg"))
        onehot = n_segs > 0 and np.issubdtype(state["seg0.x"].dtype, np.integer)  # saved ids
        hist = self.history = History(self.h, self.model.m, self.model.p, onehot)
        get = lambda j, k: np.array(state[f"seg{j}.{k}"]) if f"seg{j}.{k}" in state else None  # noqa: E731
        if n_segs:
            hist.first = int(state["seg0.t0"])
            hist.reserve(sum(len(state[f"seg{j}.x"]) for j in range(n_segs)), hist.first)
            hist.h[0] = state["seg0.h_prev"][0]  # h_{t0-1} (h0 where that step restarted too)
        else:
            hist.first = self.t + 1
        for j in range(n_segs):
            t0, x = int(state[f"seg{j}.t0"]), state[f"seg{j}.x"]
            row, L = t0 - hist.first, len(x)
            hist.x[row : row + L], hist.e[row : row + L] = x, state[f"seg{j}.e"]
            hist.h[row + 1 : row + L + 1] = state[f"seg{j}.h"]
            hist.rows = row + L
            seg_params = {k: get(j, f"param.{k}") for k in params}
            self.segments.append(
                Segment(t0, seg_params, get(j, "fprime"), get(j, "reset"), get(j, "weight"))
            )

    def save(self, path: str | os.PathLike) -> None:
        """Write state_dict() to an .npz file atomically (tbptt.files.atomic_write)."""
        save_npz(path, self.state_dict())

    def load(self, path: str | os.PathLike) -> None:
        """Load what save() wrote (no pickled objects are read); InputError if the file is
        damaged or from another kind of trainer."""
        load_npz(path, "tbptt.TBPTT", self.load_state_dict)


def _check_saved(state: dict[str, Array], trainer: TBPTT) -> None:
    """InputError unless `state` comes from a trainer with the same schedule, loss, reduction and
    parameter shapes, with every array its shape needs."""
    if not isinstance(state, dict) or str(state.get("format", "")) != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise InputError(f"state must be a {FORMAT!r} dict from TBPTT.state_dict(), got {got!r}")
    tr = trainer.truncation
    try:
        k1, k2 = (int(k) for k in state["truncation"])
        saved = Truncation(k1, k2, inject=str(state["inject"]), flush=bool(state["flush"]))
        loss, reduction = str(state["loss"]), str(state["reduction"])
        t, u_prev, updates = (int(state[k]) for k in ("t", "u_prev", "updates"))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"the saved state is incomplete or damaged ({exc})") from None
    if saved != tr:
        raise InputError(
            f"the saved run used {saved.describe()}, this trainer has {tr.describe()}; resume "
            "with the same schedule"
        )
    for name, value in (("loss", loss), ("reduction", reduction)):
        check_saved_setting(name, value, getattr(trainer, name))
    if not (0 <= u_prev <= t and updates >= 0 and (u_prev % tr.k1 == 0 or u_prev == t)):
        raise InputError(f"the saved position is inconsistent (t={t}, u_prev={u_prev})")
    check_saved_params(state, trainer.model, ("model.", "seg"))
    if "h" in state:
        n = trainer.model.n
        if np.ndim(state["h"]) != 2 or np.shape(state["h"])[1] != n:
            raise InputError(
                f"the saved state h has shape {np.shape(state['h'])}; expected (batch, {n})"
            )
