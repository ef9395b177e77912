"""Online UORO for any PyTorch recurrent module (Tallec and Ollivier 2017; SEMANTICS.md 8, in the
paper's form; the numpy twin: numpy/uoro.py).

Each stream carries a rank-one estimate J_{t-1} ~ s~_{t-1} theta~_{t-1}^T of dh_{t-1}/dtheta
(s~ in R^n over the flattened state, an LSTM's (h, c) as one vector; theta~ over theta, the
parameters h_t depends on; both zero at the start and zeroed at a reset). Step t, with the
derivatives of forward.py (8.15):

    (8.5)  contribution   (dl_t/dh_{t-1} . s~_{t-1}) theta~_{t-1} + dl_t/dtheta|_{h_{t-1} fixed}
    (8.6)  nu_t in {-1, +1}^n fresh signs;  nu_t^T dF/dtheta   torch.func.vjp, per stream (vmap)
    (8.7)  s~_t = rho0 (dF/dh) s~_{t-1} + rho1 nu_t            (dF/dh) s~_{t-1}: torch.func.jvp
           theta~_t = theta~_{t-1} / rho0 + nu_t^T dF/dtheta / rho1
    (8.8)  rho0 = sqrt((||theta~_{t-1}|| + eps) / (||(dF/dh) s~_{t-1}|| + eps))
    (8.9)  rho1 = sqrt((||nu_t^T dF/dtheta|| + eps) / (||nu_t|| + eps)),   eps = 1e-7

E[s~_t theta~_t^T] = J_t, so the summed contributions are an unbiased estimate of exact BPTT.
theta~ is kept as kappa Theta with a scalar kappa per stream (as numpy/uoro.py does): the
division by rho0 is then a scalar update, Theta changes by one pass per step, and kappa is folded
into Theta when it leaves a safe range.
The signs are drawn from a numpy Generator as tbptt.UORO draws them (draws.py): a seed gives the
numpy engine's signs for the seed's model. Cost per step and stream: the module's step about
four times (forward, backward, a jvp, a vjp per stream) and O(|theta| + n) for s~ and theta~.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.linalg import vector_norm

from ..errors import InputError
from ..generators import as_generator
from ..numpy.uoro import EPS
from . import draws
from . import state as st
from .driver import TBPTT, LossFn, shell_options
from .forward import ForwardRule
from .modules import l2_loss

if TYPE_CHECKING:
    from .rule import Shell

Tensor = torch.Tensor
KAPPA_RANGE = {torch.float64: 1e100, torch.float32: 1e15}  # fold kappa into Theta beyond


def UORO(  # noqa: N802  (the trainer's name)
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    k1: int = 1,
    rng: int | np.random.Generator | None = None,
    eps: float = EPS,
    loss_fn: LossFn = l2_loss,
    clip: float | None = None,
    scheduler: object | None = None,
    batch_first: bool = False,
    state0: st.State | None = None,
    process_group: object | None = None,
    reduction: str = "sum",
) -> TBPTT:
    """Train a recurrent nn.Module online with UORO (Tallec and Ollivier 2017), one step at a
    time, updating every k1 steps.

    Args:
        model: called as model(x, state) -> (output, new_state), one step at a time; it must be
            deterministic (dropout off).
        optimizer: any torch.optim optimizer over the model's parameters.
        k1: steps between updates (1: every step, as in the paper).
        rng: a seed, a numpy Generator or None (fresh entropy; with several processes, rank 0's)
            for the signs nu_t; saved with the driver, so a resumed run draws the same signs.
        eps: the eps of rho0 and rho1 (8.8)-(8.9).
        loss_fn, clip, scheduler, batch_first, state0, process_group, reduction: as
            tbptt.torch.TBPTT.

    feed, finish, predict, save, load, state_dict, load_state_dict, state, t, updates: as
    tbptt.torch.TBPTT. Returns a tbptt.torch.TBPTT holding UORO's rule (UORORule, .rule);
    rule.influence: {"s": s~ (batch, n), "theta": Theta (batch, |theta|), "kappa": (batch,)},
    theta~ = kappa Theta; rule.recurrent: the names of theta's parameters, in order.
    """

    return TBPTT(model, UORORule(k1=k1, rng=rng, eps=eps), optimizer, **shell_options(locals()))


class UORORule(ForwardRule):
    """UORO's rule: the rank-one influence s~ theta~^T carried forward (8.5)-(8.9), each step's
    contribution summed."""

    name = "UORO"

    def __init__(
        self, *, k1: int = 1, rng: int | np.random.Generator | None = None, eps: float = EPS
    ) -> None:
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < np.inf:
            raise InputError(f"eps must be a positive number, got {eps!r}")
        self.rng, self.fresh, self.eps = as_generator(rng), rng is None, float(eps)
        super().__init__(k1)
        self.streams_checked = False

    def bind(self, shell: Shell) -> None:
        super().bind(shell)
        draws.share(shell.comm, self.rng, self.fresh)
        self.streams_checked = shell.comm is None

    def settings(self, shell: Shell) -> dict[str, int]:
        return {
            **super().settings(shell),
            "eps (float64 bits)": draws.float_bits(self.eps),
            "the signs' random state": draws.digest(self.rng, self.fresh),
        }

    def _allocate(self, shell: Shell, batch: int, n: int, size: int) -> dict[str, Tensor]:
        like = next(iter(shell.params.values()))
        zeros = lambda *shape: torch.zeros(shape, dtype=like.dtype, device=like.device)  # noqa: E731
        return {"s": zeros(batch, n), "theta": zeros(batch, size), "kappa": zeros(batch) + 1}

    def _signs(self, shell: Shell, batch: int, n: int, like: Tensor) -> Tensor:
        """nu_t (8.6) of this process's streams, from the draws for every stream of every
        process (one uniform number per sign, as tbptt.numpy.uoro's signs)."""
        comm = shell.comm
        rank, world = (0, 1) if comm is None else (comm.rank, comm.world)
        if not self.streams_checked:  # the signs are split by equal shares of the streams
            assert comm is not None  # with one process bind marked the streams checked
            ((lo, hi),) = comm.spread([batch], "the check of the streams per process")
            if lo != hi:
                raise InputError(
                    f"UORO on several processes needs the same number of streams on each, got "
                    f"{lo} to {hi}"
                )
            self.streams_checked = True
        u = self.rng.random((world * batch, n))[rank * batch : (rank + 1) * batch]
        return torch.from_numpy(np.where(u < 0.5, -1.0, 1.0)).to(like)

    def _restart_influence(self, rows: Tensor) -> None:
        assert self.influence is not None  # the caller restarts an allocated influence only
        for k in ("s", "theta"):
            self.influence[k][rows] = 0
        self.influence["kappa"][rows] = 1

    def _influence_step(self, shell: Shell, x: Tensor, v: Tensor, dl_dh: Tensor, P: dict):
        """(8.5)-(8.9) for every stream; returns the first term of (8.5) summed over them.

        theta~ is kept as kappa Theta (a scalar kappa per stream), so that the division by rho0
        is a scalar update and Theta changes once per step, by nu^T dF/dtheta / (rho1 kappa)."""
        assert self.influence is not None  # _start allocated it at the first step
        s, Theta, kappa, eps = (*(self.influence[k] for k in ("s", "theta", "kappa")), self.eps)
        c = (dl_dh * s).sum(1)  # (batch,) dl_t/dh_{t-1} . s~_{t-1}
        g = (c * kappa) @ Theta  # (|theta|,) sum_j c_j theta~_j
        batch, n = s.shape
        nu = self._signs(shell, batch, n, s)  # (batch, n)
        Js = self._jvp(shell, P, x, v, s)  # (batch, n) (dF/dh) s~_{t-1}
        nuF = self._vjp_theta(shell, P, x, v, nu)  # (batch, numel) per parameter: nu^T dF/dtheta
        nuF_norm = torch.stack([vector_norm(a, dim=1) for a in nuF]).square().sum(0).sqrt()
        rho0 = ((kappa * vector_norm(Theta, dim=1) + eps) / (vector_norm(Js, dim=1) + eps)).sqrt()
        rho1 = ((nuF_norm + eps) / (vector_norm(nu, dim=1) + eps)).sqrt()  # (8.8), (8.9)
        s.copy_(rho0[:, None] * Js + rho1[:, None] * nu)  # (8.7)
        kappa.div_(rho0)  # theta~_{t-1} / rho0
        beta = (1 / (rho1 * kappa))[:, None]
        for part, a in zip(Theta.split(self._sizes(shell), 1), nuF, strict=True):
            part.addcmul_(a, beta)  # theta~ += nu^T dF/dtheta / rho1
        bound = KAPPA_RANGE.get(kappa.dtype, 1e15)
        if float(kappa.max()) > bound or float(kappa.min()) < 1 / bound:  # fold kappa in
            Theta.mul_(kappa[:, None])
            kappa.fill_(1)
        return g

    # -- saving ---------------------------------------------------------------------------------
    def state_dict(self, shell: Shell) -> dict:
        return {
            **super().state_dict(shell),
            "uoro": {"eps": self.eps, "rng": draws.saved(self.rng)},
        }

    def read(self, shell: Shell, sd: dict) -> Callable[[], st.State | None]:
        """The saved eps and the signs' random state, then ForwardRule's part."""
        saved = sd.get("uoro")
        if not isinstance(saved, dict):
            raise InputError("the saved state has no UORO settings (damaged)")
        if saved.get("eps") != self.eps:
            raise InputError(
                f"the saved run had eps={saved.get('eps')!r}, this driver {self.eps!r}"
            )
        rng = draws.restored(self.rng, saved.get("rng"))
        restore = super().read(shell, sd)

        def restore_both() -> st.State | None:
            self.rng.bit_generator.state = rng
            return restore()

        return restore_both
