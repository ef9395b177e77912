"""Online RTRL and UORO: the influence carried forward, an update every k1 steps (SEMANTICS.md 8).

Both run the stream forward from the carried state h, chunk by chunk, with the parameters in force
at each step. Each step's contribution to the gradient, (8.4) for RTRL and (8.5) for UORO, is
computed as the step runs (with that step's parameters) and summed; after every k1-th step the sum
of the contributions since the last update is applied by the optimizer:

    (8.13) theta <- optimizer(theta, sum_{t in (u_prev, u]} g_t),   u = k1, 2 k1, ..., and finish()

The influence (J for RTRL; s~, theta~ for UORO) is carried across updates: J_t = D_t A_t J_{t-1}
+ dF/dtheta|_t with the current A_t, Williams and Zipser's approximation, which makes online RTRL
with k1 = 1 their "real-time" algorithm. finish() applies the contributions since the last update.
reduction="mean" divides an update by the number of its (unmasked) losses, as tbptt.TBPTT does.
No step is kept: memory is the influence alone, whatever k1 and the stream's length.
"""

from __future__ import annotations

import os

import numpy as np

from . import rtrl as rtrl_
from . import uoro as uoro_
from .checks import check_h0, dense_inputs
from .elman import ElmanRNN
from .errors import InputError
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

Array = np.ndarray


