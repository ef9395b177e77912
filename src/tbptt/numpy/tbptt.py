"""TBPTT(k1, k2) in the numpy engine: exact BPTT and the frozen estimate (SEMANTICS.md 2, 3, 5),
and the rule that trains online by the canonical rule (5), held by the trainer shell (trainer.py).

Frozen, the parameters stay fixed over the whole sequence; the estimate is the sum of the window
gradients of sections 3 and 4:

    (5.1)  g = sum_W g^W,   g^W_A = sum_{t=s..u} r^W_t h_{t-1}^T,   g^W_C = sum_{t in I} e_t h_t^T

summed over windows first and multiplied once: g_A = sum_t (sum_W r^W_t) h_{t-1}^T and
g_C = sum_t n_t e_t h_t^T, with n_t the number of windows that inject loss t. Exact BPTT
(section 2) is the single window (1, T, 1..T).

Online, after every update time u (4.1) the window W = (s, u, I) of (4.2)-(4.4) is backpropagated
through the steps as they were computed, each with the parameter values in force when it ran (no
step is recomputed). The steps since the last update form a segment that holds those values; the
recursion crosses segments using each step's own A:

    (5.2)  delta_t = [t in I] C_t^T e_t + A_{t+1}^T (f'(a_{t+1}) * delta_{t+1}),   s <= t <= u
    (5.3)  g_A = sum_{t=s..u} r_t h_{t-1}^T   (r_t = delta_t * f'(a_t)), likewise B, b;
           g_C = sum_{t in I} e_t h_t^T, likewise c

The kept x_t, h_t and e_t lie in one History (history.py), so each sum (5.3) is one product over
the window's stacked steps. Only the steps the next window reaches are kept (at most k2); the
flush window (4.4) starts where the next regular window would, so it needs nothing more. The
optimizer never writes into the parameter arrays, so a segment keeps the values it ran with.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..checks import prefixed
from ..errors import InputError
from ..inputs import OneHot
from ..schedule import Truncation, Window, from_options
from .elman import (
    ElmanRNN,
    Trajectory,
    backprop,
    backprop_errors,
    parameter_gradients,
    project,
    run,
)
from .history import History, KeepsSteps
from .rule import Shell, check_saved_setting, damaged

FORMAT = "tbptt.TBPTT/2"

Array = np.ndarray


# -- frozen: exact BPTT and the sum of the windows ----------------------------------------------
def gradients(
    model: ElmanRNN,
    x: Array,
    y: Array,
    truncation: Truncation | None = None,
    h0: Array | None = None,
    loss: str = "l2",
    *,
    mask: Array | None = None,
    reset: Array | None = None,
) -> dict[str, Array]:
    """The gradient of L = sum_t l_t, exact (truncation=None) or the frozen TBPTT estimate.

    Every array is time-major (T, batch, m): axis 0 is the step, axis 1 the stream. A
    batch-first array (batch, T, m), as torch.nn.LSTM(batch_first=True) takes, would be read as
    `batch` steps of T streams: turn it time-major first (np.swapaxes(x, 0, 1)). Where the shapes
    of the arguments reveal one (y time-major beside a batch-first x, h0 with a row per step),
    the error says so.

    Args:
        model: the ElmanRNN whose parameters stay fixed over the sequence.
        x: inputs, (T, m) for one stream or time-major (T, batch, m), or a tbptt.OneHot.
        y: targets, (T, p) / (T, batch, p) for loss="l2"; integer (T,) / (T, batch) for
            loss="cross_entropy" (which needs g="softmax").
        truncation: the schedule; None means exact BPTT.
        h0: initial state (n,) or (batch, n); None means zeros.
        loss: "l2" (the seed's 1/2 ||yhat - y||^2) or "cross_entropy".
        mask: optional (T,) / (T, batch) weights; a 0 switches l_t off.
        reset: optional (T,) / (T, batch) bool; step t of stream j restarts from h0, a constant.

    Returns:
        {"A", "B", "C", ["b", "c",] "h0"}: gradients summed over steps and streams. "h0" has the
        shape h0 was given in ((n,) when None and x is one stream, else (batch, n)); only
        windows that start at step 1 contribute to it.
    """
    if truncation is not None and not isinstance(truncation, Truncation):
        raise InputError(
            f"truncation must be a tbptt.Truncation or None, got {type(truncation).__name__}"
        )
    r = run(model, x, y, h0, loss, mask, reset)
    T = len(r.traj.h)
    windows = [Window(1, 1, T)] if truncation is None else truncation.windows(T)
    grads, gh0 = window_sum(model, r.traj, r.e, windows)
    if h0 is not None and np.ndim(h0) == 1 or h0 is None and r.data.single:
        gh0 = gh0.sum(axis=0)  # one initial state shared by every stream
    grads["h0"] = gh0
    return grads


def window_sum(
    model: ElmanRNN, traj: Trajectory, e: Array, windows: list[Window]
) -> tuple[dict[str, Array], Array]:
    """sum_W g^W over a trajectory computed with fixed parameters (5.1), and the h_0 gradient."""
    T, batch, n = traj.h.shape
    dh = project(e, model.C)  # (T, batch, n): C^T e_t for every t, one product
    gh0 = np.zeros((batch, n), model.dtype)
    if len(windows) == 1 and windows[0] == Window(1, 1, T):  # exact BPTT: one window, every loss
        R, gh0 = backprop(traj.fprime, model.A, dh, cut=traj.reset, out=dh)  # r_t over C^T e_t
        e_used = e
    else:
        R = np.zeros_like(traj.h)  # (T, batch, n): sum over windows of r^W_t
        uses = np.zeros(T, dtype=model.dtype)  # n_t: windows that inject loss t
        for w in windows:
            sl = slice(w.s - 1, w.u)  # steps s..u, 0-based
            cut = None if traj.reset is None else traj.reset[sl]
            Rw, back = backprop(traj.fprime[sl], model.A, dh[w.i - 1 : w.u], cut=cut)
            R[sl] += Rw
            uses[w.i - 1 : w.u] += 1
            if w.s == 1:
                gh0 += back  # (2.5) / (3.3): only a window that starts at step 1 reaches h_0
        e_used = e * uses[:, None, None]  # n_t e_t
    grads = parameter_gradients(
        R, traj.h_prev, traj.x, e_used, traj.h, model.b is not None, model.c is not None
    )
    return grads, gh0


def total_loss(
    model: ElmanRNN,
    x: Array,
    y: Array,
    h0: Array | None = None,
    loss: str = "l2",
    *,
    mask: Array | None = None,
    reset: Array | None = None,
) -> float:
    """L = sum_t l_t summed over streams (1.5): the quantity whose gradient `gradients` returns."""
    return float(run(model, x, y, h0, loss, mask, reset).l.sum())


def frozen(model: ElmanRNN, x, y, h0=None, loss: str = "l2", **options) -> dict[str, Array]:
    """tbptt.methods' frozen estimate of method tbptt: `gradients` with the schedule of the
    options k1, k2, inject, flush (h0's gradient left out)."""
    kw = {k: options.pop(k) for k in ("mask", "reset") if k in options}
    out = gradients(model, x, y, from_options(options), h0, loss, **kw)
    out.pop("h0")
    return out


# -- online: the rule the trainer shell holds ----------------------------------------------------
@dataclass
class Segment:
    """Steps t0..t0+L-1, computed with one set of parameter values (those in force then).

    Their x_t, h_t and e_t live in the rule's History; what differs from segment to segment stays
    here: the parameters and f'(a_t), which the backward recursion (5.2) reads per segment.
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


def rule(*, k1: int, k2: int, inject: str = "new", flush: bool = True) -> TruncationRule:
    """The rule of method tbptt from its options (tbptt.methods)."""
    return TruncationRule(from_options({"k1": k1, "k2": k2, "inject": inject, "flush": flush}))


class TruncationRule(KeepsSteps):
    """TBPTT(k1, k2) by the canonical rule: updates after k1, 2 k1, ... (and the flush window at
    finish()), each the window (5.2)-(5.3) through the kept segments."""

    name = "TBPTT"
    format = FORMAT
    dense_inputs = False
    saved_floats: tuple[str, ...] = ("seg",)

    def __init__(self, truncation: Truncation) -> None:
        if not isinstance(truncation, Truncation):
            raise InputError(
                f"truncation must be a tbptt.Truncation, got {type(truncation).__name__}"
            )
        self.truncation = truncation  # --adapt-k2 may replace it between chunks
        self.segments: deque[Segment] = deque()
        self.history: History | None = None  # x_t, h_t, e_t of the kept steps

    def __repr__(self) -> str:
        return self.truncation.describe()

    def due(self, trainer: Shell, T: int) -> list[int]:
        """The update times (4.1) among steps t+1..t+T."""
        tr, out = self.truncation, []
        u = tr.next_update(trainer.t)
        while u <= trainer.t + T:
            out.append(u)
            u = tr.next_update(u)
        return out

    def run(self, trainer: Shell, x, y, mask, reset) -> tuple[Trajectory, Array]:
        """Steps t+1..t+L with the current parameters, kept as one segment."""
        hist = self.hist
        if isinstance(x, OneHot) != hist.onehot:
            hist = self._switch_inputs(trainer, isinstance(x, OneHot))
        keep_from = self.segments[0].t0 if self.segments else trainer.t + 1
        traj, l = hist.run(trainer, x, y, mask, reset, keep_from)
        weight = None if mask is None else mask.sum(axis=1)  # (L,)
        seg = Segment(trainer.t + 1, trainer.model.params, traj.fprime, reset, weight)
        self.segments.append(seg)
        return traj, l

    def _switch_inputs(self, trainer: Shell, onehot: bool) -> History:
        """A History for the other kind of x (arrays or OneHot ids), when no kept step needs x."""
        if self.segments:
            raise InputError(
                f"x must be {'a tbptt.OneHot' if self.hist.onehot else 'an array'} like the "
                "earlier chunks while their steps are kept for an update"
            )
        assert trainer.h is not None  # the first chunk set it
        hist = self.history = History(trainer.h, trainer.model.m, trainer.model.p, onehot)
        hist.first = trainer.t + 1
        return hist

    def gradient(self, trainer: Shell, final: bool) -> tuple[dict[str, Array], float]:
        tr = self.truncation
        w = tr.flush_window(trainer.t) if final else tr.window(trainer.t, trainer.u_prev)
        assert w is not None and trainer.batch is not None  # final() said there is a window
        return self._window_gradients(trainer, w), self._count(w, trainer.batch)

    def final(self, trainer: Shell) -> bool:
        return self.truncation.flush_window(trainer.t) is not None

    def updated(self, trainer: Shell) -> None:
        """Keep only what a window can still reach: the next one, regular (4.2) or flush (4.4),
        starts at s = next_update - k2 + 1, later ones later."""
        oldest = self.truncation.next_update(trainer.t) - self.truncation.k2 + 1
        while self.segments and self.segments[0].t1 < oldest:
            self.segments.popleft()

    def _window_gradients(self, trainer: Shell, w: Window) -> dict[str, Array]:
        """(5.2) through the kept segments of window w, each with its own A and C, then (5.3) as
        one product per parameter over the window's stacked steps."""
        hist, names = self.hist, list(trainer.model.params)
        segs = [seg for seg in self.segments if seg.t1 >= w.s and seg.t0 <= w.u]
        if not segs:  # no kept step in the window (a k2 raised mid-stream, say)
            return {k: np.zeros_like(v) for k, v in trainer.model.params.items()}
        s, u = max(w.s, segs[0].t0), min(w.u, segs[-1].t1)  # the kept steps of the window
        i = max(w.i, s)  # the first injected step: I = i..u
        a, c, first = s - hist.first, u - hist.first + 1, hist.first  # rows of steps s..u
        R = np.empty((u - s + 1, hist.batch, hist.n), hist.dtype)  # (L, batch, n) r_t
        back = None  # A_{t+1}^T r_{t+1} flowing into the later end of each segment
        resets = any(seg.reset is not None for seg in segs)
        cuts = []  # (L_seg, batch) reset flags, newest segment first, when some stream restarted
        for seg in reversed(segs):
            lo, hi = max(seg.t0, s), min(seg.t1, u)  # this segment's steps in the window
            e = hist.e[max(i, lo) - first : hi - first + 1]  # e_t of the injected steps
            part = slice(lo - seg.t0, hi - seg.t0 + 1)
            cut = None if seg.reset is None else seg.reset[part]
            _, back = backprop_errors(  # with C_t^T e_t injected
                seg.fprime[part],
                seg.params["A"],
                seg.params["C"],
                e,
                back,
                cut,
                R[lo - s : hi - s + 1],
            )
            if resets:
                cuts.append(np.zeros((hi - lo + 1, hist.batch), bool) if cut is None else cut)
        h_prev = hist.h[a:c]  # (L, batch, n) h_{t-1}
        if resets:  # h_0 where a stream restarted
            assert trainer.h0 is not None
            h_prev = np.where(np.concatenate(cuts[::-1])[:, :, None], trainer.h0, h_prev)
        e_inj = hist.e[i - first : c]  # (K, batch, p) e_t, t in I
        h_inj = hist.h[i - first + 1 : c + 1]  # (K, batch, n) h_t, t in I
        return parameter_gradients(
            R, h_prev, hist.inputs(a, c), e_inj, h_inj, "b" in names, "c" in names
        )

    def _count(self, w: Window, batch: int) -> float:
        """(5.4): N, the injected (step, stream) losses of window w, mask weights summed."""
        total = 0.0
        for seg in self.segments:
            lo, hi = max(seg.t0, w.i), min(seg.t1, w.u)
            if lo <= hi:
                rows = slice(lo - seg.t0, hi - seg.t0 + 1)
                total += (hi - lo + 1) * batch if seg.weight is None else seg.weight[rows].sum()
        return float(total)

    # -- saving ---------------------------------------------------------------------------------
    def state_dict(self, trainer: Shell) -> dict[str, Array]:
        """The schedule and settings, the phase, and the kept segments (inputs, states, errors,
        the parameter values they ran with)."""
        tr = self.truncation
        out: dict[str, Array] = {
            "truncation": np.asarray([tr.k1, tr.k2]),
            "inject": np.asarray(tr.inject),
            "flush": np.asarray(tr.flush),
            "loss": np.asarray(trainer.loss),
            "reduction": np.asarray(trainer.reduction),
            "u_prev": np.asarray(trainer.u_prev),
        }
        for j, seg in enumerate(self.segments):
            hist = self.hist
            rows = slice(seg.t0 - hist.first, seg.t1 - hist.first + 1)
            h_prev = hist.h[rows.start : rows.stop]
            if seg.reset is not None:
                assert trainer.h0 is not None
                h_prev = np.where(seg.reset[:, :, None], trainer.h0, h_prev)
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

    def read(self, state: dict[str, Array], trainer: Shell) -> tuple[int, Callable[[], None]]:
        """Check the saved schedule, settings and phase; return u_prev and the restore."""
        tr = self.truncation
        try:
            k1, k2 = (int(k) for k in state["truncation"])
            saved = Truncation(k1, k2, inject=str(state["inject"]), flush=bool(state["flush"]))
            loss, reduction = str(state["loss"]), str(state["reduction"])
            t, u_prev = int(state["t"]), int(state["u_prev"])
        except (KeyError, TypeError, ValueError) as exc:
            raise damaged(exc) from None
        if saved != tr:
            raise InputError(
                f"the saved run used {saved.describe()}, this trainer has {tr.describe()}; resume "
                "with the same schedule"
            )
        for name, value in (("loss", loss), ("reduction", reduction)):
            check_saved_setting(name, value, getattr(trainer, name))
        if not (u_prev % tr.k1 == 0 or u_prev == t):
            raise InputError(f"the saved position is inconsistent (t={t}, u_prev={u_prev})")
        return u_prev, lambda: self._restore(state, trainer)

    def _restore(self, state: dict[str, Array], trainer: Shell) -> None:
        """The kept segments back into a History (after the shell restored h and the model)."""
        self.segments, self.history = deque(), None
        if trainer.h is None:
            return
        n_segs = sum(1 for k in state if k.endswith(".t0") and k.startswith("seg"))
        onehot = n_segs > 0 and np.issubdtype(state["seg0.x"].dtype, np.integer)  # saved ids
        m, p = trainer.model.m, trainer.model.p
        hist = self.history = History(trainer.h, m, p, onehot)
        if n_segs:
            hist.first = int(state["seg0.t0"])
            hist.reserve(sum(len(state[f"seg{j}.x"]) for j in range(n_segs)), hist.first)
            hist.h[0] = state["seg0.h_prev"][0]  # h_{t0-1} (h0 where that step restarted too)
        else:
            hist.first = trainer.t + 1
        names = list(trainer.model.params)
        for j in range(n_segs):
            seg = prefixed(state, f"seg{j}.")
            t0, x = int(seg["t0"]), seg["x"]
            row, L = t0 - hist.first, len(x)
            hist.x[row : row + L], hist.e[row : row + L] = x, seg["e"]
            hist.h[row + 1 : row + L + 1] = seg["h"]
            hist.rows = row + L
            get = lambda k: np.array(seg[k]) if k in seg else None  # noqa: E731, B023
            params = {k: np.array(seg[f"param.{k}"]) for k in names}
            fprime = np.array(seg["fprime"])
            self.segments.append(Segment(t0, params, fprime, get("reset"), get("weight")))
