"""Online ARTBP for any PyTorch recurrent module (SEMANTICS.md 8; the numpy twin: artbp_online.py).

Possible cuts lie at the boundaries after steps b, 2b, 3b, ... of the stream. At the boundary after
step tau the cut falls with probability c_L, L = tau - (the previous cut, or 0), one uniform number
per boundary in order, drawn once for all streams and all processes: tbptt.artbp.Cuts on a numpy
Generator, so a seed gives the numpy engine's cuts. The stream is cut into segments at every
possible boundary (and at chunk ends); a segment is one module call with the live parameters, and
every step of a window ran with the same values, since updates fall only at cuts. Inside a window
the state passes from one segment to the next attached; across a possible boundary tau that was
not cut it passes through Scale, the identity whose backward multiplies the gradient by the
compensation:

    (8.11)  dL/dh_tau  <-  w_tau dL/dh_tau,   w_tau = 1 / (1 - c_L)   (uncut boundary tau)

At a cut after step u, and at finish() (the end of the stream is a cut), the window's losses are
backpropagated to the previous cut in one backward() and the optimizer steps:

    (8.14)  theta <- optimizer(theta, g^W),   W = (previous cut, u]

A contribution crossing the uncut boundaries tau_1..tau_k survives with probability
prod (1 - c_L) and is weighted by prod 1 / (1 - c_L): E[g^W summed] = exact BPTT. c = 0 is one
window over the whole stream (exact BPTT); c = 1 with b = k is TBPTT(k, k) with flush.

This is the chained path of tbptt.torch.TBPTT (driver.py) with random windows: ARTBP is that
driver with its schedule methods replaced (the window due at step t, its start, the steps kept,
the link across a boundary, the schedule's saved state), so segments, resets, masks, the loss
and gradient checks, clipping, the scheduler, amp, checkpointing, save/load (the kept segments
are run again on load, the links scaled again) and several processes (one collective per update;
every process draws the same cuts from the same generator state) are the driver's. No step is
computed twice. The memory between cuts is not bounded: biased_max_length forces a cut where a
window would grow longer, which makes the estimate biased, as its name says.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..checks import check_int
from ..errors import InputError
from ..generators import as_generator
from ..numpy.artbp import Cuts, Probability, check_c, check_max_length, probability
from ..schedule import Truncation, Window
from . import draws
from . import state as st
from .driver import TBPTT, LossFn
from .modules import l2_loss

Tensor = torch.Tensor
FORMAT = "tbptt.torch.ARTBP/1"


class Scale(torch.autograd.Function):
    """The identity forward; backward, the gradient times w (8.11)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: float) -> Tensor:  # noqa: D102
        ctx.w = w
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return g * ctx.w, None


