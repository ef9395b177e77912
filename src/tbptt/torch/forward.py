"""What online RTRL and UORO share in the torch engine: the influence carried forward one step at
a time with torch.func (SEMANTICS.md 8; the numpy twins: numpy/forward.py, rtrl.py, uoro.py).

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
stream's influence and restarts it from state0 (6.1). ForwardRule is the part of RTRL's and
UORO's rules that tbptt.torch.TBPTT (driver.py) holds: the steps, the sum, the update, the saved
influence; chunks, checks, the schedule of updates, clipping, the scheduler, the non-finite
checks, predict and several processes (one collective per update) are the shell's. Nothing is
kept between steps but the influence, the carried state and the sum.

The module must be deterministic (dropout off): each step runs it several times. oneDNN's
recurrent kernels have no forward-mode derivative, so the steps run with oneDNN off.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, overload

import torch
from torch.func import functional_call, jvp, vjp, vmap

from ..errors import InputError
from ..schedule import Truncation, Window
from . import state as st
from .checks import check_losses
from .tbptt import Scheduled

if TYPE_CHECKING:
    from .rule import Shell

Tensor = torch.Tensor


@overload
def _step_of(a: Tensor, td: int, i: int) -> Tensor: ...
@overload
def _step_of(a: Tensor | None, td: int, i: int) -> Tensor | None: ...
def _step_of(a: Tensor | None, td: int, i: int) -> Tensor | None:
    """Step i of a piece's tensor, on the time axis td (None: None)."""
    return None if a is None else a.narrow(td, i, 1)


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


