"""Online RTRL and UORO for any PyTorch recurrent module: the influence carried forward one step
at a time with torch.func (SEMANTICS.md 8; the numpy twins: forward_online.py).

The module runs one step per call, module(x_t, h_{t-1}) -> (output_t, h_t). Its state, a tensor
or a tuple of them (an LSTM's (h, c)), is one vector per stream for the influence: h in R^n,
n the state's entries per stream (FlatState). theta is the parameters that h_t depends on
directly (found at the first step: an LSTM's, not its head's); the others, like C and c of the
seed's model, get their gradient from step t's loss alone. Step t of stream j has

    (8.15)  dl_t/dh_{t-1},  dl_t/dtheta|_{h_{t-1} fixed}     one backward of the batch's losses
            (dF/dh) v                                        torch.func.jvp (the state direction)
            nu^T dF/dtheta                                   torch.func.vjp per stream (vmap)

from which RTRL (rtrl.py) and UORO (uoro.py) form the step's contribution to the gradient,

    (8.16)  g_t = dl_t/dtheta|_{h_{t-1} fixed} + (dl_t/dh_{t-1})^T J_{t-1},   J ~ dh_{t-1}/dtheta

(J exact for RTRL; s~ theta~^T for UORO), and carry J forward. The contributions are summed and
applied every k1 steps, and at finish() (the flush of Truncation(k1, k1, flush=True)):

    (8.13)  theta <- optimizer(theta, sum_{t in (u_prev, u]} g_t)

The influence is carried across updates (Williams and Zipser's approximation). A reset zeroes that
stream's influence and restarts it from state0 (6.1). ForwardMode is tbptt.torch.TBPTT with the
forward pass and the update replaced: chunks, checks, the schedule of updates, clipping, the
scheduler, the non-finite checks, predict and several processes (one collective per update) are
the driver's. Nothing is kept between steps but the influence, the carried state and the sum.

The module must be deterministic (dropout off): each step runs it several times. oneDNN's
recurrent kernels have no forward-mode derivative, so the steps run with oneDNN off.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

from ..errors import InputError
from ..schedule import Truncation, Window
from . import distributed as dd
from . import state as st
from .checks import check_losses
from .driver import TBPTT, LossFn
from .modules import l2_loss

Tensor = torch.Tensor


class FlatState:
    """A state's tensors as one vector per stream, h in R^n, and back (streams first)."""

    def __init__(self, state: st.State, dims: list[int]) -> None:
        leaves = st.leaves(state)
        for t in leaves:
            if not t.is_floating_point():
                raise InputError(
                    f"RTRL and UORO need a floating state; the model's state holds a {t.dtype} "
                    "tensor"
                )
        self.template, self.dims = state, dims
        self.shapes = [tuple(t.movedim(d, 0).shape[1:]) for t, d in zip(leaves, dims, strict=True)]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.n = sum(self.sizes)

    def flat(self, state: st.State) -> Tensor:
        """(batch, n): each stream's tensors, in order."""
        parts = [
            t.movedim(d, 0).reshape(t.shape[d], -1)
            for t, d in zip(st.leaves(state), self.dims, strict=True)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def unflat(self, v: Tensor) -> st.State:
        """The state of the streams v (batch, n)."""
        parts = v.split(self.sizes, 1)
        it = iter(
            p.reshape(v.shape[0], *s).movedim(0, d)
            for p, s, d in zip(parts, self.shapes, self.dims, strict=True)
        )
        return st.tree_map(lambda _: next(it), self.template)


def no_onednn():
    """oneDNN off (its LSTM kernel has no forward-mode derivative nor a vmap rule); the other
    flags untouched."""
    return torch.backends.mkldnn.flags(
        enabled=False, deterministic=None, allow_tf32=None, fp32_precision=None
    )


class ForwardMode(TBPTT):
    """What online RTRL and UORO share: steps one at a time, contributions summed, an update
    every k1 steps. Subclasses give _allocate (the influence at zero) and _influence_step."""

    NAME = ""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        k1: int = 1,
        loss_fn: LossFn = l2_loss,
        clip: float | None = None,
        scheduler: object | None = None,
        batch_first: bool = False,
        state0: st.State | None = None,
        process_group: object | None = None,
        reduction: str = "sum",
    ) -> None:
        super().__init__(
            model,
            Truncation(k1, k1, inject="new", flush=True),
            optimizer,
            loss_fn=loss_fn,
            clip=clip,
            scheduler=scheduler,
            batch_first=batch_first,
            state0=state0,
            process_group=process_group,
            reduction=reduction,
        )
        self.k1 = self.truncation.k1
        self.influence: dict[str, Tensor] | None = None  # per stream, allocated by the first step
        self.recurrent: list[str] | None = None  # the names of theta, found by the first step
        self._flat: FlatState | None = None
        self._sum: dict[str, Tensor] = {}  # the contributions since the last update (8.13)
        self._sum_count = 0.0  # their unmasked losses, for reduction="mean"

    # -- what differs between RTRL and UORO ---------------------------------------------------
    def _allocate(self, batch: int, n: int, size: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def _restart_influence(self, rows: Tensor) -> None:
        """The streams `rows` (batch,) restart: no influence before this step."""
        for a in self.influence.values():
            a[rows] = 0

    def _influence_step(self, x: Tensor, v: Tensor, dl_dh: Tensor, P: dict) -> Tensor:
        """(8.16)'s second term summed over the streams, (|theta|,), and the influence advanced
        to step t. x: the step's input; v (batch, n) h_{t-1}; dl_dh (batch, n); P: the
        parameter values (detached)."""
        raise NotImplementedError

    # -- the step's derivatives (8.15) ----------------------------------------------------------
    def _state_map(self, P: dict, x: Tensor):
        """v (batch, n) -> h_t (batch, n) as one batched module call with the values P."""
        flat = self._flat

        def F(v: Tensor) -> Tensor:
            return flat.flat(functional_call(self.model, P, (x, flat.unflat(v)))[1])

        return F

    def _per_stream(self, P: dict):
        """(x_j, v_j, theta) -> h_t of one stream (n,), for vmap over the streams; x_j without
        its stream axis, theta the values of the names in self.recurrent."""
        flat, axis = self._flat, 1 - self._tdim

        def F(x: Tensor, v: Tensor, theta: dict) -> Tensor:
            state = flat.unflat(v.unsqueeze(0))
            out = functional_call(self.model, {**P, **theta}, (x.unsqueeze(axis), state))[1]
            return flat.flat(out)[0]

        return F

    def _jvp(self, P: dict, x: Tensor, v: Tensor, tangent: Tensor) -> Tensor:
        """(dF/dh) tangent, per stream (batch, n)."""
        return jvp(self._state_map(P, x), (v,), (tangent,))[1]

    def _vjp_theta(self, P: dict, x: Tensor, v: Tensor, nu: Tensor) -> list[Tensor]:
        """nu_j^T dF/dtheta for every stream j, one (batch, numel) tensor per parameter of theta
        (in the order of self.recurrent; not concatenated: a copy of batch x |theta|)."""
        F, names = self._per_stream(P), self.recurrent
        theta = {k: P[k] for k in names}

        def one(xj: Tensor, vj: Tensor, nuj: Tensor) -> dict:
            return vjp(lambda th: F(xj, vj, th), theta)[1](nuj)[0]

        g = vmap(one, in_dims=(1 - self._tdim, 0, 0))(x, v, nu)
        return [g[k].reshape(len(v), -1) for k in names]

    def _sizes(self) -> list[int]:
        """The entries of each parameter of theta, in order."""
        return [self._named[k].numel() for k in self.recurrent]

    # -- the stream (driver.py's forward pass and update, replaced) -----------------------------
    def _forward(self, x: Tensor, y: Tensor, mask: Tensor | None, reset: Tensor | None) -> None:
        td = self._tdim
        with no_onednn():
            for i in range(x.shape[td]):
                cut = lambda a: None if a is None else a.narrow(td, i, 1)  # noqa: E731, B023
                self._step_once(cut(x), cut(y), cut(mask), cut(reset))

    def _step_once(self, x: Tensor, y: Tensor, mask: Tensor | None, reset: Tensor | None) -> None:
        """Step t = self.t + 1 of every stream: (8.15), (8.16), the influence carried."""
        state = self._state
        if state is None:  # the module's zeros, made explicit for the derivatives
            with torch.no_grad():
                state = st.tree_map(torch.zeros_like, self._call(x, None, None)[1])
        if self._flat is None:
            self._flat = FlatState(state, self._dims(state))
        if reset is not None and bool(reset.any()):  # (6.1), and no influence before step t
            row = reset.reshape(-1)
            state = st.restart(state, self.state0, row, self._dims(state))
            if self.influence is not None:
                self._restart_influence(row)
        v = self._flat.flat(state).detach()  # (batch, n) h_{t-1}
        leaf = v.clone().requires_grad_()
        out, new = self._call(x, self._flat.unflat(leaf), None)
        losses = check_losses(self.loss_fn(out, y), x)  # (1, batch) l_t
        if mask is not None:
            losses = losses * mask.to(losses.dtype)
        params = list(self._named.values())
        if self.influence is None:
            self._start(new, params)
        grads = torch.autograd.grad(losses.sum(), [*params, leaf], allow_unused=True)
        dl_dh = grads[-1] if grads[-1] is not None else torch.zeros_like(v)
        P = {k: p.detach() for k, p in self._named.items()}
        try:
            with warnings.catch_warnings():  # torch.func's first jvp scripts its decompositions
                warnings.filterwarnings("ignore", ".*torch.jit.script.*", DeprecationWarning)
                g_theta = self._influence_step(x, v, dl_dh, P)  # (|theta|,)
        except RuntimeError as exc:
            if "random operation" not in str(exc):
                raise
            raise InputError(
                f"{self.NAME} runs the model several times per step, so it must be deterministic, "
                "but it draws random numbers (dropout?): turn them off (model.eval(), dropout=0)"
            ) from None
        for k, g in zip(self._named, grads[:-1], strict=True):
            if g is not None:
                self._add(k, g)
        for k, g in zip(self.recurrent, g_theta.split(self._sizes()), strict=True):
            self._add(k, g.view_as(self._named[k]))
        self._state = st.detach(new)
        self.t += 1
        self._sum_count += float(self.batch) if mask is None else float(mask.sum())
        self._pending.append(losses.detach().sum(dtype=torch.float64))

    def _add(self, k: str, g: Tensor) -> None:
        self._sum[k] = g.detach().clone() if k not in self._sum else self._sum[k].add_(g)

    def _dims(self, state: st.State) -> list[int]:
        return self._state_dims(state, self.batch)

    def _start(self, new: st.State, params: list[Tensor]) -> None:
        """The first step: theta, the parameters h_t depends on (those its graph reaches), and
        the influence at zero."""
        h = self._flat.flat(new)
        got = torch.autograd.grad(h.sum(), params, allow_unused=True, retain_graph=True)
        self.recurrent = [k for k, g in zip(self._named, got, strict=True) if g is not None]
        if not self.recurrent:
            raise InputError(f"the model's state depends on no parameter: nothing for {self.NAME}")
        size = sum(self._named[k].numel() for k in self.recurrent)
        self.influence = self._allocate(self.batch, self._flat.n, size)

    def _update(self, w: Window) -> None:
        """(8.13): the contributions since the last update, summed over the processes."""
        n = self.updates + 1
        if self._comm is None:
            self._check_losses(f"update {n} (after step {w.u}) was not applied", n)
        for k, p in self._named.items():
            p.grad = self._sum.get(k)
        self._sum = {}
        mean = self.reduction == "mean"
        count, self._sum_count = (self._sum_count if mean else 0.0), 0.0
        if self._comm is not None:
            count = self._sync(n, w, count)
        if mean and count > 0:
            for p in self._named.values():
                if p.grad is not None:
                    p.grad.div_(count)
        self._step(n, w)

    # -- saving ---------------------------------------------------------------------------------
    def state_dict(self) -> dict | None:
        """Everything needed to continue exactly, in tensors and plain values (weights_only-safe):
        the model's, optimizer's and scheduler's state_dicts, the position, the carried state and
        the influence of every stream, theta's names, the contributions since the last update
        and the method's random state.

        Several processes: a collective call; rank 0 gets the streams of all processes side by
        side (and the contributions summed over them), the others None.
        """
        pending, count = self._pending_sum()
        state = None
        if self._state is not None:
            state = {"h": self.state, "influence": dict(self.influence or {})}
        sd = {
            **self._common_state(),  # its scaler is None: UORO and RTRL take no amp
            "state": state,
            "recurrent": self.recurrent,
            "pending": pending,
            "pending_count": count,
            "segments": [],
        }
        if self._comm is None:
            return sd
        return self._comm.gather_streams(sd, axis=1 - self._tdim, dims=self._saved_dims(state))

    def _saved_dims(self, state: dict | None) -> list[int] | None:
        """The stream axis of each tensor of a saved state: the carried state's, then 0."""
        if state is None:
            return None
        dims = self._state_dims(state["h"], self.batch or 0)
        return dims + [0] * len(st.leaves(state["influence"]))

    def _pending_sum(self) -> tuple[dict[str, Tensor], float]:
        """The contributions since the last update and their count; with several processes,
        summed over them (one all-reduce per tensor: saving is rare)."""
        pending = {k: v.detach().clone() for k, v in self._sum.items()}
        count = self._sum_count
        if self._comm is None:
            return pending, count
        dist, comm = torch.distributed, self._comm
        for k in self._named:  # every process has the same keys: the same steps, the same model
            if k in pending:
                comm.call(
                    "summing the contributions", dist.all_reduce, pending[k], group=comm.group
                )
        c = torch.tensor([count], dtype=torch.float64, device=comm.device)
        comm.call("summing the contributions", dist.all_reduce, c, group=comm.group)
        return pending, float(c)

    def load_state_dict(self, sd: dict | None) -> None:
        """Restore what state_dict() returned (checked first: nothing changes if it is refused).

        Several processes: a collective call; rank 0's sd is used, each process takes its share
        of the streams, and rank 0 the contributions since the last update.
        """
        if self._comm is not None:
            sd = self._comm.broadcast(sd, "the checkpoint")
            if isinstance(sd, str):  # rank 0 could not read it: the message
                raise InputError(sd)
        self._check_saved(sd)
        B, state = sd["batch"], sd["state"]
        recurrent = sd["recurrent"]
        if recurrent is not None and not set(recurrent) <= set(self._named):
            raise InputError(
                f"the saved run's theta has parameters {recurrent}, this model {list(self._named)}"
            )
        if self._comm is not None and B is not None and state is not None:
            dims = self._state_dims(state["h"], B) + [0] * len(st.leaves(state["influence"]))
            sd = dd.split_streams(sd, self._comm.rank, self._comm.world, 1 - self._tdim, dims)
            B, state = sd["batch"], sd["state"]
        influence = None
        if state is not None and state["influence"]:
            h = state["h"]
            n = FlatState(h, self._state_dims(h, B)).n
            size = sum(self._named[k].numel() for k in recurrent)
            influence = self._allocate(B, n, size)
            for k, a in influence.items():
                got = state["influence"].get(k)
                if got is None or got.shape != a.shape or got.dtype != a.dtype:
                    shape = None if got is None else (tuple(got.shape), got.dtype)
                    raise InputError(
                        f"the saved influence {k} is {shape}; expected {(tuple(a.shape), a.dtype)}"
                    )
                a.copy_(got)
        self._restore_schedule(sd)
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(sd["scheduler"])
        self.t, self.u_prev, self.updates = int(sd["t"]), int(sd["u_prev"]), int(sd["updates"])
        self.skipped = int(sd["skipped"])
        self.batch, self.finished = B, bool(sd["finished"])
        dev = lambda v: None if v is None else st.tree_map(lambda t: t.to(self.device), v)  # noqa: E731
        self._state = None if state is None else dev(state["h"])
        self._sig = None if self._state is None else st.signature(self._state)
        self.influence, self.recurrent, self._flat = influence, recurrent, None
        mine = self._comm is None or self._comm.rank == 0  # the sum is counted once
        self._sum = {k: v.to(self.device).clone() for k, v in sd["pending"].items()} if mine else {}
        self._sum_count = float(sd["pending_count"]) if mine else 0.0
        self._pending, self._pending_from = [], self.t + 1
        torch.set_rng_state(sd["rng"])
        if sd["device_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(sd["device_rng"], self.device)
