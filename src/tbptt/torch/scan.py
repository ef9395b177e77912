"""Linear recurrences computed as one scan per call: minGRU and the LRU (SEMANTICS.md 10).

Both layers are an element-wise linear recurrence over a chunk, with resets inside it:

    (10.1)  h_t = a_t * h_{t-1} + b_t,     a_t := 0 where starts[t]  (h_init = 0, section 6)

    minGRU  (10.2)  z_t = sigmoid(W_z x_t + b_z),  htilde_t = W_h x_t + b_h
            (10.3)  h_t = (1 - z_t) * h_{t-1} + z_t * htilde_t   (a_t = 1 - z_t, b_t = z_t htilde_t)
    LRU     (10.4)  lambda = exp(-exp(nu_log) + i exp(theta_log))  (H,) complex, |lambda| < 1
            (10.5)  h_t = lambda * h_{t-1} + exp(gamma_log) * ((B_re + i B_im) x_t)
            (10.6)  y_t = Re((C_re + i C_im) h_t) + D * x_t

linear_scan runs (10.1) as one autograd node for the whole chunk (a torch.autograd.Function): the
forward is a loop of one fused multiply-add per step, and so is the backward, itself a reversed
linear scan (conj is the identity for real a; torch's convention for complex gradients).
mingru_scan is the same scan for (10.3) without forming a_t and b_t (one torch.lerp per step):

    (10.7)  dh_t = g_t + conj(a_{t+1}) * dh_{t+1},   dh_T = g_T     (g_t: the gradient reaching h_t)
    (10.8)  da_t = dh_t * conj(h_{t-1}),   db_t = dh_t,   dh_0 = conj(a_1) * dh_1

with a_t taken as 0 at the resets, so neither the gradient of h_0 nor that of a_t crosses them.
Everything else (the projections, the gates, the read-out) is a product or an element-wise
operation over the stacked time axis. The LRU's complex products are real ones: gamma B x is one
real product whose output, read as (re, im) pairs, is the complex b (torch.view_as_complex), and
Re(C h) = C_re h_re - C_im h_im is one real product of view_as_real(h).

The layers follow the driver's protocol and take the resets themselves (SEMANTICS.md 10):
layer(x, state=None, *, starts=None) -> (output, final state); state None is zeros; the final
state is a differentiable function of the state given, so TBPTT(k1, k2 > k1) carries it. A chunk
of no steps returns the state given (zeros for None): rl.h_init reads a module's h_init so.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

Tensor = torch.Tensor


def _resets(starts: Tensor | None, dtype: torch.dtype) -> tuple[Tensor | None, tuple[int, ...]]:
    """keep (T, batch, 1), 0 where a stream restarts (a_t := 0), and the steps where any does."""
    if starts is None or not bool(starts.any()):
        return None, ()
    rows = tuple(torch.nonzero(starts.any(1)).flatten().tolist())
    return (~starts).to(dtype).unsqueeze(-1), rows


def _scan(step, out: Tensor, h0: Tensor, keep: Tensor | None, rows: tuple[int, ...]) -> Tensor:
    """(10.1) forward: step(t, h_{t-1}, out_t) writes h_t; h_{t-1} is 0 where a stream restarts."""
    prev = h0
    for t, h_t in enumerate(out.unbind(0)):  # one fused operation per step
        if t in rows:
            assert keep is not None  # _resets gives rows only with keep
            prev = prev * keep[t]  # (batch, H): h_init = 0 where starts[t]
        step(t, prev, h_t)
        prev = h_t
    return out


def _scan_back(
    ac: Tensor, g: Tensor, keep: Tensor | None, rows: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """(10.7): dh (T, batch, H) from g, the gradient reaching every h_t, and conj(a) (T, batch,
    H) or (H,); and dh_1 as step 1 passes it to h_0 (0 where stream j restarts at step 1)."""
    T = g.shape[0]
    at = ac.unbind(0) if ac.dim() == 3 else (ac,) * T
    dh = torch.empty(g.shape, dtype=g.dtype, device=g.device)  # (T, batch, H)
    dhs, gs = dh.unbind(0), g.unbind(0)
    dhs[T - 1].copy_(gs[T - 1])
    nxt = dhs[T - 1]
    for t in range(T - 1, 0, -1):  # reversed: dh_{t-1} = g_{t-1} + conj(a_t) dh_t
        if t in rows:
            assert keep is not None  # _resets gives rows only with keep
            nxt = nxt * keep[t]
        torch.addcmul(gs[t - 1], at[t], nxt, out=dhs[t - 1])
        nxt = dhs[t - 1]
    if 0 in rows:
        assert keep is not None  # _resets gives rows only with keep
        nxt = nxt * keep[0]
    return dh, nxt


def _previous(h: Tensor, h0: Tensor, out: Tensor) -> Tensor:
    """h_{t-1} for t = 1..T into out (T, batch, H): h0, h_1, ..., h_{T-1}."""
    out[1:].copy_(h[:-1])
    out[0].copy_(h0)
    return out


class _LinearScan(torch.autograd.Function):
    """(10.1) forward and (10.7)-(10.8) backward over a chunk; a (T, batch, H) or (H,)."""

    @staticmethod
    def forward(a, b, h0, keep, rows):
        at = a.unbind(0) if a.dim() == 3 else (a,) * b.shape[0]
        step = lambda t, prev, h_t: torch.addcmul(b[t], at[t], prev, out=h_t)  # noqa: E731
        return _scan(step, torch.empty_like(b), h0, keep, rows)  # (T, batch, H)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, _, h0, keep, rows = inputs
        ctx.save_for_backward(a, h0, output)
        ctx.keep, ctx.rows = keep, rows

    @staticmethod
    def backward(ctx, g):
        a, h0, h = ctx.saved_tensors
        keep, rows = ctx.keep, ctx.rows
        ac = a.conj().resolve_conj() if a.is_complex() else a  # conj(a_t)
        dh, first = _scan_back(ac, g, keep, rows)  # (10.7)
        dh0 = (ac[0] if ac.dim() == 3 else ac) * first if ctx.needs_input_grad[2] else None
        da = None
        if ctx.needs_input_grad[0]:  # (10.8): da_t = dh_t conj(h_{t-1}), 0 at the resets
            prod = _previous(h, h0, torch.empty_like(dh))  # (T, batch, H)
            if prod.is_complex():  # conj in place: a lazily conjugated operand of mul is slow
                prod.conj_physical_()
            prod.mul_(dh)
            for r in rows:
                prod[r] *= keep[r]
            da = prod if a.dim() == 3 else prod.sum((0, 1))  # a shared by all steps: (H,)
        return da, dh, dh0, None, None


class _MinGRUScan(torch.autograd.Function):
    """(10.3) as h_t = lerp(h_{t-1}, htilde_t, z_t), without forming a_t and b_t; backward
    (10.7) with a_t = 1 - z_t, then dz_t = dh_t (htilde_t - h_{t-1}), dhtilde_t = dh_t z_t."""

    @staticmethod
    def forward(z, ht, h0, keep, rows):
        step = lambda t, prev, h_t: torch.lerp(prev, ht[t], z[t], out=h_t)  # noqa: E731
        return _scan(step, torch.empty_like(ht), h0, keep, rows)  # (T, batch, H)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, ht, h0, keep, rows = inputs
        ctx.save_for_backward(z, ht, h0, output)
        ctx.keep, ctx.rows = keep, rows

    @staticmethod
    def backward(ctx, g):
        z, ht, h0, h = ctx.saved_tensors
        keep, rows = ctx.keep, ctx.rows
        buf = torch.sub(1, z)  # (T, batch, H): a_t = 1 - z_t
        dh, first = _scan_back(buf, g, keep, rows)  # (10.7)
        dh0 = buf[0] * first if ctx.needs_input_grad[2] else None
        dz = torch.sub(ht, _previous(h, h0, buf), out=buf)  # htilde_t - h_{t-1}, reusing buf
        for r in rows:  # h_{t-1} is 0 where a stream restarts
            torch.sub(ht[r], (h[r - 1] if r else h0) * keep[r], out=dz[r])
        dz.mul_(dh)
        return dz, dh.mul_(z), dh0, None, None  # dhtilde_t = dh_t z_t, in dh's memory


def linear_scan(
    a: Tensor, b: Tensor, h0: Tensor | None = None, starts: Tensor | None = None
) -> Tensor:
    """h_t = a_t * h_{t-1} + b_t for t = 1..T (10.1), one autograd node; returns h (T, batch, H).

    a: (T, batch, H), or (H,) for a recurrence shared by all steps (the LRU's lambda); b (T,
    batch, H) of a's dtype (real or complex); h0 (batch, H), None meaning zeros; starts (T, batch)
    bool: where starts[t, j], stream j computes step t from h_init = 0 (a_t := 0). Differentiable
    with respect to a, b and h0. A chunk of one step runs as plain torch operations (which
    torch.func can transform); longer ones through the scan's own backward (10.7)-(10.8).
    """
    h0 = b.new_zeros(b.shape[1:]) if h0 is None else h0
    keep, rows = _resets(starts, b.real.dtype)
    if b.shape[0] == 1:
        prev = h0
        if rows:
            assert keep is not None  # _resets gives rows only with keep
            prev = h0 * keep[0]
        return torch.addcmul(b[0], a[0] if a.dim() == 3 else a, prev).unsqueeze(0)
    return _LinearScan.apply(a, b, h0, keep, rows)


def mingru_scan(
    z: Tensor, ht: Tensor, h0: Tensor | None = None, starts: Tensor | None = None
) -> Tensor:
    """h_t = (1 - z_t) * h_{t-1} + z_t * ht_t (10.3) over z, ht (T, batch, H); h (T, batch, H).

    linear_scan with a_t = 1 - z_t, b_t = z_t * ht_t, fused: no (T, batch, H) tensor for a or b.
    """
    h0 = ht.new_zeros(ht.shape[1:]) if h0 is None else h0
    keep, rows = _resets(starts, ht.dtype)
    if ht.shape[0] == 1:
        prev = h0
        if rows:
            assert keep is not None  # _resets gives rows only with keep
            prev = h0 * keep[0]
        return torch.lerp(prev, ht[0], z[0]).unsqueeze(0)
    return _MinGRUScan.apply(z, ht, h0, keep, rows)


# -- validation: one InputError, before any torch operation runs ------------------------------


def check_call(
    x: object,
    state: object,
    starts: object,
    width: int,
    dtype: torch.dtype,
    state_size: int,
    state_dtype: torch.dtype,
    device: torch.device,
    ids: bool = False,
) -> tuple[int, int]:
    """x (T, batch, width) of `dtype` (or integer ids (T, batch) when ids), starts (T, batch)
    bool, state (batch, state_size) of `state_dtype` exactly (no broadcasting); (T, batch)."""
    if not isinstance(x, Tensor):
        raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if ids:
        if x.dim() != 2 or x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise InputError(
                f"x must be integer token ids of shape (T, batch), got {x.dtype} {tuple(x.shape)}"
            )
        try:
            lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
        except RuntimeError:  # under torch.func.vmap (RTRL's and UORO's per-stream calls), which
            lo, hi = 0, 0  # reads no value: the embedding's own lookup refuses a bad id there
        if lo < 0 or hi >= width:
            raise InputError(
                f"x must hold token ids in 0..{width - 1}, got values from {lo} to {hi}"
            )
    elif x.dim() != 3 or x.shape[-1] != width or x.dtype != dtype:
        raise InputError(
            f"x must be a {dtype} tensor of shape (T, batch, {width}) (time-major, {width} "
            f"inputs per step), got {x.dtype} {tuple(x.shape)}"
        )
    T, batch = x.shape[:2]
    if x.device != device:
        raise InputError(f"x is on {x.device}, the layer's parameters on {device}")
    if starts is not None:
        if not isinstance(starts, Tensor) or starts.dtype != torch.bool:
            got = starts.dtype if isinstance(starts, Tensor) else type(starts).__name__
            raise InputError(f"starts must be a bool tensor of shape ({T}, {batch}), got {got}")
        if tuple(starts.shape) != (T, batch):
            raise InputError(
                f"starts must have shape ({T}, {batch}) (T, batch) like x, got "
                f"{tuple(starts.shape)}"
            )
        if starts.device != device:
            raise InputError(f"starts is on {starts.device}, the layer's parameters on {device}")
    check_state(state, batch, state_size, state_dtype, device)
    return T, batch


def check_state(
    state: object,
    batch: int,
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    name: str = "state",
) -> None:
    """None, or a tensor of exactly (batch, size) and dtype on the layer's device."""
    if state is None:
        return
    want = f"a {dtype} tensor of shape ({batch}, {size}) (batch, hidden)"
    if not isinstance(state, Tensor):
        raise InputError(f"{name} must be {want} or None, got {type(state).__name__}")
    if tuple(state.shape) != (batch, size) or state.dtype != dtype:
        raise InputError(f"{name} must be {want}, got {state.dtype} {tuple(state.shape)}")
    if state.device != device:
        raise InputError(f"{name} is on {state.device}, the layer's parameters on {device}")


