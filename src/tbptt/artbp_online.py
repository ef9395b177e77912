"""Online ARTBP: an update at every cut (SEMANTICS.md 8; the estimator is artbp.py's (8.11)-(8.12)).

The stream runs forward from the carried state h with the parameters in force; the cut decisions
are drawn as the steps arrive (one uniform number per possible boundary, the same draws as
tbptt.artbp_gradients with the same generator). At a cut after step u, the window of steps since
the previous cut is backpropagated with its compensation weights (8.11) and the optimizer applies
it. Every step of a window ran with the same parameters (updates happen only at cuts), so the
update is the exact derivative of the window's compensated losses through the computation that
produced them, the canonical rule of SEMANTICS.md 5. finish() is a cut.

    (8.14) theta <- optimizer(theta, g^W),   W = (previous cut, u],   at every cut u and at the end

The steps of the current window are kept (x_t, h_t, e_t in tbptt.online's History), so memory
grows with the window: its length is random and unbounded unless biased_max_length forces a cut,
which makes the estimate biased (dependencies across a forced cut are lost).
"""

from __future__ import annotations

import os

import numpy as np

from .artbp import Cuts, check_c, check_max_length, probability, window_gradients
from .checks import check_h0, dense_inputs
from .elman import ElmanRNN, Trajectory
from .errors import InputError
from .functions import activation
from .online import History
from .optim import SGD, Adam
from .updates import (
    as_generator,
    check_chunk,
    check_count,
    check_model,
    check_saved_params,
    check_saved_setting,
    check_settings,
    forward_checked,
    load_npz,
    optimizer_update,
    rng_state,
    save_npz,
    set_rng_state,
)

FORMAT = "tbptt.ARTBP/1"

Array = np.ndarray


