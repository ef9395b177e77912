"""Online UORO for any PyTorch recurrent module (Tallec and Ollivier 2017; SEMANTICS.md 8, in the
paper's form; the numpy twin: numpy/uoro.py).

Each stream carries a rank-one estimate J_{t-1} ~ s~_{t-1} theta~_{t-1}^T of dh_{t-1}/dtheta
(s~ in R^n over the flattened state, an LSTM's (h, c) as one vector; theta~ over theta, the
parameters h_t depends on; both zero at the start and zeroed at a reset). Step t, with the
derivatives of forward.py (8.15):

    (8.5)  contribution   (dl_t/dh_{t-1} . s~_{t-1}) theta~_{t-1} + dl_t/dtheta|_{h_{t-1} fixed}
    (8.6)  nu_t in {-1, +1}^n fresh signs;  nu_t^T dF/dtheta   per stream (forward.py)
    (8.7)  s~_t = rho0 (dF/dh) s~_{t-1} + rho1 nu_t            (dF/dh) s~_{t-1}: with the step
           theta~_t = theta~_{t-1} / rho0 + nu_t^T dF/dtheta / rho1
    (8.8)  rho0 = sqrt((||theta~_{t-1}|| + eps) / (||(dF/dh) s~_{t-1}|| + eps))
    (8.9)  rho1 = sqrt((||nu_t^T dF/dtheta|| + eps) / (||nu_t|| + eps)),   eps = 1e-7

E[s~_t theta~_t^T] = J_t, so the summed contributions are an unbiased estimate of exact BPTT.
theta~ is kept as kappa Theta with a scalar kappa per stream (as numpy/uoro.py does): the
division by rho0 is then a scalar update, Theta changes by one pass per step, and kappa is folded
into Theta when it leaves a safe range.
The signs are drawn from a numpy Generator as tbptt.UORO draws them (draws.py): a seed gives the
numpy engine's signs for the seed's model. Cost per step: for Recurrent around nn.RNN, nn.GRU or
nn.LSTM (cells.py), the step once with its tangent beside it and one backward pass for the
losses' cotangent and nu_t together, plus three passes over Theta (batch x |theta|: the first
term of (8.5), the update, ||Theta_t|| for the next rho0); for any other module, torch.func's
vjp per stream (vmap) on top of the step with its state a forward-mode dual.
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
from .driver import TBPTT, ForwardOptions, passed_on
from .forward import ForwardRule, Step, zero

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's from Python 3.11

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
    **options: Unpack[ForwardOptions],
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

    rule = UORORule(k1=k1, rng=rng, eps=eps)
    return TBPTT(model, rule, optimizer, **passed_on("UORO", options, ForwardOptions))


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
        self.norm: Tensor | None = None  # ||Theta_t|| (batch,), from the last step's update

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
        # non_blocking: from pageable memory the copy is staged at once, without waiting for the
        # device's queue
        return torch.from_numpy(np.where(u < 0.5, -1.0, 1.0)).to(like, non_blocking=True)

    def _direction(self, v: Tensor) -> Tensor:
        """s~_{t-1}: the step's forward pass gives (dF/dh) s~_{t-1} with h_t (zero at the start)."""
        return torch.zeros_like(v) if self.influence is None else self.influence["s"]

    def _cotangents(self, shell: Shell, v: Tensor) -> Tensor:
        """nu_t (1, batch, n) (8.6): the cell's backward pass pulls it back with the losses'."""
        batch, n = v.shape
        return self._signs(shell, batch, n, v)[None]

    def _restart_influence(self, rows: Tensor, device_side: bool) -> None:
        assert self.influence is not None  # the caller restarts an allocated influence only
        for k in ("s", "theta"):
            zero(self.influence[k], rows, device_side)
        zero(self.influence["kappa"], rows, device_side, 1.0)
        if self.norm is not None:
            zero(self.norm, rows, device_side)

    def _influence_step(self, shell: Shell, step: Step) -> Tensor:
        """(8.5)-(8.9) for every stream; returns the first term of (8.5) summed over them.

        theta~ is kept as kappa Theta (a scalar kappa per stream), so that the division by rho0
        is a scalar update and Theta changes once per step, by nu^T dF/dtheta / (rho1 kappa).
        Everything stays on the device: rho0 and rho1 are (batch,) tensors, and kappa is folded
        into Theta where it leaves its range (read on the host only on CPU)."""
        assert self.influence is not None  # _start allocated it at the first step
        assert step.Js is not None  # the step ran along s~_{t-1} (_direction)
        s, Theta, kappa, eps = (*(self.influence[k] for k in ("s", "theta", "kappa")), self.eps)
        norm = self._theta_norm(Theta)  # (batch,) ||Theta_{t-1}||
        c = (step.dl_dh * s).sum(1)  # (batch,) dl_t/dh_{t-1} . s~_{t-1}
        w = c * kappa  # (batch,) c_j kappa_j: sum_j c_j theta~_j = w Theta
        assert step.cot is not None  # _cotangents drew nu_t
        nu = step.cot[0]  # (batch, n)
        Js = step.Js  # (batch, n) (dF/dh) s~_{t-1}
        nuF = self._theta_vjp(shell, step, nu)  # nu^T dF/dtheta per stream
        rho0 = ((kappa * norm + eps) / (vector_norm(Js, dim=1) + eps)).sqrt()
        rho1 = ((nuF.norm() + eps) / (vector_norm(nu, dim=1) + eps)).sqrt()  # (8.8), (8.9)
        s.copy_(rho0[:, None] * Js + rho1[:, None] * nu)  # (8.7)
        kappa.div_(rho0)  # theta~_{t-1} / rho0
        beta = (1 / (rho1 * kappa))[:, None]
        # the passes over Theta one after the other, while it is in the cache: the first term
        # of (8.5), the update, the fold, and ||Theta_t|| for the next step's rho0
        g = w @ Theta  # (|theta|,) sum_j c_j theta~_j
        blocks = list(Theta.split(self._sizes(shell), 1))  # (batch, numel) per parameter
        nuF.add_to(blocks, beta)  # theta~ += nu^T dF/dtheta / rho1
        self._fold(Theta, kappa, self.device_side(shell))
        self.norm = vector_norm(Theta, dim=1)
        return g

    def _theta_norm(self, Theta: Tensor) -> Tensor:
        """||Theta_{t-1}|| (batch,): kept from the previous step (computed after its update);
        computed now after a load or at the first step."""
        norm = self.norm
        if norm is None or norm.shape != Theta.shape[:1]:
            norm = self.norm = vector_norm(Theta, dim=1)
        return norm

    @staticmethod
    def _fold(Theta: Tensor, kappa: Tensor, device_side: bool) -> None:
        """kappa folded into Theta when it leaves its range: on the host's reading, every stream
        (as numpy/uoro.py); device_side, the streams out of range by masked writes."""
        bound = KAPPA_RANGE.get(kappa.dtype, 1e15)
        if not device_side:
            lo, hi = torch.aminmax(kappa)
            if float(hi) > bound or float(lo) < 1 / bound:
                Theta.mul_(kappa[:, None])
                kappa.fill_(1)
            return
        out = (kappa > bound) | (kappa < 1 / bound)  # (batch,)
        Theta.mul_(torch.where(out, kappa, 1)[:, None])
        kappa.masked_fill_(out, 1)

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
            self.norm = None  # of the restored Theta, at the next step
            return restore()

        return restore_both