def _dtype(params: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(params.parameters())
    return p.dtype, p.device


# -- the layers ---------------------------------------------------------------------------------


class MinGRU(nn.Module):
    """minGRU (Feng et al. 2024), (10.2)-(10.3): h_t = (1 - z_t) * h_{t-1} + z_t * htilde_t.

    Args:
        input_size: m, the inputs per step. hidden_size: H.
        dtype, device: of the parameters.

    Parameters: linear_z and linear_h, nn.Linear(m, H) with bias (W_z, b_z and W_h, b_h).
    forward(x (T, batch, m), state (batch, H) or None, *, starts (T, batch) bool or None)
    returns (h at every step (T, batch, H), the last h (batch, H)); state None is zeros.
    """

    state_batch_dim = 0  # h is (batch, H)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(input_size=input_size, hidden_size=hidden_size)
        kw = {"dtype": dtype, "device": device}
        self.input_size, self.hidden_size = input_size, hidden_size
        self.linear_z = nn.Linear(input_size, hidden_size, **kw)
        self.linear_h = nn.Linear(input_size, hidden_size, **kw)

    @property
    def state_dtype(self) -> torch.dtype:
        """The dtype of the state: the parameters'."""
        return self.linear_z.weight.dtype

    def forward(
        self, x: Tensor, state: Tensor | None = None, *, starts: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        T, batch, empty = _begin(self, x, state, starts, self.hidden_size)
        if empty is not None:
            return empty
        z = torch.sigmoid(self.linear_z(x))  # (T, batch, H): (10.2)
        h = mingru_scan(z, self.linear_h(x), state, starts)  # (T, batch, H): (10.3)
        return h, h[-1].clone()  # the state owns its memory, not a view of the chunk's h

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


class LRU(nn.Module):
    """The Linear Recurrent Unit (Orvieto et al. 2023), (10.4)-(10.6), complex state h (H,).

    Args:
        input_size: m, the inputs and outputs per step. hidden_size: H, the complex state.
        r_min, r_max, max_phase: lambda starts uniform on the ring r_min <= |lambda| < r_max
            with phase in [0, max_phase], as the paper's init_lru_parameters (its appendix A,
            whose defaults these are); gamma_log = log sqrt(1 - |lambda|^2).
        dtype, device: of the (real) parameters; the state is the matching complex dtype.

    Parameters nu_log, theta_log, gamma_log (H,); B_re, B_im (H, m), normal / sqrt(2 m);
    C_re, C_im (m, H), normal / sqrt(H); D (m,), normal. forward(x (T, batch, m), state (batch,
    H) complex or None, *, starts (T, batch) bool or None) returns (y (T, batch, m), the last h
    (batch, H) complex); state None is zeros.
    """

    state_batch_dim = 0  # h is (batch, H)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        r_min: float = 0.0,
        r_max: float = 1.0,
        max_phase: float = 6.28,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(input_size=input_size, hidden_size=hidden_size)
        if not (0.0 <= r_min < r_max <= 1.0):
            raise InputError(f"r_min and r_max need 0 <= r_min < r_max <= 1, got {r_min}, {r_max}")
        if not (max_phase > 0 and math.isfinite(max_phase)):
            raise InputError(f"max_phase must be a positive number, got {max_phase}")
        m, H = input_size, hidden_size
        self.input_size, self.hidden_size = m, H
        f64 = torch.float64
        u1, u2 = torch.rand(H, dtype=f64), torch.rand(H, dtype=f64)
        r2 = (u1 * (r_max**2 - r_min**2) + r_min**2).clamp(1e-12, 1 - 1e-12)  # |lambda|^2
        nu_log = torch.log(-0.5 * torch.log(r2))
        theta_log = torch.log(max_phase * u2.clamp_min(1e-12))
        lam = torch.exp(torch.complex(-torch.exp(nu_log), torch.exp(theta_log)))
        gamma_log = torch.log(torch.sqrt(1 - lam.abs() ** 2))
        kw = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        P = lambda v: nn.Parameter(v.to(**kw))  # noqa: E731
        self.nu_log, self.theta_log, self.gamma_log = P(nu_log), P(theta_log), P(gamma_log)
        self.B_re = P(torch.randn(H, m, dtype=f64) / math.sqrt(2 * m))
        self.B_im = P(torch.randn(H, m, dtype=f64) / math.sqrt(2 * m))
        self.C_re = P(torch.randn(m, H, dtype=f64) / math.sqrt(H))
        self.C_im = P(torch.randn(m, H, dtype=f64) / math.sqrt(H))
        self.D = P(torch.randn(m, dtype=f64))

    @property
    def state_dtype(self) -> torch.dtype:
        """The complex dtype of the state: complex64 for float32 parameters."""
        return torch.complex128 if self.nu_log.dtype == torch.float64 else torch.complex64

    def forward(
        self, x: Tensor, state: Tensor | None = None, *, starts: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        m, H = self.input_size, self.hidden_size
        T, batch, empty = _begin(self, x, state, starts, m)
        if empty is not None:
            return empty
        lam = torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))  # (10.4)
        g = torch.exp(self.gamma_log)[:, None]  # (H, 1)
        WB = torch.stack((g * self.B_re, g * self.B_im), 1).reshape(2 * H, m)  # rows re_k, im_k
        b = torch.view_as_complex(F.linear(x, WB).view(T, batch, H, 2))  # (T, batch, H): gamma B x
        h = linear_scan(lam, b, state, starts)  # (T, batch, H) complex: (10.5)
        WC = torch.stack((self.C_re, -self.C_im), 2).reshape(m, 2 * H)  # columns re_k, im_k
        y = F.linear(torch.view_as_real(h).view(T, batch, 2 * H), WC)  # (T, batch, m): Re(C h)
        return torch.addcmul(y, x, self.D), h[-1].clone()  # (10.6)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


def _begin(
    layer: MinGRU | LRU, x: Tensor, state: Tensor | None, starts: Tensor | None, width: int
) -> tuple[int, int, tuple[Tensor, Tensor] | None]:
    """A layer's call checked (check_call): T, batch and, for a call of no step, its result (no
    output of `width` features; the state given, or h_init: what rl.h_init asks of a module)."""
    dtype, device = _dtype(layer)
    H = layer.hidden_size
    T, batch = check_call(x, state, starts, layer.input_size, dtype, H, layer.state_dtype, device)
    if T > 0:
        return T, batch, None
    return (
        T,
        batch,
        (x.new_zeros(0, batch, width), _state_or_zeros(state, batch, H, layer.state_dtype, x)),
    )


def _state_or_zeros(
    state: Tensor | None, batch: int, H: int, dtype: torch.dtype, x: Tensor
) -> Tensor:
    """The state after zero steps: a copy of the state given, or zeros (batch, H)."""
    return x.new_zeros(batch, H, dtype=dtype) if state is None else state.clone()


def _check_sizes(**sizes: object) -> None:
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be an integer >= 1, got {v!r}")