class ARTBP:
    """Train an ElmanRNN online with ARTBP (Tallec and Ollivier 2017), updating at every cut.

    Args:
        model: the ElmanRNN, trained in place (after each update model.A ... are the new values).
        optimizer: tbptt.SGD or tbptt.Adam.
        c: the probability of a cut at a possible boundary, a number in [0, 1] or a callable of L,
            the steps since the last cut (c = 1, b = 1: TBPTT(1, 1); c = 0: one update at the end).
        b: cuts may fall after steps b, 2b, ... of the stream.
        rng: a seed, a numpy Generator or None (fresh entropy) for the cuts; saved with the
            trainer, so a resumed run draws the same cuts.
        biased_max_length: also cut where a window would grow longer than this many steps, to
            bound memory; the gradient estimate is then biased.
        loss, clip, h0, reduction: as tbptt.TBPTT (reduction="mean" divides each update by the
            number of the window's unmasked losses).
    """

    NAME = "ARTBP"

    def __init__(
        self,
        model: ElmanRNN,
        optimizer: SGD | Adam,
        *,
        c: float | object,
        b: int = 1,
        rng: int | np.random.Generator | None = None,
        biased_max_length: int | None = None,
        loss: str = "l2",
        clip: float | None = None,
        h0: Array | None = None,
        reduction: str = "sum",
    ) -> None:
        check_model(model)
        c = check_c(c)
        b = check_count("b", b)
        max_length = check_max_length(biased_max_length, b)
        check_settings(optimizer, loss, clip, reduction)
        if callable(c):  # a bad callable is told now, not after hours of training
            for L in range(b, 17 * b, b):
                probability(c, L)
        self.model, self.optimizer, self.loss, self.clip = model, optimizer, loss, clip
        self.reduction, self.b, self.max_length = reduction, b, max_length
        self.rng = as_generator(rng)
        self.cuts = Cuts(c, b, self.rng, max_length)
        self._h0_arg = h0
        self.opt_state = optimizer.init(model.params)
        self.h0: Array | None = None
        self.h: Array | None = None
        self.t = 0
        self.updates = 0
        self.start = 1  # first step of the current window
        self.weights: dict[int, float] = {}  # 1 / (1 - c_L) at the window's uncut boundaries
        self.history: History | None = None  # x_t, h_t, e_t of the window's steps
        self.resets: list[Array] = []  # (L_piece, batch) per piece of the window
        self.counts: list[float] = []  # the unmasked losses per piece
        self.finished = False

    @property
    def c(self):
        return self.cuts.c

    @property
    def batch(self) -> int | None:
        return None if self.h is None else self.h.shape[0]

    def feed(
        self, x: Array, y: Array, mask: Array | None = None, reset: Array | None = None
    ) -> float:
        """Run the next chunk (T_c, [batch,] m), updating at every cut that falls in it.

        Returns the chunk's mean loss sum(w l) / sum(w) over its steps and streams (w the mask
        weights; 0 when every weight is 0), with the parameters in force at each step.
        """
        if self.finished:
            raise RuntimeError("the stream was finished; create a new ARTBP to go on")
        model = self.model
        data = dense_inputs(check_chunk(self.model, self.loss, x, y, mask, reset), model.dtype)
        T, batch, _ = data.x.shape
        if self.h is None:
            self.h0 = np.array(check_h0(self._h0_arg, model.n, batch, model.dtype))
            self.h = self.h0.copy()
            self.history = History(self.h, model.m, model.p)
        elif batch != self.batch:
            raise InputError(
                f"x has {batch} streams, but this stream was started with {self.batch}"
            )
        cuts, weights = self.cuts.decide(self.t, self.t + T)  # (8.11), drawn before any step
        self.weights.update(weights)
        total, count, start, t0 = 0.0, 0.0, 0, self.t
        for stop in sorted({u - t0 for u in cuts} | {T}):  # pieces end at cuts
            sl = slice(start, stop)
            total += self._forward(data, sl)
            count += (stop - start) * batch if data.mask is None else float(data.mask[sl].sum())
            if t0 + stop in cuts:
                self._update()
            start = stop
        return total / count if count > 0 else 0.0

    def finish(self) -> None:
        """End of stream: the last window is cut at the last step and applied."""
        if self.h is not None and self.t >= self.start:
            self._update()
        self.finished = True

    def _forward(self, data, sl: slice) -> float:
        model, hist = self.model, self.history
        x = data.x[sl]
        L = len(x)
        mask, reset = (None if a is None else a[sl] for a in (data.mask, data.reset))
        row = hist.reserve(L, self.start)
        xs = hist.x[row : row + L]
        xs[...] = x  # our own copy
        traj, l, e = forward_checked(
            model,
            xs,
            data.y[sl],
            self.h,
            self.h0,
            self.loss,
            mask,
            reset,
            self.t,
            self.updates,
            hs=hist.h[row : row + L + 1],
        )
        hist.e[row : row + L] = e
        hist.rows = row + L
        self.resets.append(np.zeros((L, len(x[0])), bool) if reset is None else reset.copy())
        self.counts.append(L * len(x[0]) if mask is None else float(mask.sum()))
        self.h = traj.h[-1].copy()
        self.t += L
        return float(l.sum())

    def _update(self) -> None:
        """(8.11)-(8.14) over the window start..t, then the optimizer step."""
        model, hist, s, u = self.model, self.history, self.start, self.t
        a, c = s - hist.first, u - hist.first + 1  # the window's rows
        reset = np.concatenate(self.resets)  # (L, batch)
        h_prev = hist.h[a:c]
        if reset.any():
            h_prev = np.where(reset[:, :, None], self.h0, h_prev)
        h = hist.h[a + 1 : c + 1]
        traj = Trajectory(
            hist.x[a:c],
            h_prev,
            h,
            activation(model.f).grad(h),
            None,
            reset if reset.any() else None,
        )
        weights = {k: w for k, w in self.weights.items() if s <= k < u}
        grads = window_gradients(model, traj, hist.e[a:c], s - 1, [], weights)
        if self.reduction == "mean":
            n_losses = sum(self.counts)
            for g in grads.values():
                g /= n_losses if n_losses > 0 else 1.0
        self.opt_state = optimizer_update(
            model, self.optimizer, self.opt_state, grads, self.clip, u, self.updates
        )
        self.updates += 1
        self.start = u + 1
        self.weights = {k: w for k, w in self.weights.items() if k > u}
        self.resets, self.counts = [], []

    # -- saving ---------------------------------------------------------------------------------
    def _settings(self) -> dict[str, object]:
        c = "callable" if callable(self.c) else self.c
        max_length = 0 if self.max_length is None else self.max_length
        return {
            "c": c,
            "b": self.b,
            "biased_max_length": max_length,
            "loss": self.loss,
            "reduction": self.reduction,
        }

    def state_dict(self) -> dict[str, Array]:
        """Everything needed to continue exactly (the window's steps and the random state
        included), as a flat dict of arrays (np.savez-ready, no pickling)."""
        out: dict[str, Array] = {"format": np.asarray(FORMAT), "rng": rng_state(self.rng)}
        out.update({f"setting.{k}": np.asarray(v) for k, v in self._settings().items()})
        for k, v in (
            ("t", self.t),
            ("updates", self.updates),
            ("start", self.start),
            ("last_cut", self.cuts.last),
        ):
            out[k] = np.asarray(v)
        out["weights.step"] = np.asarray(sorted(self.weights), np.int64)
        out["weights.value"] = np.asarray([self.weights[k] for k in sorted(self.weights)])
        out.update({f"model.{k}": v for k, v in self.model.params.items()})
        out.update({f"opt.{k}": np.asarray(v) for k, v in self.opt_state.items()})
        if self.h is not None:
            hist = self.history
            a, c = self.start - hist.first, self.t - hist.first + 1
            out["h"], out["h0"] = self.h, self.h0
            out["window.x"], out["window.e"] = hist.x[a:c], hist.e[a:c]
            out["window.h"] = hist.h[a : c + 1]  # h_{s-1} .. h_t
            out["window.reset"] = (
                np.concatenate(self.resets) if self.resets else np.zeros((0, len(self.h)), bool)
            )
            out["window.count"] = np.asarray(float(sum(self.counts)))
        return out

    def load_state_dict(self, state: dict[str, Array]) -> None:
        """Restore what state_dict saved, after checking it comes from an ARTBP trainer with the
        same settings and parameter shapes; InputError if not."""
        if not isinstance(state, dict) or str(state.get("format", "")) != FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise InputError(
                f"state must be a {FORMAT!r} dict from ARTBP.state_dict(), got {got!r}"
            )
        try:
            for k, v in self._settings().items():
                saved = state[f"setting.{k}"].item()
                check_saved_setting(k, saved if isinstance(saved, str) else type(v)(saved), v)
            t, updates, start, last = (int(state[k]) for k in ("t", "updates", "start", "last_cut"))
            weights = dict(
                zip(state["weights.step"].tolist(), state["weights.value"].tolist(), strict=True)
            )
            h = state.get("h")
            window = (
                {k: np.array(state[f"window.{k}"]) for k in ("x", "e", "h", "reset")}
                if h is not None
                else None
            )
            count = float(state["window.count"]) if h is not None else 0.0
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"the saved state is incomplete or damaged ({exc})") from None
        if not (0 <= last <= t and start == last + 1 and updates >= 0):
            raise InputError(f"the saved position is inconsistent (t={t}, last cut={last})")
        check_saved_params(state, self.model, ("model.", "window."))
        n, L = self.model.n, t - start + 1
        if h is not None and (
            np.ndim(h) != 2
            or np.shape(h)[1] != n
            or len(window["x"]) != L
            or window["h"].shape != (L + 1, *np.shape(h))
        ):
            raise InputError(f"the saved window does not match its position (t={t}, start={start})")
        probe = np.random.Generator(type(self.rng.bit_generator)())
        set_rng_state(probe, state["rng"])
        # checked: now change this trainer
        self.rng.bit_generator.state = probe.bit_generator.state
        self.model._rebind({k[6:]: np.array(v) for k, v in state.items() if k.startswith("model.")})
        self.opt_state = {k[4:]: np.array(v) for k, v in state.items() if k.startswith("opt.")}
        self.t, self.updates, self.start, self.cuts.last = t, updates, start, last
        self.weights = weights
        self.h = None if h is None else np.array(h)
        self.h0 = None if h is None else np.array(state["h0"])
        self.history, self.resets, self.counts = None, [], []
        if h is None:
            return
        hist = self.history = History(window["h"][0], self.model.m, self.model.p)
        hist.first = start
        hist.reserve(L, start)
        hist.x[:L], hist.e[:L], hist.h[: L + 1] = window["x"], window["e"], window["h"]
        hist.rows = L
        if L:
            self.resets, self.counts = [window["reset"]], [count]

    def save(self, path: str | os.PathLike) -> None:
        """Write state_dict() to an .npz file atomically."""
        save_npz(path, self.state_dict())

    def load(self, path: str | os.PathLike) -> None:
        """Load what save() wrote; InputError if the file is damaged or from another trainer."""
        load_npz(path, "tbptt.ARTBP", self.load_state_dict)
