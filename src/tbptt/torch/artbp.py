"""Online ARTBP for any PyTorch recurrent module (SEMANTICS.md 8; the numpy twin: numpy/artbp.py).

Possible cuts lie at the boundaries after steps b, 2b, 3b, ... of the stream. At the boundary after
step tau the cut falls with probability c_L, L = tau - (the previous cut, or 0), one uniform number
per boundary in order, drawn once for all streams and all processes: tbptt.numpy.artbp.Cuts on a
numpy Generator, so a seed gives the numpy engine's cuts. The stream is cut into segments at every
possible boundary (and at chunk ends); a segment is one module call with the live parameters, and
every step of a window ran with the same values, since updates fall only at cuts. Inside a window
the state passes from one segment to the next attached; across a possible boundary tau that was
not cut it passes through Scale, the identity whose backward multiplies the gradient by the
compensation:

    (8.11)  dL/dh_tau  <-  w_tau dL/dh_tau,   w_tau = 1 / (1 - c_L)   (uncut boundary tau)

At a cut after step u, and at finish() (the end of the stream is a cut), the window's losses are
backpropagated to the previous cut in one backward() and the optimizer steps:

    (8.14)  theta <- optimizer(theta, g^W),   W = (previous cut, u]

so E[g^W summed] = exact BPTT (SEMANTICS.md 8). c = 0 is one window over the whole stream (exact
BPTT); c = 1 with b = k is TBPTT(k, k) with flush.

ARTBPRule is the rule tbptt.torch.TBPTT (driver.py) holds: its random schedule (the window due at
a cut, the window's start, the steps kept, the link across an uncut boundary, the schedule's saved
state) over the kept segments of TBPTT's chained path (segments.Segments), so segments, resets,
masks, checkpointing and the rebuild on load (the links scaled again) are theirs, and the loss and
gradient checks, clipping, the scheduler, amp, save/load and several processes (one collective
per update; every process draws the same cuts from the same generator state) the shell's. No step
is computed twice. The memory between cuts is not bounded: biased_max_length forces a cut where a
window would grow longer, which makes the estimate biased, as its name says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..generators import as_generator
from ..numpy.artbp import Cuts, Probability
from ..schedule import Truncation, Window
from . import draws
from . import state as st
from .driver import TBPTT, LossFn, shell_options
from .modules import l2_loss
from .segments import Segments

if TYPE_CHECKING:
    from .rule import Shell

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


def ARTBP(  # noqa: N802  (the trainer's name)
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
) -> TBPTT:
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
    tbptt.torch.TBPTT. Returns a tbptt.torch.TBPTT holding ARTBP's rule (ARTBPRule, .rule).
    """

    schedule = ARTBPRule(c=c, b=b, rng=rng, biased_max_length=biased_max_length)
    return TBPTT(model, schedule, optimizer, **shell_options(locals()))