class ForwardRule(Scheduled):
    """What RTRL's and UORO's rules share: steps one at a time, contributions summed, an update
    every k1 steps (and at finish()). A rule gives _allocate (its influence at zero) and
    _influence_step."""

    name = ""  # "RTRL" or "UORO"

    def __init__(self, k1: int) -> None:
        self.truncation = Truncation(k1, k1, inject="new", flush=True)
        self.k1 = self.truncation.k1
        self.influence: dict[str, Tensor] | None = None  # per stream, allocated by the first step
        self.recurrent: list[str] | None = None  # the names of theta, found by the first step
        self.flat: FlatState | None = None
        self.sum: dict[str, Tensor] = {}  # the contributions since the last update (8.13)
        self.count = 0.0  # their unmasked losses, for reduction="mean"

    @property
    def format(self) -> str:
        return f"tbptt.torch.{self.name}/1"

    def __repr__(self) -> str:
        return f"{self.name}(k1={self.k1})"

    def bind(self, shell: Shell) -> None:
        """The shell's options that a forward method cannot take."""
        for name, given in (
            ("amp", shell.amp_dtype is not None),
            ("checkpoint", shell.checkpoint),
            ("backward", shell.backward_fn is not None),
        ):
            if given:
                raise InputError(f"{self.name} takes no {name}= (it runs one step at a time)")

    # -- what differs between RTRL and UORO ---------------------------------------------------
    def _allocate(self, shell: Shell, batch: int, n: int, size: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def _restart_influence(self, rows: Tensor) -> None:
        """The streams `rows` (batch,) restart: no influence before this step."""
        assert self.influence is not None  # the caller restarts an allocated influence only
        for a in self.influence.values():
            a[rows] = 0

    def _influence_step(self, shell: Shell, x: Tensor, v: Tensor, dl_dh: Tensor, P: dict):
        """(8.16)'s second term summed over the streams, (|theta|,), and the influence advanced
        to step t. x: the step's input; v (batch, n) h_{t-1}; dl_dh (batch, n); P: the
        parameter values (detached)."""
        raise NotImplementedError

    # -- the step's derivatives (8.15) ----------------------------------------------------------
    def _state_map(self, shell: Shell, P: dict, x: Tensor) -> Callable[[Tensor], Tensor]:
        """v (batch, n) -> h_t (batch, n) as one batched module call with the values P."""
        flat, model = self.flat, shell.model
        assert flat is not None  # _step made it before any derivative

        def F(v: Tensor) -> Tensor:
            return flat.flat(functional_call(model, P, (x, flat.unflat(v)))[1])

        return F

    def _per_stream(self, shell: Shell, P: dict) -> Callable:
        """(x_j, v_j, theta) -> h_t of one stream (n,), for vmap over the streams; x_j without
        its stream axis, theta the values of the names in self.recurrent."""
        flat, model, axis = self.flat, shell.model, 1 - shell.tdim
        assert flat is not None  # _step made it before any derivative

        def F(x: Tensor, v: Tensor, theta: dict) -> Tensor:
            state = flat.unflat(v.unsqueeze(0))
            out = functional_call(model, {**P, **theta}, (x.unsqueeze(axis), state))[1]
            return flat.flat(out)[0]

        return F

    def _jvp(self, shell: Shell, P: dict, x: Tensor, v: Tensor, tangent: Tensor) -> Tensor:
        """(dF/dh) tangent, per stream (batch, n)."""
        return jvp(self._state_map(shell, P, x), (v,), (tangent,))[1]

    def _vjp_theta(self, shell: Shell, P: dict, x: Tensor, v: Tensor, nu: Tensor) -> list[Tensor]:
        """nu_j^T dF/dtheta for every stream j, one (batch, numel) tensor per parameter of theta
        (in the order of self.recurrent; not concatenated: a copy of batch x |theta|)."""
        F, names = self._per_stream(shell, P), self.recurrent
        assert names is not None  # the first step (_start) found theta
        theta = {k: P[k] for k in names}

        def one(xj: Tensor, vj: Tensor, nuj: Tensor) -> dict:
            return vjp(lambda th: F(xj, vj, th), theta)[1](nuj)[0]

        g = vmap(one, in_dims=(1 - shell.tdim, 0, 0))(x, v, nu)
        return [g[k].reshape(len(v), -1) for k in names]

    def _sizes(self, shell: Shell) -> list[int]:
        """The entries of each parameter of theta, in order."""
        assert self.recurrent is not None  # the first step (_start) found theta
        return [shell.params[k].numel() for k in self.recurrent]

    # -- the stream -----------------------------------------------------------------------------
    def run(
        self, shell: Shell, x: Tensor, y: Tensor, mask: Tensor | None, reset: Tensor | None
    ) -> tuple[Tensor, st.State]:
        """The piece's steps one at a time; returns their loss sums (L,) and the state."""
        td, state, sums = shell.tdim, shell.carried, []
        with no_onednn():
            for i in range(x.shape[td]):
                x_i, y_i = _step_of(x, td, i), _step_of(y, td, i)
                mask_i, reset_i = _step_of(mask, td, i), _step_of(reset, td, i)
                loss, state = self._step(shell, state, x_i, y_i, mask_i, reset_i)
                sums.append(loss)
        return torch.stack(sums), state

    def _step(self, shell: Shell, state, x: Tensor, y: Tensor, mask, reset):
        """Step t of every stream from `state`: (8.15), (8.16), the influence carried. Returns
        the step's loss sum and the state after it (detached)."""
        batch = shell.batch
        assert batch is not None  # the first chunk set it before any step
        if state is None:  # the module's zeros, made explicit for the derivatives
            with torch.no_grad():
                state = st.tree_map(torch.zeros_like, shell.call(x, None)[1])
        dims = shell.stream_dims(state, batch)
        assert dims is not None  # state is a state here (the zeros made above if it was None)
        if self.flat is None:
            self.flat = FlatState(state, dims)
        if reset is not None and bool(reset.any()):  # (6.1), and no influence before step t
            row = reset.reshape(-1)
            state = st.restart(state, shell.state0, row, dims)
            if self.influence is not None:
                self._restart_influence(row)
        v = self.flat.flat(state).detach()  # (batch, n) h_{t-1}
        leaf = v.clone().requires_grad_()
        out, new = shell.call(x, self.flat.unflat(leaf))
        losses = check_losses(shell.loss_fn(out, y), x)  # (1, batch) l_t
        if mask is not None:
            losses = losses * mask.to(losses.dtype)
        params = list(shell.params.values())
        if self.influence is None:
            self._start(shell, new, params)
        grads = torch.autograd.grad(losses.sum(), [*params, leaf], allow_unused=True)
        dl_dh = grads[-1] if grads[-1] is not None else torch.zeros_like(v)
        P = {k: p.detach() for k, p in shell.params.items()}
        try:
            with warnings.catch_warnings():  # torch.func's first jvp scripts its decompositions
                warnings.filterwarnings("ignore", ".*torch.jit.script.*", DeprecationWarning)
                g_theta = self._influence_step(shell, x, v, dl_dh, P)  # (|theta|,)
        except RuntimeError as exc:
            if "random operation" not in str(exc):
                raise
            raise InputError(
                f"{self.name} runs the model several times per step, so it must be deterministic, "
                "but it draws random numbers (dropout?): turn them off (model.eval(), dropout=0)"
            ) from None
        for k, g in zip(shell.params, grads[:-1], strict=True):
            if g is not None:
                self._add(k, g)
        assert self.recurrent is not None  # _start found theta at the first step
        for k, g in zip(self.recurrent, g_theta.split(self._sizes(shell)), strict=True):
            self._add(k, g.view_as(shell.params[k]))
        self.count += float(batch) if mask is None else float(mask.sum())
        return losses.detach().sum(dtype=torch.float64), st.detach(new)

    def _add(self, k: str, g: Tensor) -> None:
        self.sum[k] = g.detach().clone() if k not in self.sum else self.sum[k].add_(g)

    def _start(self, shell: Shell, new: st.State, params: list[Tensor]) -> None:
        """The first step: theta, the parameters h_t depends on (those its graph reaches), and
        the influence at zero."""
        # _step made flat just before; the first chunk set the batch
        assert self.flat is not None and shell.batch is not None
        h = self.flat.flat(new)
        got = torch.autograd.grad(h.sum(), params, allow_unused=True, retain_graph=True)
        self.recurrent = [k for k, g in zip(shell.params, got, strict=True) if g is not None]
        if not self.recurrent:
            raise InputError(f"the model's state depends on no parameter: nothing for {self.name}")
        size = sum(shell.params[k].numel() for k in self.recurrent)
        self.influence = self._allocate(shell, shell.batch, self.flat.n, size)

    # -- the update -----------------------------------------------------------------------------
    def gradient(self, shell: Shell, w: Window, mean: bool) -> float:
        """(8.13): the contributions since the last update (the shell sums them over the
        processes)."""
        for k, p in shell.params.items():
            p.grad = self.sum.get(k)
        self.sum, count, self.count = {}, self.count, 0.0
        return count if mean else 0.0

    def after(self, shell: Shell, w: Window | None) -> None:
        pass  # nothing is kept but the influence

    def release(self, shell: Shell, finished: bool) -> None:
        pass  # no tensor of the caller's is kept

    # -- saving ---------------------------------------------------------------------------------
    def state_dict(self, shell: Shell) -> dict:
        """The schedule, the carried state and the influence of every stream, theta's names, the
        contributions since the last update (with several processes: summed over them)."""
        pending, count = self._pending_sum(shell)
        state = None
        if shell.carried is not None:
            state = {"h": shell.state, "influence": dict(self.influence or {})}
        return {
            **self.saved_schedule(),
            "state": state,
            "recurrent": self.recurrent,
            "pending": pending,
            "pending_count": count,
            "segments": [],
        }

    def stream_dims(self, shell: Shell, state: dict | None, batch: int) -> list[int] | None:
        """The stream axis of each tensor of a saved state: the carried state's, then 0."""
        if state is None:
            return None
        dims = shell.stream_dims(state["h"], batch)
        assert dims is not None  # a saved "h" is a state: state_dict saves one only if carried
        return dims + [0] * len(st.leaves(state["influence"]))

    def _pending_sum(self, shell: Shell) -> tuple[dict[str, Tensor], float]:
        """The contributions since the last update and their count; with several processes,
        summed over them (one all-reduce per tensor: saving is rare)."""
        pending = {k: v.detach().clone() for k, v in self.sum.items()}
        count, comm = self.count, shell.comm
        if comm is None:
            return pending, count
        for k in shell.params:  # every process has the same keys: the same steps, the same model
            if k in pending:
                comm.all_reduce(pending[k], "the contributions")
        c = torch.tensor([count], dtype=torch.float64, device=comm.device)
        comm.all_reduce(c, "the contributions")
        return pending, float(c)

    def read(self, shell: Shell, sd: dict) -> Callable[[], st.State | None]:
        """Check the saved schedule, theta's names and influence (copied into fresh tensors: a
        refused state changes nothing); the restore."""
        self.check_schedule(sd)
        B, state, recurrent = sd["batch"], sd["state"], sd["recurrent"]
        if recurrent is not None and not set(recurrent) <= set(shell.params):
            raise InputError(
                f"the saved run's theta has parameters {recurrent}, this model {list(shell.params)}"
            )
        influence = None
        if state is not None and state["influence"]:
            h = state["h"]
            dims = shell.stream_dims(h, B)
            assert dims is not None  # a saved "h" is a state: state_dict saves one only if carried
            # a saved influence comes with theta's names: _start sets both at the first step
            assert recurrent is not None
            n = FlatState(h, dims).n
            size = sum(shell.params[k].numel() for k in recurrent)
            influence = self._allocate(shell, B, n, size)
            for k, a in influence.items():
                got = state["influence"].get(k)
                if got is None or got.shape != a.shape or got.dtype != a.dtype:
                    shape = None if got is None else (tuple(got.shape), got.dtype)
                    raise InputError(
                        f"the saved influence {k} is {shape}; expected {(tuple(a.shape), a.dtype)}"
                    )
                a.copy_(got)
        mine = shell.comm is None or shell.comm.rank == 0  # the sum is counted once

        def restore() -> st.State | None:
            self.influence, self.recurrent, self.flat = influence, recurrent, None
            device = shell.device
            self.sum = {k: v.to(device).clone() for k, v in sd["pending"].items()} if mine else {}
            self.count = float(sd["pending_count"]) if mine else 0.0
            return None if state is None else st.to(state["h"], device)

        return restore


def no_onednn():
    """oneDNN off (its LSTM kernel has no forward-mode derivative nor a vmap rule); the other
    flags untouched."""
    # torch leaves flags' parameters unannotated, so their types are inferred from the defaults
    # (bool, str); set_flags documents None as "leave this flag as it is"
    return torch.backends.mkldnn.flags(
        enabled=False,
        deterministic=None,  # pyright: ignore[reportArgumentType]
        allow_tf32=None,  # pyright: ignore[reportArgumentType]
        fp32_precision=None,  # pyright: ignore[reportArgumentType]
    )