class ARTBP(TBPTT):
    """Train a recurrent nn.Module online with ARTBP (Tallec and Ollivier 2017): an update at
    every random cut, the gradient compensated across the boundaries that were not cut.

    Args:
        model: called as model(x, state) -> (output, new_state), as for tbptt.torch.TBPTT.
        optimizer: any torch.optim optimizer over the model's parameters.
        c: the probability of a cut at a possible boundary, a number in [0, 1] or a callable of
            L, the steps since the last cut (c = 0: one update at the end, exact BPTT).
        b: cuts may fall after steps b, 2b, ... (the segments are b steps long).
        rng: a seed, a numpy Generator or None (fresh entropy; with several processes, rank 0's
            is sent to the others) for the cuts. Its state is saved with the driver, so a resumed
            run draws the same cuts; the same seed gives tbptt.ARTBP's cuts.
        biased_max_length: also cut where a window would grow longer than this many steps, to
            bound memory; the gradient estimate is then biased.
        loss_fn, clip, scheduler, batch_first, amp, checkpoint, state0, process_group,
            reduction: as tbptt.torch.TBPTT (reduction="mean" divides each update by the number
            of its window's unmasked losses).

    `truncation` is the grid of possible cuts, Truncation(b, b, flush=True): what c = 1 trains.
    feed, finish, predict, save, load, state_dict, load_state_dict, state, t, updates: as
    tbptt.torch.TBPTT.
    """

    FORMAT = FORMAT

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        c: Probability,
        b: int = 1,
        rng: int | np.random.Generator | None = None,
        biased_max_length: int | None = None,
        loss_fn: LossFn = l2_loss,
        clip: float | None = None,
        scheduler: object | None = None,
        batch_first: bool = False,
        amp: bool | torch.dtype = False,
        checkpoint: bool = False,
        state0: st.State | None = None,
        process_group: object | None = None,
        reduction: str = "sum",
    ) -> None:
        c = check_c(c)
        b = check_int("b", b)
        max_length = check_max_length(biased_max_length, b)
        if callable(c):  # a bad callable is told now, not after hours of training
            for L in range(b, 17 * b, b):
                probability(c, L)
        self.rng = as_generator(rng)
        self.b, self.max_length = b, max_length
        self.cuts = Cuts(c, b, self.rng, max_length)
        self._fresh = rng is None  # with several processes, rank 0's entropy for all
        self._weights: dict[int, float] = {}  # w_tau at the current window's uncut boundaries
        self._loaded: dict | None = None  # a checked saved schedule, restored by load
        super().__init__(
            model,
            Truncation(b, b, inject="new", flush=True),
            optimizer,
            loss_fn=loss_fn,
            clip=clip,
            scheduler=scheduler,
            batch_first=batch_first,
            amp=amp,
            checkpoint=checkpoint,
            state0=state0,
            process_group=process_group,
            reduction=reduction,
        )
        draws.share(self._comm, self.rng, self._fresh)

    @property
    def c(self) -> Probability:
        return self.cuts.c

    # -- the schedule (driver.py's schedule methods) ------------------------------------------
    def _due(self, t: int) -> Window | None:
        """Draw the possible boundary after step t (if t is a multiple of b): a cut ends the
        window there; otherwise its weight w_t is kept for the link (8.11)."""
        if t % self.b:
            return None
        cuts, weights = self.cuts.decide(t - 1, t)  # one uniform number: the boundary after t
        if not cuts:
            self._weights.update(weights)
            return None
        self._weights.clear()  # the links of this window are built; the next starts afresh
        return Window(s=self.u_prev + 1, i=self.u_prev + 1, u=t)

    def _final_window(self) -> Window | None:
        """The end of the stream is a cut."""
        if self.t <= self.u_prev:
            return None
        return Window(s=self.u_prev + 1, i=self.u_prev + 1, u=self.t)

    def _window_start(self) -> int:
        return self.u_prev + 1

    def _oldest_kept(self) -> int:
        return self.u_prev + 1

    def _link(self, t0: int, state: st.State) -> st.State:
        """Across an uncut possible boundary after step t0 - 1, the state passes through Scale."""
        w = self._weights.get(t0 - 1, 1.0)
        if w == 1.0:  # a chunk end, or c_L = 0
            return state
        return st.tree_map(lambda v: Scale.apply(v, w) if v.requires_grad else v, state)

    def _settings_saved(self) -> dict:
        c = "callable" if callable(self.c) else self.c
        return {"c": c, "b": self.b, "biased_max_length": self.max_length}

    def _schedule_settings(self) -> dict[str, int]:
        """b, c (its float64 bits), biased_max_length and the generator's state (a hash; 0 when
        fresh entropy, which rank 0 then sends), shared by every process."""
        return {
            "b": self.b,
            "c (float64 bits)": -1 if callable(self.c) else draws.float_bits(self.c),
            "biased_max_length": self.max_length or 0,
            "the cuts' random state": draws.digest(self.rng, self._fresh),
        }

    def _schedule_state(self) -> dict:
        steps = sorted(self._weights)
        return {
            "artbp": {
                **self._settings_saved(),
                "rng": draws.saved(self.rng),
                "last_cut": self.cuts.last,
                "weight_steps": steps,
                "weights": [self._weights[k] for k in steps],
            }
        }

    def _check_schedule(self, sd: dict) -> None:
        """The saved run had these settings; its random state and weights are readable."""
        saved = sd.get("artbp")
        if not isinstance(saved, dict):
            raise InputError("the saved state has no ARTBP schedule (damaged)")
        for k, v in self._settings_saved().items():
            if saved.get(k) != v:
                raise InputError(f"the saved run had {k}={saved.get(k)!r}, this driver {v!r}")
        rng = draws.restored(self.rng, saved.get("rng"))
        try:
            weights = dict(
                zip(map(int, saved["weight_steps"]), map(float, saved["weights"]), strict=True)
            )
            last = int(saved["last_cut"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"the saved ARTBP schedule is damaged ({exc})") from None
        if not (0 <= last <= int(sd["u_prev"]) <= int(sd["t"])):
            raise InputError(
                f"the saved position is inconsistent (t={sd['t']}, last cut={last}, "
                f"last update={sd['u_prev']})"
            )
        self._loaded = {"state": rng, "last": last, "weights": weights}

    def _restore_schedule(self, sd: dict) -> None:
        loaded, self._loaded = self._loaded, None
        self.rng.bit_generator.state = loaded["state"]
        self.cuts.last = loaded["last"]
        self._weights = loaded["weights"]
