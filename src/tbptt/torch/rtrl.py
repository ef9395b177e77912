"""Online RTRL for small PyTorch recurrent modules (Williams and Zipser 1989; SEMANTICS.md 8; the
numpy twin: numpy/rtrl.py).

Each stream carries the influence J_t = dh_t/dtheta (n x |theta|, h the flattened state: an
LSTM's (h, c) as one vector; theta the parameters h_t depends on), zero at the start and zeroed at
a reset. Step t, with the derivatives of forward.py (8.15):

    (8.16)  contribution   dl_t/dtheta|_{h_{t-1} fixed} + (dl_t/dh_{t-1})^T J_{t-1}
    (8.3)   J_t = (dF/dh) J_{t-1} + dF/dtheta
            dF/dh (n x n): torch.func.jvp along the n axes of h (vmap), for all streams at once;
            dF/dtheta (n x |theta|): torch.func.jacrev per stream (vmap)

Frozen (parameters unchanged), the summed contributions are the chain rule of exact BPTT summed in
the other order: equal to it to rounding. Cost per step and stream: 2 n^2 |theta| flops for the
product, n jvps and n vjps of the module's step; memory: J, dF/dtheta and the product, three
times batch x n x |theta| entries. A model whose J does not fit in max_bytes is refused at the
first step (before anything is trained) by a one-line InputError giving the size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import jacrev, vmap

from ..errors import InputError
from ..numpy.rtrl import MAX_BYTES
from . import state as st
from .driver import TBPTT, LossFn, shell_options
from .forward import ForwardRule
from .modules import l2_loss

if TYPE_CHECKING:
    from .rule import Shell

Tensor = torch.Tensor


def RTRL(  # noqa: N802  (the trainer's name)
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    k1: int = 1,
    max_bytes: float = MAX_BYTES,
    loss_fn: LossFn = l2_loss,
    clip: float | None = None,
    scheduler: object | None = None,
    batch_first: bool = False,
    state0: st.State | None = None,
    process_group: object | None = None,
    reduction: str = "sum",
) -> TBPTT:
    """Train a small recurrent nn.Module online with RTRL, one step at a time, updating every k1
    steps (k1 = 1: Williams and Zipser's real-time learning).

    Args:
        model: called as model(x, state) -> (output, new_state), one step at a time; it must be
            deterministic (dropout off).
        optimizer: any torch.optim optimizer over the model's parameters.
        k1: steps between updates.
        max_bytes: the largest memory allowed for J and its two companions (1 GiB); more is a
            one-line InputError at the first step, giving the size.
        loss_fn, clip, scheduler, batch_first, state0, process_group, reduction: as
            tbptt.torch.TBPTT.

    feed, finish, predict, save, load, state_dict, load_state_dict, state, t, updates: as
    tbptt.torch.TBPTT. Returns a tbptt.torch.TBPTT holding RTRL's rule (RTRLRule, .rule);
    rule.influence: {"J": (batch, n, |theta|)}; rule.recurrent: theta's names.
    """

    return TBPTT(model, RTRLRule(k1=k1, max_bytes=max_bytes), optimizer, **shell_options(locals()))


class RTRLRule(ForwardRule):
    """RTRL's rule: J carried forward (8.3), each step's contribution (8.16) summed."""

    name = "RTRL"

    def __init__(self, *, k1: int = 1, max_bytes: float = MAX_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int | float) or max_bytes <= 0:
            raise InputError(f"max_bytes must be a positive number, got {max_bytes!r}")
        super().__init__(k1)
        self.max_bytes = max_bytes

    def bind(self, shell: Shell) -> None:
        """A model whose J would not fit for one stream is refused now, when its structure says
        so (expected_size)."""
        super().bind(shell)
        known = expected_size(shell.model)
        if known is not None:
            like = next((p for p in shell.model.parameters() if p.is_floating_point()), None)
            assert like is not None  # the shell has parameters that require grad: floating ones
            check_size(1, *known, like.dtype, like.element_size(), self.max_bytes)

    def _allocate(self, shell: Shell, batch: int, n: int, size: int) -> dict[str, Tensor]:
        """J at zero, after checking that it fits (InputError giving the size if not)."""
        like = next(iter(shell.params.values()))
        check_size(batch, n, size, like.dtype, like.element_size(), self.max_bytes)
        return {"J": torch.zeros(batch, n, size, dtype=like.dtype, device=like.device)}

    def _influence_step(self, shell: Shell, x: Tensor, v: Tensor, dl_dh: Tensor, P: dict):
        """(8.16) and (8.3) for every stream; returns the second term of (8.16) summed."""
        assert self.influence is not None  # _start allocated it at the first step
        J = self.influence["J"]  # (batch, n, |theta|)
        batch, n, _ = J.shape
        g = torch.einsum("bs,bsp->p", dl_dh, J)  # (|theta|,)
        basis = torch.eye(n, dtype=v.dtype, device=v.device)[:, None].expand(n, batch, n)
        Jh = vmap(lambda e: self._jvp(shell, P, x, v, e))(basis)  # (n_in, batch, n_out)
        F, names = self._per_stream(shell, P), self.recurrent
        assert names is not None  # the first step (_start) found theta
        theta = {k: P[k] for k in names}

        def one(xj: Tensor, vj: Tensor) -> Tensor:  # dF/dtheta of one stream, (n, |theta|)
            jac = jacrev(lambda th: F(xj, vj, th))(theta)
            return torch.cat([jac[k].reshape(n, -1) for k in names], 1)

        dF = vmap(one, in_dims=(1 - shell.tdim, 0))(x, v)  # (batch, n, |theta|)
        J.copy_(torch.baddbmm(dF, Jh.permute(1, 2, 0), J))  # (8.3)
        return g


def size_text(n: float) -> str:
    """Bytes in the largest unit that keeps the number >= 1: '54 KiB', '1.5 GiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            v = n / scale
            return f"{v:,.1f} {unit}" if v < 10 else f"{v:,.0f} {unit}"
    return f"{n:,.0f} bytes"


def check_size(
    batch: int, n: int, size: int, dtype: torch.dtype, itemsize: int, max_bytes: float
) -> None:
    """InputError, giving the size, when J and its two companions exceed max_bytes."""
    entries = batch * n * size
    need = 3 * entries * itemsize
    if need > max_bytes:
        raise InputError(
            f"RTRL's influence matrix J = dh/dtheta needs batch x state x |theta| = {batch} x "
            f"{n} x {size:,} = {entries:,} entries, {size_text(need)} with its two companions "
            f"in {dtype}, more than max_bytes = {size_text(max_bytes)}; use UORO or ARTBP, a "
            "smaller model or fewer streams, or raise max_bytes"
        )


def expected_size(model: nn.Module) -> tuple[int, int] | None:
    """(state entries per stream, |theta|) where the model's structure tells them before it
    runs: the seed's ElmanRNN (theta = A, B, b) and Recurrent around nn.RNN, nn.GRU, nn.LSTM
    (theta = the rnn's parameters); None for other modules (the first step tells)."""
    from torch.nn.parallel import DistributedDataParallel

    from .modules import ElmanRNN, Recurrent

    if isinstance(model, DistributedDataParallel):
        model = model.module
    if isinstance(model, ElmanRNN):
        return model.n, model.n * (model.n + model.m + (model.b is not None))
    if isinstance(model, Recurrent) and isinstance(model.rnn, nn.RNNBase):
        rnn = model.rnn
        h = rnn.proj_size if getattr(rnn, "proj_size", 0) else rnn.hidden_size
        c = rnn.hidden_size if isinstance(rnn, nn.LSTM) else 0
        n = rnn.num_layers * (2 if rnn.bidirectional else 1) * (h + c)
        return n, sum(p.numel() for p in rnn.parameters() if p.requires_grad)
    return None
