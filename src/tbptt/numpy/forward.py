"""What online RTRL and UORO share in the numpy engine: the influence carried forward, an update
every k1 steps (SEMANTICS.md 8). rtrl.py and uoro.py hold their rules (and their frozen
estimates); the trainer shell (trainer.py) holds the rule.

Both run the stream forward from the carried state h with the parameters in force at each step.
Each step's contribution to the gradient, (8.4) for RTRL and (8.5) for UORO, is computed as the step
runs (with that step's parameters) and summed; after every k1-th step the sum of the contributions
since the last update is applied by the optimizer:

    (8.13) theta <- optimizer(theta, sum_{t in (u_prev, u]} g_t),   u = k1, 2 k1, ..., and finish()

The influence (J for RTRL; s~, theta~ for UORO) is carried across updates: J_t = D_t A_t J_{t-1}
+ dF/dtheta|_t with the current A_t, Williams and Zipser's approximation, which makes online RTRL
with k1 = 1 their "real-time" algorithm. finish() applies the contributions since the last update.
No step is kept: memory is the influence alone, whatever k1 and the stream's length.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..checks import check_int, prefixed, with_prefix
from ..errors import InputError
from .elman import ElmanRNN, Trajectory
from .rule import Shell, as_saved, check_saved_setting, damaged

Array = np.ndarray


class ForwardRule:
    """The stream's pending sum and the influence; a method gives allocate (its influence at
    zero, with `arrays()` to save) and contributions (a piece's, advancing the influence)."""

    name = ""  # "RTRL" or "UORO"
    dense_inputs = True
    saved_floats: tuple[str, ...] = ("influence.", "pending.")

    def __init__(self, k1: int) -> None:
        self.k1 = check_int("k1", k1)
        self.pending: dict[str, Array] | None = None  # contributions since the last update
        self.count = 0.0  # their (unmasked) losses, for reduction="mean"
        self.kernel = None  # the influence, allocated by the first chunk

    @property
    def format(self) -> str:
        return f"tbptt.{self.name}/1"

    def __repr__(self) -> str:
        return f"{self.name}(k1={self.k1})"

    # -- what differs between RTRL and UORO ---------------------------------------------------
    def bind(self, model: ElmanRNN) -> None:
        pass

    def allocate(self, model: ElmanRNN, batch: int):
        """The influence of `batch` streams at zero (may refuse: RTRL's size)."""
        raise NotImplementedError

    def contributions(self, model: ElmanRNN, traj: Trajectory, e: Array) -> dict[str, Array]:
        """One piece's summed contributions, advancing self.kernel."""
        raise NotImplementedError

    def settings(self, trainer: Shell) -> dict[str, object]:
        """Saved, and checked on load."""
        return {"k1": self.k1, "loss": trainer.loss, "reduction": trainer.reduction}

    # -- the rule -------------------------------------------------------------------------------
    def start(self, trainer: Shell, h0: Array) -> None:
        self.kernel = self.allocate(trainer.model, len(h0))

    def due(self, trainer: Shell, T: int) -> list[int]:
        """Every k1-th step of the stream among t+1..t+T."""
        k1, t = self.k1, trainer.t
        return list(range((t // k1 + 1) * k1, t + T + 1, k1))

    def run(self, trainer: Shell, x, y, mask, reset) -> tuple[Trajectory, Array]:
        traj, l, e = trainer.forward(x, y, mask, reset)
        grads = self.contributions(trainer.model, traj, e)
        if self.pending is None:
            self.pending = grads
        else:
            for k, g in grads.items():
                self.pending[k] += g
        self.count += len(x) * len(x[0]) if mask is None else float(mask.sum())
        return traj, l

    def gradient(self, trainer: Shell, final: bool) -> tuple[dict[str, Array], float]:
        grads, self.pending = self.pending, None
        return grads, self.count  # type: ignore[return-value]

    def updated(self, trainer: Shell) -> None:
        self.count = 0.0

    def final(self, trainer: Shell) -> bool:
        return self.pending is not None

    # -- saving ---------------------------------------------------------------------------------
    def state_dict(self, trainer: Shell) -> dict[str, Array]:
        """The settings, the phase, the influence of every stream and the pending sum."""
        out = {f"setting.{k}": np.asarray(v) for k, v in self.settings(trainer).items()}
        out["u_prev"], out["count"] = np.asarray(trainer.u_prev), np.asarray(self.count)
        if self.kernel is not None:
            out.update(with_prefix("influence.", self.kernel.arrays()))
        if self.pending is not None:
            out.update(with_prefix("pending.", self.pending))
        return out

    def read(self, state: dict[str, Array], trainer: Shell) -> tuple[int, Callable[[], None]]:
        """Check the saved settings and influence (restored into fresh arrays first: a refused
        state changes nothing); return u_prev and the restore."""
        try:
            for k, v in self.settings(trainer).items():
                check_saved_setting(k, as_saved(v, state[f"setting.{k}"].item()), v)
            u_prev, count = int(state["u_prev"]), float(state["count"])
        except (KeyError, TypeError, ValueError) as exc:
            raise damaged(exc) from None
        h, kernel = state.get("h"), None
        if h is not None and np.ndim(h) == 2:
            kernel = self.allocate(trainer.model, len(h))
            saved = prefixed(state, "influence.")
            for k, a in kernel.arrays().items():
                if k not in saved or np.shape(saved[k]) != a.shape:
                    got = np.shape(saved[k]) if k in saved else "missing"
                    raise InputError(f"the saved influence {k} has shape {got}; expected {a.shape}")
                a[...] = saved[k]
        pending = {k: np.array(v) for k, v in prefixed(state, "pending.").items()}

        def restore() -> None:
            self.pending, self.kernel, self.count = pending or None, kernel, count

        return u_prev, restore