class ARTBPRule:
    """ARTBP's rule: a possible cut after every b steps, drawn as the steps arrive; an update at
    every cut and at the end, the window since the previous cut backpropagated in one backward()
    through its segments, linked by Scale across the uncut boundaries (8.11)."""

    name = "ARTBP"
    format = FORMAT

    def __init__(
        self,
        *,
        c: Probability,
        b: int = 1,
        rng: int | np.random.Generator | None = None,
        biased_max_length: int | None = None,
    ) -> None:
        self.rng = as_generator(rng)
        self.cuts = Cuts.checked(c, b, self.rng, biased_max_length)
        b, self.b, self.max_length = self.cuts.b, self.cuts.b, self.cuts.max_length
        self.truncation = Truncation(b, b, inject="new", flush=True)  # the grid of possible cuts
        self.segments = Segments(overlap=False)  # the chained path: one graph per window
        self.fresh = rng is None  # with several processes, rank 0's entropy for all
        self.weights: dict[int, float] = {}  # w_tau at the current window's uncut boundaries

    @property
    def c(self) -> Probability:
        return self.cuts.c

    def __repr__(self) -> str:
        return f"ARTBP(c={getattr(self.c, '__name__', self.c)}, b={self.b})"

    def bind(self, shell: Shell) -> None:
        draws.share(shell.comm, self.rng, self.fresh)

    def settings(self, shell: Shell) -> dict[str, int]:
        """b, c (its float64 bits), biased_max_length and the generator's state (a hash; 0 when
        fresh entropy, which rank 0 then sends), shared by every process."""
        return {
            "b": self.b,
            "c (float64 bits)": -1 if callable(self.c) else draws.float_bits(self.c),
            "biased_max_length": self.max_length or 0,
            "the cuts' random state": draws.digest(self.rng, self.fresh),
        }

    # -- the schedule ---------------------------------------------------------------------------
    def boundary(self, shell: Shell) -> int:
        """The next possible cut: segments are the b steps between two of them."""
        return (shell.t // self.b + 1) * self.b

    def run(self, shell: Shell, x, y, mask, reset):
        """A piece as one segment, its graph hanging on the window's since the previous cut."""
        return self.segments.run(shell, x, y, mask, reset, shell.u_prev + 1, self.link)

    def link(self, t0: int, state: st.State) -> st.State:
        """Across an uncut possible boundary after step t0 - 1, the state passes through Scale."""
        w = self.weights.get(t0 - 1, 1.0)
        if w == 1.0:  # a chunk end, or c_L = 0
            return state
        return st.tree_map(lambda v: Scale.apply(v, w) if v.requires_grad else v, state)

    def due(self, shell: Shell) -> Window | None:
        """Draw the possible boundary after step t (if t is a multiple of b): a cut ends the
        window there; otherwise its weight w_t is kept for the link (8.11)."""
        t = shell.t
        if t % self.b:
            return None
        cuts, weights = self.cuts.decide(t - 1, t)  # one uniform number: the boundary after t
        if not cuts:
            self.weights.update(weights)
            return None
        self.weights.clear()  # the links of this window are built; the next starts afresh
        return Window(s=shell.u_prev + 1, i=shell.u_prev + 1, u=t)

    def final(self, shell: Shell) -> Window | None:
        """The end of the stream is a cut."""
        if shell.t <= shell.u_prev:
            return None
        return Window(s=shell.u_prev + 1, i=shell.u_prev + 1, u=shell.t)

    def gradient(self, shell: Shell, w: Window, mean: bool) -> float:
        """(8.11), (8.14): the window's compensated losses in one backward()."""
        self.segments.backward(shell, w)
        return self.segments.count(shell, w) if mean else 0.0

    def after(self, shell: Shell, w: Window | None) -> None:
        self.segments.prune(shell.u_prev + 1)  # the window since the last cut

    def release(self, shell: Shell, finished: bool) -> None:
        self.segments.release(finished)

    # -- saving ---------------------------------------------------------------------------------
    def _settings_saved(self) -> dict:
        c = "callable" if callable(self.c) else self.c
        return {"c": c, "b": self.b, "biased_max_length": self.max_length}

    def state_dict(self, shell: Shell) -> dict:
        """The settings, the generator's state, the last cut, the weights of the window's uncut
        boundaries, and the kept segments (segments.py)."""
        steps = sorted(self.weights)
        schedule = {
            **self._settings_saved(),
            "rng": draws.saved(self.rng),
            "last_cut": self.cuts.last,
            "weight_steps": steps,
            "weights": [self.weights[k] for k in steps],
        }
        return {"artbp": schedule, **self.segments.state_dict(shell)}

    def stream_dims(self, shell: Shell, state: st.State | None, batch: int) -> list[int] | None:
        return shell.stream_dims(state, batch)

    def read(self, shell: Shell, sd: dict) -> Callable[[], st.State | None]:
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
        rebuild = self.segments.read(shell, sd, self.link)

        def restore() -> st.State | None:
            self.rng.bit_generator.state = rng
            self.cuts.last, self.weights = last, weights
            return rebuild()  # the links scaled again with the restored weights

        return restore