class ForwardMode:
    """What online RTRL and UORO share: the stream, the sum since the last update, saving."""

    NAME = ""  # "RTRL" or "UORO"

    def __init__(self, model, optimizer, *, k1, loss, clip, h0, reduction) -> None:
        check_model(model)
        check_settings(optimizer, loss, clip, reduction)
        self.model, self.optimizer, self.loss, self.clip = model, optimizer, loss, clip
        self.reduction = reduction
        self.k1 = check_count("k1", k1)
        self._h0_arg = h0
        self.opt_state = optimizer.init(model.params)
        self.h0: Array | None = None  # (batch, n), fixed by the first chunk
        self.h: Array | None = None  # (batch, n) the carried state
        self.t = 0  # steps computed so far
        self.u_prev = 0  # the last update time
        self.updates = 0
        self.pending: dict[str, Array] | None = None  # contributions since the last update
        self.count = 0.0  # their (unmasked) losses, for reduction="mean"
        self.kernel = None  # the influence, allocated by the first chunk
        self.finished = False

    @property
    def format(self) -> str:
        return f"tbptt.{self.NAME}/1"

    @property
    def batch(self) -> int | None:
        return None if self.h is None else self.h.shape[0]

    # -- what differs between RTRL and UORO ---------------------------------------------------
    def _allocate(self, batch: int):  # the influence of `batch` streams, at zero
        raise NotImplementedError

    def _contributions(self, traj, e) -> dict[str, Array]:  # one piece's, advancing self.kernel
        raise NotImplementedError

    def _settings(self) -> dict[str, object]:  # saved and checked on load
        return {"k1": self.k1, "loss": self.loss, "reduction": self.reduction}

    # -- the stream -----------------------------------------------------------------------------
    def feed(
        self, x: Array, y: Array, mask: Array | None = None, reset: Array | None = None
    ) -> float:
        """Run the next chunk (T_c, [batch,] m), updating after every k1-th step of the stream.

        Returns the chunk's mean loss sum(w l) / sum(w) over its steps and streams (w the mask
        weights, 1 without a mask; 0 when every weight is 0), with the parameters in force at
        each step.
        """
        if self.finished:
            raise RuntimeError(f"the stream was finished; create a new {self.NAME} to go on")
        model = self.model
        data = dense_inputs(check_chunk(self.model, self.loss, x, y, mask, reset), model.dtype)
        T, batch, _ = data.x.shape
        if self.h is None:
            h0 = np.array(check_h0(self._h0_arg, model.n, batch, model.dtype))
            self.kernel = self._allocate(batch)  # may refuse (RTRL's size): nothing trained
            self.h0, self.h = h0, h0.copy()
        elif batch != self.batch:
            raise InputError(
                f"x has {batch} streams, but this stream was started with {self.batch}"
            )
        total, count, start = 0.0, 0.0, 0
        while start < T:  # pieces end at update times
            stop = min(T, start + self.k1 - self.t % self.k1)
            sl = slice(start, stop)
            mask_, reset_ = (None if a is None else a[sl] for a in (data.mask, data.reset))
            traj, l, e = forward_checked(
                model,
                data.x[sl],
                data.y[sl],
                self.h,
                self.h0,
                self.loss,
                mask_,
                reset_,
                self.t,
                self.updates,
            )
            grads = self._contributions(traj, e)
            if self.pending is None:
                self.pending = grads
            else:
                for k, g in grads.items():
                    self.pending[k] += g
            n_losses = (stop - start) * batch if mask_ is None else float(mask_.sum())
            self.count += n_losses
            total, count = total + float(l.sum()), count + n_losses
            self.h = traj.h[-1].copy()
            self.t += stop - start
            if self.t % self.k1 == 0:
                self._update()
            start = stop
        return total / count if count > 0 else 0.0

    def finish(self) -> None:
        """End of stream: apply the contributions since the last update, if any."""
        if self.t > self.u_prev and self.pending is not None:
            self._update()
        self.finished = True

    def _update(self) -> None:
        grads, self.pending = self.pending, None
        if self.reduction == "mean":  # the derivative of sum / N
            for g in grads.values():
                g /= self.count if self.count > 0 else 1.0
        self.opt_state = optimizer_update(
            self.model, self.optimizer, self.opt_state, grads, self.clip, self.t, self.updates
        )
        self.u_prev, self.updates, self.count = self.t, self.updates + 1, 0.0

    # -- saving ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Array]:
        """Everything needed to continue exactly (the influence and the random state included),
        as a flat dict of arrays (np.savez-ready, no pickling)."""
        out: dict[str, Array] = {"format": np.asarray(self.format)}
        out.update({f"setting.{k}": np.asarray(v) for k, v in self._settings().items()})
        for k in ("t", "u_prev", "updates", "count"):
            out[k] = np.asarray(getattr(self, k))
        out.update({f"model.{k}": v for k, v in self.model.params.items()})
        out.update({f"opt.{k}": np.asarray(v) for k, v in self.opt_state.items()})
        if self.h is not None:
            out["h"], out["h0"] = self.h, self.h0
            out.update({f"influence.{k}": v for k, v in self.kernel.arrays().items()})
        if self.pending is not None:
            out.update({f"pending.{k}": v for k, v in self.pending.items()})
        return out

    def load_state_dict(self, state: dict[str, Array]) -> None:
        """Restore what state_dict saved, after checking it comes from a trainer like this one
        (the same method, settings and parameter shapes); InputError if not."""
        if not isinstance(state, dict) or str(state.get("format", "")) != self.format:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise InputError(f"state must be a {self.format!r} dict from state_dict(), got {got!r}")
        try:
            for k, v in self._settings().items():
                check_saved_setting(k, type(v)(state[f"setting.{k}"].item()), v)
            t, u_prev, updates = (int(state[k]) for k in ("t", "u_prev", "updates"))
            count = float(state["count"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"the saved state is incomplete or damaged ({exc})") from None
        if not (0 <= u_prev <= t and updates >= 0):
            raise InputError(f"the saved position is inconsistent (t={t}, u_prev={u_prev})")
        check_saved_params(state, self.model, ("model.", "influence.", "pending."))
        h = state.get("h")
        if h is not None and (np.ndim(h) != 2 or np.shape(h)[1] != self.model.n):
            raise InputError(
                f"the saved state h has shape {np.shape(h)}; expected (batch, {self.model.n})"
            )
        kernel = None
        if h is not None:  # restored into fresh arrays first: a refused file changes nothing
            kernel = self._allocate(len(h))
            saved = {k[10:]: v for k, v in state.items() if k.startswith("influence.")}
            for k, a in kernel.arrays().items():
                if k not in saved or np.shape(saved[k]) != a.shape:
                    got = np.shape(saved[k]) if k in saved else "missing"
                    raise InputError(f"the saved influence {k} has shape {got}; expected {a.shape}")
                a[...] = saved[k]
        self.model._rebind({k[6:]: np.array(v) for k, v in state.items() if k.startswith("model.")})
        self.opt_state = {k[4:]: np.array(v) for k, v in state.items() if k.startswith("opt.")}
        self.t, self.u_prev, self.updates, self.count = t, u_prev, updates, count
        self.h = None if h is None else np.array(h)
        self.h0 = None if h is None else np.array(state["h0"])
        pending = {k[8:]: np.array(v) for k, v in state.items() if k.startswith("pending.")}
        self.pending, self.kernel = pending or None, kernel

    def save(self, path: str | os.PathLike) -> None:
        """Write state_dict() to an .npz file atomically."""
        save_npz(path, self.state_dict())

    def load(self, path: str | os.PathLike) -> None:
        """Load what save() wrote; InputError if the file is damaged or from another trainer."""
        load_npz(path, f"tbptt.{self.NAME}", self.load_state_dict)


class RTRL(ForwardMode):
    """Train an ElmanRNN online with RTRL (Williams and Zipser 1989), updating every k1 steps.

    Args:
        model: the ElmanRNN, trained in place (after each update model.A ... are the new values).
        optimizer: tbptt.SGD or tbptt.Adam.
        k1: steps between updates (1: every step, Williams and Zipser's real-time learning).
        loss, clip, h0, reduction: as tbptt.TBPTT.
        max_bytes: the largest memory allowed for the influence matrix J and its buffer; the first
            chunk raises an InputError giving the size when more is needed (nothing trained).

    Each step costs about 2 n^2 |theta| flops per stream (|theta| = n (n + m + 1)); see rtrl.py.
    """

    NAME = "RTRL"

    def __init__(
        self,
        model: ElmanRNN,
        optimizer: SGD | Adam,
        *,
        k1: int = 1,
        loss: str = "l2",
        clip: float | None = None,
        h0: Array | None = None,
        reduction: str = "sum",
        max_bytes: float = rtrl_.MAX_BYTES,
    ) -> None:
        super().__init__(model, optimizer, k1=k1, loss=loss, clip=clip, h0=h0, reduction=reduction)
        rtrl_.check_influence_size(model, 1, max_bytes)  # a model too large for one stream
        self.max_bytes = max_bytes

    def _allocate(self, batch: int) -> rtrl_.Influence:
        rtrl_.check_influence_size(self.model, batch, self.max_bytes)
        return rtrl_.Influence(self.model, batch)

    def _contributions(self, traj, e):
        return rtrl_.piece_gradients(self.model, self.kernel, traj, e)


class UORO(ForwardMode):
    """Train an ElmanRNN online with UORO (Tallec and Ollivier 2017), updating every k1 steps.

    Args:
        model, optimizer, loss, clip, h0, reduction: as tbptt.RTRL.
        k1: steps between updates (1: every step, as in the paper).
        rng: a seed, a numpy Generator or None (fresh entropy) for the signs nu_t; its state is
            saved with the trainer, so a resumed run draws the same signs.
        eps: the eps of rho0 and rho1 (8.8)-(8.9).

    Each step costs O(n^2 + |theta|) per stream: one pass over theta~ and O(n^2) on s~; see
    uoro.py.
    """

    NAME = "UORO"

    def __init__(
        self,
        model: ElmanRNN,
        optimizer: SGD | Adam,
        *,
        k1: int = 1,
        rng: int | np.random.Generator | None = None,
        loss: str = "l2",
        clip: float | None = None,
        h0: Array | None = None,
        reduction: str = "sum",
        eps: float = uoro_.EPS,
    ) -> None:
        super().__init__(model, optimizer, k1=k1, loss=loss, clip=clip, h0=h0, reduction=reduction)
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < np.inf:
            raise InputError(f"eps must be a positive number, got {eps!r}")
        self.rng, self.eps = as_generator(rng), float(eps)

    def _allocate(self, batch: int) -> uoro_.UOROState:
        return uoro_.UOROState(self.model, batch, self.eps)

    def _contributions(self, traj, e):
        return uoro_.piece_gradients(self.model, self.kernel, traj, e, self.rng)

    def _settings(self):
        return {**super()._settings(), "eps": self.eps}

    def state_dict(self) -> dict[str, Array]:
        return {**super().state_dict(), "rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Array]) -> None:
        saved = state.get("rng", np.asarray("")) if isinstance(state, dict) else None
        probe = np.random.Generator(type(self.rng.bit_generator)())
        set_rng_state(probe, saved)  # refuse a damaged state before anything is changed
        super().load_state_dict(state)
        self.rng.bit_generator.state = probe.bit_generator.state
