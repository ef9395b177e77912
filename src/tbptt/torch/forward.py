"""What online RTRL and UORO share in the torch engine: the influence carried forward one step at
a time (SEMANTICS.md 8; the numpy twins: numpy/forward.py, rtrl.py, uoro.py).

The module runs one step per call, module(x_t, h_{t-1}) -> (output_t, h_t). Its state, a tensor
or a tuple of them (an LSTM's (h, c)), is one vector per stream for the influence: h in R^n,
n the state's entries per stream (FlatState). theta is the parameters that h_t depends on
directly (found at the first step: an LSTM's, not its head's); the others, like C and c of the
seed's model, get their gradient from step t's loss alone. Step t of stream j has

    (8.15)  dl_t/dh_{t-1},  dl_t/dtheta|_{h_{t-1} fixed}     one backward of the batch's losses
            (dF/dh) s                                        the step's own forward pass, in
                                                             forward mode along the rule's s
            nu^T dF/dtheta, dF/dtheta                        per stream, see below

from which RTRL (rtrl.py) and UORO (uoro.py) form the step's contribution to the gradient,

    (8.16)  g_t = dl_t/dtheta|_{h_{t-1} fixed} + (dl_t/dh_{t-1})^T J_{t-1},   J ~ dh_{t-1}/dtheta

(J exact for RTRL; s~ theta~^T for UORO), and carry J forward. The contributions are summed and
applied every k1 steps, and at finish() (the flush of Truncation(k1, k1, flush=True)):

    (8.13)  theta <- optimizer(theta, sum_{t in (u_prev, u]} g_t)

The step runs once, with its state a forward-mode dual (torch.autograd.forward_ad) whose tangent
is the rule's direction (UORO's s~_{t-1}), giving h_t and (dF/dh) s together; one backward of
the losses gives (8.15)'s first line. The per-stream derivatives with respect to theta need
per-stream gradients of shared parameters. For Recurrent around nn.RNN, nn.GRU or nn.LSTM the
step is written out (cells.py): its values and tangent in one pass, and one backward pass, also
written out, of the losses' cotangent and the rule's cotangents together (UORO's nu_t, RTRL's
basis of h_t), giving dl/dh_{t-1}, dF/dh and the per-stream derivatives as outer products of
deltas and inputs ((C.2)); the state is carried as (batch, n) between the steps of a piece. For
any other module, torch.func re-runs the step per stream under vmap (vjp for UORO, jacrev and
jvp for RTRL).

The influence is carried across updates (Williams and Zipser's approximation). A reset zeroes that
stream's influence and restarts it from state0 (6.1). ForwardRule is the part of RTRL's and
UORO's rules that tbptt.torch.TBPTT (driver.py) holds: the steps, the sum, the update, the saved
influence; chunks, checks, the schedule of updates, clipping, the scheduler, the non-finite
checks, predict and several processes (one collective per update) are the shell's. Nothing is
kept between steps but the influence, the carried state and the sum. On CPU a step reads what it
checks (a reset, kappa's range) on the host, where that costs nothing; on an accelerator
(on_device) it computes everything on the device, with no synchronisation per step.

The module must be deterministic (dropout off): each step may run it several times. oneDNN's
recurrent kernels have no forward-mode derivative, so the steps run with oneDNN off.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

import torch
import torch.autograd.forward_ad as fwad
from torch.func import functional_call, jvp, vjp, vmap
from torch.linalg import vector_norm

from ..errors import InputError
from ..schedule import Truncation, Window
from . import state as st
from .cells import Cell, OuterRows, Tape, cell_for
from .checks import check_losses
from .modules import kept_targets, masked
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


@dataclass
class Step:
    """What a step's one forward and one backward pass give a rule (8.15)."""

    x: Tensor  # the step's input
    v: Tensor  # (batch, n) h_{t-1}
    P: dict[str, Tensor]  # the parameter values (detached)
    dl_dh: Tensor  # (batch, n) dl_t/dh_{t-1}
    Js: Tensor | None  # (batch, n) (dF/dh) s along the rule's direction s (None: none given)
    cot: Tensor | None  # (K, batch, n) the rule's cotangents of h_t (_cotangents)
    # the cell's path (cells.py): the tape, and the cotangents pulled back through the step:
    # each site's delta (K, batch, rows) and h_{t-1}'s (K, batch, n)
    tape: Tape | None = None
    deltas: list[Tensor] | None = None
    dv: Tensor | None = None


