"""The numpy engine's trainer shell, tbptt.TBPTT, and the protocol of the rules it holds.

Online training (SEMANTICS.md 5) on a stream of chunks (section 6). The shell holds what every
method does alike:

    the stream     the position t, the carried state h, the restart state h0 and the batch (fixed
                   by the first chunk); each chunk is split at the updates the rule says are due
    an update      the rule's gradient; reduction="mean" divides it by the rule's count of
                   injected, unmasked losses (5); then the global norm, the non-finite check of the
                   gradient (6), clipping (Pascanu, Mikolov and Bengio 2013, with torch's 1e-6),
                   the optimizer step, the non-finite check of the new parameters (6), and the
                   model pointed at them (trained in place, the old arrays never modified)
    finish()       the rule's last update, if it has one
    saving         the format, the position, the model, the optimizer, h and h0 as one flat dict
                   of arrays (atomic .npz, no pickles); a loaded state is checked whole first

A rule (`Rule`) supplies only what differs between methods: its settings, when an update is due,
how a piece of the stream runs and what it keeps, each update's gradient, and its own state.

    rule                 updates after steps             gradient                   file
    TruncationRule       k1, 2 k1, ... (flush: the end)  the window (5.2)-(5.3)     tbptt.py
    RTRLRule, UORORule   k1, 2 k1, ... and the end       the influence (8.3)-(8.10) rtrl.py, uoro.py
    ARTBPRule            every random cut and the end    compensated windows (8.11) artbp.py

The protocol a rule follows, and the view of the shell it gets, are in rule.py.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..checks import is_real, prefixed, with_prefix
from ..errors import InputError, NonFiniteError
from ..files import atomic_write
from ..inputs import OneHot
from ..schedule import Truncation
from . import fast
from .batch import Batch, check_batch, check_h0, dense_inputs
from .elman import ElmanRNN, Trajectory, forward_loss
from .functions import LOSSES
from .optim import SGD, Adam, clipped_step
from .rule import Rule
from .tbptt import TruncationRule

REDUCTIONS = ("sum", "mean")

Array = np.ndarray


class TBPTT:
    """Train an ElmanRNN online on a stream of chunks: with TBPTT(k1, k2), or with another
    method's rule (tbptt.RTRL, tbptt.UORO and tbptt.ARTBP build this trainer with theirs).

    Args:
        model: the ElmanRNN to train. It is trained in place, as torch.optim trains a module:
            after each update (and after load) `model.A` (and B, C, b, c) is the new value, and
            `self.model` is `model`. The new values are new arrays: an array read from the model
            earlier (`A = model.A`) keeps the value it had.
        truncation: the schedule (k1, k2, inject, flush), a tbptt.Truncation; or a method's rule
            (tbptt.numpy.trainer.Rule).
        optimizer: tbptt.SGD or tbptt.Adam.
        loss: "l2" or "cross_entropy".
        clip: max global gradient norm per update (None: no clipping).
        h0: the state a stream starts (and restarts) from: (n,) or (batch, n); None means zeros.
        reduction: "sum" (each update differentiates the sum of its injected losses, the
            contract's L) or "mean" (that sum divided by the number of its injected, unmasked
            (step, stream) losses, mask weights summed).

    Feed chunks with `feed(x, y, mask=None, reset=None)`; chunk lengths are free and do not change
    the update times. Call `finish()` at the end of the stream for the last (flush) update.
    """

    def __init__(
        self,
        model: ElmanRNN,
        truncation: object,
        optimizer: SGD | Adam,
        *,
        loss: str = "l2",
        clip: float | None = None,
        h0: Array | None = None,
        reduction: str = "sum",
    ) -> None:
        check_model(model)
        rule = as_rule(truncation)
        check_settings(optimizer, loss, clip, reduction)
        rule.bind(model)
        self.model, self.rule, self.optimizer = model, rule, optimizer
        self.loss, self.clip, self.reduction = loss, clip, reduction
        self._h0_arg = h0
        self.opt_state = optimizer.init(model.params)
        self.h0: Array | None = None  # (batch, n), fixed by the first chunk
        self.h: Array | None = None  # (batch, n) the carried state h_t
        self.t = 0  # steps computed so far: the position in the stream
        self.u_prev = 0  # the last update time (the schedule's phase)
        self.updates = 0
        self.finished = False

    def __repr__(self) -> str:
        return f"TBPTT({self.model!r}, {self.rule!r}, {self.optimizer!r})"

    @property
    def truncation(self) -> Truncation | None:
        """The rule's schedule, if it has one. Setting it between chunks changes k2 from the next
        update on (the update times depend on k1 only: keep k1)."""
        return getattr(self.rule, "truncation", None)

    @truncation.setter
    def truncation(self, value: Truncation) -> None:
        if not isinstance(value, Truncation) or self.truncation is None:
            raise InputError(
                f"truncation must be a tbptt.Truncation replacing this trainer's "
                f"{self.truncation!r}, got {value!r}"
            )
        if value.k1 != self.truncation.k1:
            raise InputError(f"truncation must keep k1={self.truncation.k1}, got k1={value.k1}")
        self.rule.truncation = value  # type: ignore[attr-defined]

    @property
    def batch(self) -> int | None:
        return None if self.h is None else self.h.shape[0]

    @property
    def phase(self) -> int:
        """Steps computed since the last update (0 right after an update)."""
        return self.t - self.u_prev

    # -- the stream -----------------------------------------------------------------------------
    def feed(
        self, x: Array | OneHot, y: Array, mask: Array | None = None, reset: Array | None = None
    ) -> float:
        """Run the next chunk x (T_c, [batch,] m) or tbptt.OneHot, updating where the rule says.

        Returns the chunk's mean loss sum(w l) / sum(w) over its steps and streams (w the mask
        weights, 1 without a mask; 0 when every weight is 0), computed during the forward pass
        with the parameters in force at each step.
        """
        if self.finished:
            raise InputError(
                "feed after finish(): the stream was finished; create a new "
                f"{self.rule.name} to train on another"
            )
        model = self.model
        data = check_chunk(model, self.loss, x, y, mask, reset)
        if self.rule.dense_inputs:
            data = dense_inputs(data, model.dtype)
        T, batch = data.x.shape[:2]
        if self.h is None:
            h0 = np.array(check_h0(self._h0_arg, model.n, batch, model.dtype, T=T))
            self.rule.start(self, h0)  # may refuse (RTRL's size): nothing trained
            self.h0, self.h = h0, h0.copy()
        elif batch != self.batch:
            raise InputError(
                f"x has {batch} streams, but this stream was started with {self.batch}"
            )
        t0, due = self.t, self.rule.due(self, T)
        total, count, start = 0.0, 0.0, 0
        for stop in sorted({u - t0 for u in due} | {T}):  # pieces end where updates are due
            sl = slice(start, stop)
            mask_, reset_ = (None if a is None else a[sl] for a in (data.mask, data.reset))
            traj, l = self.rule.run(self, data.x[sl], data.y[sl], mask_, reset_)
            total += float(l.sum())
            count += (stop - start) * batch if mask_ is None else float(mask_.sum())
            self.h = traj.h[-1].copy()  # the carried state (the rule's buffers may move)
            self.t += stop - start
            if t0 + stop in due:
                self._update(final=False)
            start = stop
        return total / count if count > 0 else 0.0

    def finish(self) -> None:
        """End of stream: the rule's last update (the flush window, the pending contributions,
        the last cut), if there is one."""
        if self.t > self.u_prev and self.rule.final(self):
            self._update(final=True)
        self.finished = True

    def forward(
        self, x: Array | OneHot, y: Array, mask: Array | None, reset: Array | None, hs=None
    ) -> tuple[Trajectory, Array, Array]:
        """Steps t+1..t+len(x) from the carried state with the current parameters: the
        trajectory, l_t (L, batch) and e_t (L, batch, p). hs: a buffer for the states (elman's
        forward). NonFiniteError naming the first step whose state or loss is not finite (6)."""
        assert self.h is not None  # the first chunk set it
        traj, l, e, bad = forward_loss(
            self.model, self.loss, x, y, mask, self.h, reset, self.h0, hs
        )
        if bad >= 0:
            raise NonFiniteError(
                f"the state or loss became non-finite at step {self.t + 1 + bad} (update "
                f"{self.updates + 1}); parameters kept at their last finite values",
                self.t + 1 + bad,
            )
        return traj, l, e

    def _update(self, final: bool) -> None:
        """The rule's gradient, (5)'s mean, clipping and the step, with section 6's checks."""
        grads, count = self.rule.gradient(self, final)  # fresh arrays: the step may reuse them
        # the derivative of sum / N is the derivative / N
        divisor = count if self.reduction == "mean" and count > 0 else 1.0
        self.opt_state = optimizer_update(
            self.model,
            self.optimizer,
            self.opt_state,
            grads,
            self.clip,
            self.t,
            self.updates,
            divisor,
            batch=len(self.h) if self.h is not None else 1,
        )
        self.u_prev, self.updates = self.t, self.updates + 1
        self.rule.updated(self)

    # -- saving ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Array]:
        """Everything needed to continue exactly: the position, parameters, optimizer, carried
        state, and the rule's settings and state (kept steps, influence, random state), as a flat
        dict of arrays (np.savez-ready, no pickling)."""
        out: dict[str, Array] = {"format": np.asarray(self.rule.format)}
        out.update(self.rule.state_dict(self))
        out["t"], out["updates"] = np.asarray(self.t), np.asarray(self.updates)
        out.update(with_prefix("model.", self.model.params))
        out.update(with_prefix("opt.", {k: np.asarray(v) for k, v in self.opt_state.items()}))
        if self.h is not None and self.h0 is not None:
            out["h"], out["h0"] = self.h, self.h0
        return out

    def load_state_dict(self, state: dict[str, Array]) -> None:
        """Restore what state_dict saved, after checking all of it: it must come from a trainer
        like this one (the same method, settings and parameter shapes); InputError if not, and
        then nothing has changed."""
        fmt = self.rule.format
        if not isinstance(state, dict) or str(state.get("format", "")) != fmt:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise InputError(
                f"state must be a {fmt!r} dict from {self.rule.name}.state_dict(), got {got!r}"
            )
        try:
            t, updates = int(state["t"]), int(state["updates"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"the saved state is incomplete or damaged ({exc})") from None
        check_saved_params(state, self.model, ("model.", *self.rule.saved_floats))
        h, n = state.get("h"), self.model.n
        if h is not None and (np.ndim(h) != 2 or np.shape(h)[1] != n):
            raise InputError(f"the saved state h has shape {np.shape(h)}; expected (batch, {n})")
        u_prev, restore = self.rule.read(state, self)
        if not (0 <= u_prev <= t and updates >= 0):
            raise InputError(f"the saved position is inconsistent (t={t}, u_prev={u_prev})")
        # checked: now change this trainer
        self.model.rebind({k: np.array(v) for k, v in prefixed(state, "model.").items()})
        self.opt_state = {k: np.array(v) for k, v in prefixed(state, "opt.").items()}
        self.t, self.u_prev, self.updates = t, u_prev, updates
        self.h = None if h is None else np.array(h)
        self.h0 = None if h is None else np.array(state["h0"])
        restore()

    def save(self, path: str | os.PathLike) -> None:
        """Write state_dict() to an .npz file atomically (tbptt.files.atomic_write)."""
        state = self.state_dict()
        atomic_write(path, lambda fh: np.savez(fh, **state))  # pyright: ignore[reportArgumentType]

    def load(self, path: str | os.PathLike) -> None:
        """Load what save() wrote (no pickled objects are read); InputError naming the file if it
        is missing, damaged or from another kind of trainer."""
        path = os.fspath(path)
        kind = f"tbptt.{self.rule.name}"
        try:
            with np.load(path, allow_pickle=False) as data:
                state = {k: data[k] for k in data.files}
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except Exception as exc:  # a truncated zip, a foreign format, an object array
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "pickle" in first:
                first = "it holds Python objects, not only arrays"
            raise InputError(f"{path} is damaged or not a {kind} state ({first})") from None
        try:
            self.load_state_dict(state)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None


def as_rule(truncation: object) -> Rule:
    """A Truncation as the truncation rule (tbptt.py); a rule as it is."""
    if isinstance(truncation, Truncation):
        return TruncationRule(truncation)
    if all(hasattr(truncation, k) for k in ("due", "run", "gradient", "format")):
        return truncation  # type: ignore[return-value]
    raise InputError(f"truncation must be a tbptt.Truncation, got {type(truncation).__name__}")


# -- settings -----------------------------------------------------------------------------------
def check_model(model: object) -> None:
    if not isinstance(model, ElmanRNN):
        raise InputError(f"model must be a tbptt.ElmanRNN, got {type(model).__name__}")


def check_settings(optimizer: object, loss: object, clip: object, reduction: object) -> None:
    """InputError naming the first bad one of optimizer, loss, clip, reduction."""
    if not isinstance(optimizer, SGD | Adam):
        raise InputError(
            f"optimizer must be tbptt.SGD or tbptt.Adam, got {type(optimizer).__name__}"
        )
    if loss not in LOSSES:
        raise InputError(f"loss must be 'l2' or 'cross_entropy', got {loss!r}")
    if clip is not None and (not is_real(clip) or not 0 < clip < np.inf):  # type: ignore[operator]
        raise InputError(f"clip must be a positive finite number or None, got {clip!r}")
    if reduction not in REDUCTIONS:
        raise InputError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def check_chunk(model: ElmanRNN, loss: str, x, y, mask, reset) -> Batch:
    """A chunk fed to a trainer, checked against its model and loss (batch.check_batch):
    x, y, mask, reset as (T, batch, ...) arrays of the model's dtype."""
    return check_batch(
        x, y, m=model.m, p=model.p, dtype=model.dtype, loss=loss, g=model.g, mask=mask, reset=reset
    )


# -- one update ---------------------------------------------------------------------------------
def optimizer_update(
    model: ElmanRNN,
    optimizer: SGD | Adam,
    opt_state: dict,
    grads: dict[str, Array],
    clip: float | None,
    u: int,
    updates: int,
    divisor: float = 1.0,
    batch: int = 1,
) -> dict:
    """Divide `grads` (fresh arrays, which the optimizer may overwrite) by divisor ((5)'s mean),
    clip and apply them at the update after step u; point the model at the new parameters and
    return the new optimizer state.

    NonFiniteError, with the parameters untouched, when the gradient or the new parameters are not
    finite (SEMANTICS.md 6). With numba installed, the update of a trainer of `batch` = 1 stream
    is one compiled call (fast.optimizer_step) instead of a few calls per parameter.
    """
    step = fast.optimizer_step(batch) or clipped_step  # compiled for `batch` streams, or numpy
    norm, params, new_state = step(optimizer, model.params, grads, opt_state, clip, divisor)
    if not math.isfinite(norm):  # look for the culprit only now
        for k, g in grads.items():
            if not np.isfinite(g).all():
                raise NonFiniteError(
                    f"the gradient of {k} became non-finite at the update after step {u} "
                    f"(update {updates + 1}); parameters kept at their last finite values",
                    u,
                )
    if params is None:
        raise NonFiniteError(
            f"the parameters became non-finite at the update after step {u} "
            f"(update {updates + 1}); kept at their last finite values",
            u,
        )
    model.rebind(params)  # checked finite just above; the old arrays stay untouched
    return new_state


# -- what rules check in a saved state ----------------------------------------------------------
def check_saved_params(
    state: dict[str, Array], model: ElmanRNN, prefixes: tuple[str, ...] = ("model.",)
) -> None:
    """InputError unless the saved model.* arrays have this model's names, shapes and dtype (and
    every float array under `prefixes` has its dtype; scalars are counters, any float)."""
    mine = {k: v.shape for k, v in model.params.items()}
    got = {k: np.shape(v) for k, v in prefixed(state, "model.").items()}
    if got != mine:
        raise InputError(f"the saved parameters have shapes {got}; this model's are {mine}")
    dtype = model.dtype
    for k, v in state.items():
        a = np.asarray(v)
        if k.startswith(prefixes) and a.ndim and a.dtype.kind == "f" and a.dtype != dtype:
            raise InputError(f"the saved {k} is {a.dtype}; this model is {dtype}")