class DenseRows:
    """nu_j^T dF/dtheta for every stream j, one (batch, numel) tensor per parameter of theta (in
    the order of theta; not concatenated: a copy of batch x |theta|)."""

    def __init__(self, parts: list[Tensor]) -> None:
        self.parts = parts

    def norm(self) -> Tensor:
        """(batch,) ||nu_j^T dF/dtheta|| over all of theta."""
        return torch.stack([vector_norm(a, dim=1) for a in self.parts]).square().sum(0).sqrt()

    def add_to(self, blocks: list[Tensor], beta: Tensor) -> None:
        """blocks[k] (batch, numel_k) += beta (batch, 1) * the rows of parameter k."""
        for part, a in zip(blocks, self.parts, strict=True):
            part.addcmul_(a, beta)


class ForwardRule(Scheduled):
    """What RTRL's and UORO's rules share: steps one at a time, contributions summed, an update
    every k1 steps (and at finish()). A rule gives _allocate (its influence at zero),
    _influence_step and, for a forward-mode direction, _direction."""

    name = ""  # "RTRL" or "UORO"

    def __init__(self, k1: int) -> None:
        self.truncation = Truncation(k1, k1, inject="new", flush=True)
        self.k1 = self.truncation.k1
        self.influence: dict[str, Tensor] | None = None  # per stream, allocated by the first step
        self.recurrent: list[str] | None = None  # the names of theta, found by the first step
        self.flat: FlatState | None = None
        self.cell: Cell | None = None  # the module's step written out (cells.py), if it has one
        self.cell_checked = False  # whether the first step chose between the cell and torch.func
        self.sum: dict[str, Tensor] = {}  # the contributions since the last update (8.13)
        self.count: float | Tensor = 0.0  # their unmasked losses, for reduction="mean"
        # True: reset checks and kappa's range computed on the device, never read on the host;
        # None: True on an accelerator, False on CPU (where reading them costs nothing)
        self.on_device: bool | None = None

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

    def device_side(self, shell: Shell) -> bool:
        """Whether the step's checks stay on the device (on_device, or the device's kind)."""
        return shell.device.type != "cpu" if self.on_device is None else self.on_device

    # -- what differs between RTRL and UORO ---------------------------------------------------
    def _allocate(self, shell: Shell, batch: int, n: int, size: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def _direction(self, v: Tensor) -> Tensor | None:
        """The tangent of h_{t-1} (batch, n) the step carries forward (None: none)."""
        return None

    def _cotangents(self, shell: Shell, v: Tensor) -> Tensor | None:
        """The cotangents of h_t (K, batch, n) the step pulls back on the cell's path, besides
        the losses' (None: none)."""
        return None

    def _restart_influence(self, rows: Tensor, device_side: bool) -> None:
        """The streams `rows` (batch,) restart: no influence before this step (device_side: by
        masked writes, without reading rows on the host)."""
        assert self.influence is not None  # the caller restarts an allocated influence only
        for a in self.influence.values():
            zero(a, rows, device_side)

    def _influence_step(self, shell: Shell, step: Step) -> Tensor:
        """(8.16)'s second term summed over the streams, (|theta|,), and the influence advanced
        to step t."""
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
        """(dF/dh) tangent, per stream (batch, n), by re-running the step (torch.func.jvp)."""
        return jvp(self._state_map(shell, P, x), (v,), (tangent,))[1]

    def _theta_vjp(self, shell: Shell, step: Step, nu: Tensor) -> DenseRows | OuterRows:
        """nu_j^T dF/dtheta for every stream j: the cell's outer products (C.2), or the step
        re-run per stream (torch.func.vjp under vmap)."""
        names = self.recurrent
        assert names is not None  # the first step (_start) found theta
        if step.tape is not None:  # the step's own backward pass pulled nu back (cot)
            assert step.deltas is not None  # with the tape
            return OuterRows(step.tape.sites, [d[0] for d in step.deltas], names)
        F = self._per_stream(shell, step.P)
        theta = {k: step.P[k] for k in names}

        def one(xj: Tensor, vj: Tensor, nuj: Tensor) -> dict:
            return vjp(lambda th: F(xj, vj, th), theta)[1](nuj)[0]

        g = vmap(one, in_dims=(1 - shell.tdim, 0, 0))(step.x, step.v, nu)
        return DenseRows([g[k].reshape(len(nu), -1) for k in names])

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
        v = None  # the state as (batch, n), carried between the cell's steps instead of state
        with no_onednn():
            for i in range(x.shape[td]):
                x_i, y_i = _step_of(x, td, i), _step_of(y, td, i)
                mask_i, reset_i = _step_of(mask, td, i), _step_of(reset, td, i)
                loss, state, v = self._step(shell, state, v, x_i, y_i, mask_i, reset_i)
                sums.append(loss)
        if v is not None:
            assert self.flat is not None  # the steps made it
            state = self.flat.unflat(v)
        return torch.stack(sums), state

    def _step(self, shell: Shell, state, v: Tensor | None, x: Tensor, y: Tensor, mask, reset):
        """Step t of every stream from `state`, or from v (batch, n) when given (the cell's
        path, between its steps): (8.15), (8.16), the influence carried. Returns the step's loss
        sum and the state after it (detached): (loss, None, h_t (batch, n)) on the cell's path,
        (loss, state, None) on torch.func's."""
        batch = shell.batch
        assert batch is not None  # the first chunk set it before any step
        device_side = self.device_side(shell)
        restart = reset is not None and (device_side or bool(reset.any()))
        if v is not None and restart:  # the state itself, to restart it (6.1)
            assert self.flat is not None  # the step that gave v made it
            state, v = self.flat.unflat(v), None
        if v is None:
            if state is None:  # the module's zeros, made explicit for the derivatives
                with torch.no_grad():
                    state = st.tree_map(torch.zeros_like, shell.call(x, None)[1])
            dims = shell.stream_dims(state, batch)
            assert dims is not None  # state is a state here (zeros made above if it was None)
            if self.flat is None:
                self.flat = FlatState(state, dims)
            if restart:  # (6.1), no influence before
                assert reset is not None  # restart says so
                row = reset.reshape(-1)
                state = st.restart(state, shell.state0, row, dims)
                if self.influence is not None:
                    self._restart_influence(row, device_side)
            v = self.flat.flat(state).detach()  # (batch, n) h_{t-1}
        assert self.flat is not None  # made above, or by the step that gave v
        if not self.cell_checked:
            self.cell, self.cell_checked = self._checked_cell(shell, x, state), True
        cot = self._cotangents(shell, v)
        passes = self._module_pass if self.cell is None else self._cell_pass
        losses, new, grads, step = passes(shell, x, y, mask, v, cot)
        try:
            if step.tape is not None:  # the cell's path: no torch.func
                g_theta = self._influence_step(shell, step)  # (|theta|,)
            else:
                with warnings.catch_warnings():  # torch.func's first jvp scripts decompositions
                    warnings.filterwarnings("ignore", ".*torch.jit.script.*", DeprecationWarning)
                    g_theta = self._influence_step(shell, step)
        except RuntimeError as exc:
            if "random operation" not in str(exc):
                raise
            raise InputError(
                f"{self.name} runs the model several times per step, so it must be deterministic, "
                "but it draws random numbers (dropout?): turn them off (model.eval(), dropout=0)"
            ) from None
        for k, g in grads.items():
            self._add(k, g)
        assert self.recurrent is not None  # _start found theta at the first step
        for k, g in zip(self.recurrent, g_theta.split(self._sizes(shell)), strict=True):
            self._add(k, g.view_as(shell.params[k]))
        if mask is None:
            self.count += float(batch)
        else:  # on the device: read at the update
            self.count = self.count + mask.sum().to(torch.float64)
        loss = losses.detach().sum(dtype=torch.float64)
        if step.tape is not None:  # the cell's new state, (batch, n) without a graph
            return loss, None, new
        return loss, st.detach(new), None

    def _masked(self, shell: Shell, out: Tensor, y: Tensor, x: Tensor, mask) -> Tensor:
        """The step's losses l_t (1, batch), masked (the masked steps' targets never read)."""
        losses = shell.loss_fn(out, kept_targets(y, mask))
        return masked(check_losses(losses, x, shell.chunk, shell.tdim), mask)

    def _module_pass(self, shell: Shell, x: Tensor, y: Tensor, mask, v: Tensor, cot):
        """The module's step from h_{t-1} = v (batch, n), run once, with its state a forward-mode
        dual along the rule's direction s; one backward of the losses. Returns the losses, the
        new state, dl/dtheta by name, and the Step."""
        flat, direction = self.flat, self._direction(v)
        assert flat is not None  # _step made it before the forward pass
        leaf = v.clone().requires_grad_()
        if direction is None:
            out, new = shell.call(x, flat.unflat(leaf))
            h, Js = flat.flat(new), None
        else:
            with fwad.dual_level():
                out, new = shell.call(x, flat.unflat(fwad.make_dual(leaf, direction)))
                h, Js = fwad.unpack_dual(flat.flat(new))  # the values, and (dF/dh) s
                Js = torch.zeros_like(h) if Js is None else Js.detach()  # (the live parameters')
                out = fwad.unpack_dual(out).primal
                new = st.tree_map(lambda t: fwad.unpack_dual(t).primal, new)
        losses = self._masked(shell, out, y, x, mask)
        params = list(shell.params.values())
        if self.influence is None:  # theta: the parameters h_t depends on (its graph reaches)
            got = torch.autograd.grad(h.sum(), params, allow_unused=True, retain_graph=True)
            self._start(shell, [k for k, g in zip(shell.params, got, strict=True) if g is not None])
        got = torch.autograd.grad(losses.sum(), [*params, leaf], allow_unused=True)
        dl_dh = got[-1] if got[-1] is not None else torch.zeros_like(v)
        grads = {k: g for k, g in zip(shell.params, got[:-1], strict=True) if g is not None}
        P = {k: p.detach() for k, p in shell.params.items()}
        return losses, new, grads, Step(x, v, P, dl_dh, Js, cot)

    def _cell_pass(self, shell: Shell, x: Tensor, y: Tensor, mask, v: Tensor, cot):
        """The cell's step from h_{t-1} = v (batch, n) with its tangent along the rule's direction
        s; the head and the loss under autograd; the cell's backward pass of the losses' cotangent
        and the rule's `cot` together (cells.py). Returns as _module_pass, with the new state
        as h_t (batch, n)."""
        cell, flat = self.cell, self.flat
        assert cell is not None and flat is not None  # _step chose the cell, made flat
        top, h, Js, tape = cell.step(x, v, self._direction(v))
        leaf = top.requires_grad_()  # (batch, hidden) the rnn's output
        out = leaf.unsqueeze(cell.tdim)
        out = out if cell.head is None else cell.head(out)
        losses = self._masked(shell, out, y, x, mask)
        if self.influence is None:  # theta: the parameters the cell's sites hold
            held = {k for site in tape.sites for k, _ in site.terms}
            self._start(shell, [k for k in shell.params if k in held])
        params = list(shell.params.values())
        got = torch.autograd.grad(losses.sum(), [*params, leaf], allow_unused=True)
        grads = {k: g for k, g in zip(shell.params, got[:-1], strict=True) if g is not None}
        # h_t's cotangents: the losses' first (they reach h_t by the output, the last layer's
        # h), then the rule's
        K = 1 if cot is None else 1 + len(cot)
        every = v.new_zeros(K, *v.shape)
        if cot is not None:
            every[1:] = cot
        if got[-1] is not None:
            every[0, :, cell.n_top - top.shape[1] : cell.n_top] = got[-1]
        deltas, dv = cell.vjp(tape, every)
        grads.update(cell.param_grads(tape, [d[0] for d in deltas]))
        # no parameter values (P): only torch.func's path re-runs the step with them
        step = Step(x, v, {}, dv[0], Js, cot, tape, [d[1:] for d in deltas], dv[1:])
        return losses, h, grads, step

    def _checked_cell(self, shell: Shell, x: Tensor, state: st.State) -> Cell | None:
        """The module's cell (cells.py), if it has one that reproduces its own step here."""
        cell, flat = cell_for(shell.model, shell.params), self.flat
        assert flat is not None  # _step made it
        if cell is None or cell.n != flat.n:
            return None
        with torch.no_grad():
            out, new = shell.call(x, state)
            top, h, _, _ = cell.step(x, flat.flat(state))
            top = top.unsqueeze(cell.tdim)
            out_c = top if cell.head is None else cell.head(top)
        tol = 1e-9 if out.dtype == torch.float64 else 1e-3
        same = [(out, out_c), (flat.flat(new), h)]
        if all(a.shape == b.shape and torch.allclose(a, b, tol, tol) for a, b in same):
            return cell
        return None

    def _add(self, k: str, g: Tensor) -> None:
        self.sum[k] = g.detach().clone() if k not in self.sum else self.sum[k].add_(g)

    def _start(self, shell: Shell, recurrent: list[str]) -> None:
        """The first step: theta (the parameters h_t depends on, in the shell's order), and the
        influence at zero."""
        assert shell.batch is not None and self.flat is not None  # the first chunk, _step
        if not recurrent:
            raise InputError(f"the model's state depends on no parameter: nothing for {self.name}")
        self.recurrent = recurrent
        size = sum(shell.params[k].numel() for k in recurrent)
        self.influence = self._allocate(shell, shell.batch, self.flat.n, size)

    # -- the update -----------------------------------------------------------------------------
    def gradient(self, shell: Shell, w: Window, mean: bool) -> float:
        """(8.13): the contributions since the last update (the shell sums them over the
        processes)."""
        for k, p in shell.params.items():
            p.grad = self.sum.get(k)
        self.sum, count, self.count = {}, self.count, 0.0
        return float(count) if mean else 0.0

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
        count, comm = float(self.count), shell.comm
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
        pending, pending_count = dict(sd["pending"]), float(sd["pending_count"])
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
            self.cell, self.cell_checked = None, False
            device = shell.device
            self.sum = {k: v.to(device).clone() for k, v in pending.items()} if mine else {}
            self.count = pending_count if mine else 0.0
            return None if state is None else st.to(state["h"], device)

        return restore


def zero(a: Tensor, rows: Tensor, device_side: bool, value: float = 0.0) -> None:
    """a[rows] = value along a's first axis (rows (batch,) bool); device_side: a masked write of
    every row, without reading rows on the host."""
    if device_side:
        a.masked_fill_(rows.view(-1, *[1] * (a.dim() - 1)), value)
    else:
        a[rows] = value


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
