"""A GRU sequence with its own backward: nn.GRU's equations as one autograd Function.

For a single-layer, unidirectional nn.GRU torch's CPU kernel has no fused backward: autograd
records every step's operations, so one call over T steps costs about as many graph nodes as T
calls of one step. GRUSequence computes the same sequence and writes its backward by hand.

nn.GRU's equations (PyTorch docs), gates in the order r, z, n of weight_ih_l0 (3H, m) and
weight_hh_l0 (3H, H), x_t (B, m), h_t (B, H), biases zero when bias=False:

    (g.1)  gi_t = W_ih x_t + b_ih                        all steps at once: (T B, m) @ W_ih^T
    (g.2)  gh_t = W_hh h_{t-1} + b_hh                    per step: (B, H) @ (H, 3H)
    (g.3)  r_t = sigma(gi_r + gh_r),  z_t = sigma(gi_z + gh_z)
    (g.4)  n_t = tanh(gi_n + r_t * gh_n)
    (g.5)  h_t = (1 - z_t) n_t + z_t h_{t-1} = n_t + z_t (h_{t-1} - n_t)

The forward saves r, z, n and gh_n of every step (r, z, gh_n in one (T, B, 3, H) buffer, r and z
overwriting their pre-activations [gi_r + b_hr, gi_z + b_hz] + W_hh h in place). The backward
walks the steps in reverse with dh_t = dy_t + (the gradient reaching h_t from step t + 1), dh_T
adding the final state's gradient. The step's gate gradients are dh_t times coefficients that do
not depend on dh:

    (g.6)  C_n = (1 - z) (1 - n^2),   C_r = C_n gh_n r (1 - r),
           C_z = (h_{t-1} - n) z (1 - z) = (h_t - n) (1 - z)          by (g.5)
    (g.7)  dgh_t = dh_t * [C_r, C_z, C_n r]           (B, 3H): d/d gh_t
    (g.8)  dh_{t-1} = dy_{t-1} + dh_t * z_t + dgh_t @ W_hh          one (B,3H)@(3H,H) per step
    (g.9)  dgi_t = dh_t * [C_r, C_z, C_n]             d/d gi_t: dgh_t but for its n part

Each step writes one (B, 4, H) block dh_t * [C_n, C_r, C_z, C_n r] = [dgi_n, dgh]: dgh is its last
3H columns and dgi its first 3H with the gates in the order n, r, z (W_ih's rows taken in that
order), so neither is copied out of the other. The coefficients (g.6) are computed for a block of
ceil(ROWS / B) steps just before the walk reaches it, not for all T steps at once: at B = 64 the
(T, B, H) passes of the latter went to memory and took longer than the walk (measured: the
backward 2x faster with blocks), and the blocks need no (T, B, 4H) buffer.

and then, over the stacked time axis, one matrix product each:

    (g.10) dW_ih = dgi^T X,  dW_hh = dgh^T H_prev,  db_ih = sum dgi,  db_hh = sum dgh,
           dx = dgi W_ih,    dh_0 = dh_0 from (g.8)

with X (T B, m), H_prev (T B, H) = [h_0, h_1, .., h_{T-1}] and dgi, dgh (T B, 3H).

gru_call(module) is how rl and packing call a module on a round: for an nn.GRU of exactly that
class (or tbptt.torch.Recurrent around one) with one layer, one direction and no hooks, while
autograd records (and autocast is off), it runs GRUSequence on the module's own parameters
(weight_ih_l0, ...), so their .grad is what nn.GRU's would be; anything else (no gradient: torch's
own kernel is faster then) calls the module itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .modules import Recurrent

Tensor = torch.Tensor
ROWS = 512  # the backward computes (g.6) for blocks of about ROWS rows (steps x batch) at a time


class GRUSequence(torch.autograd.Function):
    """(y (T, B, H), h_T (B, H)) of (g.1)-(g.5) from x (T, B, m) and h_0 (B, H)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        h0: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Tensor | None,
        b_hh: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        T, B, m = x.shape
        H = w_hh.shape[1]
        X = x.reshape(T * B, m)  # (T B, m)
        gi = X @ w_ih.t() if b_ih is None else torch.addmm(b_ih, X, w_ih.t())  # (T B, 3H)
        gi = gi.view(T, B, 3, H)  # (T, B, 3, H): (g.1)
        # a[t] = [gi_r + b_hr, gi_z + b_hz, b_hn] + W_hh h_{t-1} (one addmm_ per step): the
        # pre-activations of r and z, then r and z themselves (sigmoid_ in place), and gh_n
        a = x.new_empty(T, B, 3, H)  # (T, B, 3, H)
        if b_hh is None:
            a[:, :, :2] = gi[:, :, :2]
            a[:, :, 2] = 0
        else:
            bh = b_hh.view(3, H)
            torch.add(gi[:, :, :2], bh[:2], out=a[:, :, :2])
            a[:, :, 2] = bh[2]
        n = x.new_empty(T, B, H)  # (T, B, H)
        y = x.new_empty(T, B, H)  # (T, B, H)
        w_hh_t = w_hh.t()  # (H, 3H)
        h = h0
        for a_t, rz_t, r_t, z_t, ghn_t, gin_t, n_t, y_t in zip(
            a.view(T, B, 3 * H).unbind(0),  # (B, 3H)
            a[:, :, :2].unbind(0),  # (B, 2, H)
            a[:, :, 0].unbind(0),  # (B, H) each
            a[:, :, 1].unbind(0),
            a[:, :, 2].unbind(0),
            gi[:, :, 2].unbind(0),
            n.unbind(0),
            y.unbind(0),
            strict=True,
        ):
            a_t.addmm_(h, w_hh_t)  # (g.2)
            rz_t.sigmoid_()  # (g.3)
            torch.addcmul(gin_t, r_t, ghn_t, out=n_t).tanh_()  # (g.4)
            h = torch.lerp(n_t, h, z_t, out=y_t)  # (g.5)
        ctx.save_for_backward(x, h0, w_ih, w_hh, y, a, n)
        ctx.set_materialize_grads(True)
        ctx.has_b_ih, ctx.has_b_hh = b_ih is not None, b_hh is not None
        return y, y[T - 1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor, dhT: Tensor) -> tuple[Tensor | None, ...]:
        x, h0, w_ih, w_hh, y, a, n = ctx.saved_tensors
        T, B, m = x.shape
        H = w_hh.shape[1]
        r, z, ghn = a.unbind(2)  # (T, B, H) each
        K = max(1, ROWS // B)  # steps per block of coefficients
        c = x.new_empty(min(K, T), B, 4, H)  # (K, B, 4, H): a block's [C_n, C_r, C_z, C_n r]
        g = x.new_empty(T, B, 4, H)  # (T, B, 4, H): [dgi_n, dgh_r, dgh_z, dgh_n], (g.7), (g.9)
        dh = x.new_empty(T + 1, B, H)  # (T + 1, B, H): dh[t + 1] is dh_t, dh[0] is dh_0
        torch.add(dy[T - 1], dhT, out=dh[T])
        dhs, dhs1 = dh.unbind(0), dh.unsqueeze(2).unbind(0)  # (B, H), (B, 1, H)
        gs, dghs = g.unbind(0), g.view(T, B, 4 * H)[:, :, H:].unbind(0)  # (B, 4, H), (B, 3H)
        zs, dys = z.unbind(0), dy.unbind(0)
        for lo in range((T - 1) // K * K, -1, -K):  # the blocks, last first
            hi = min(lo + K, T)
            cb = c[: hi - lo]  # (hi - lo, B, 4, H)
            _coefficients(cb, r[lo:hi], z[lo:hi], ghn[lo:hi], n[lo:hi], y[lo:hi])
            cs = cb.unbind(0)
            for t in range(hi - 1, lo - 1, -1):  # (g.8)
                torch.mul(dhs1[t + 1], cs[t - lo], out=gs[t])  # (B, 4, H)
                if t > 0:
                    torch.addcmul(dys[t - 1], dhs[t + 1], zs[t], out=dhs[t])  # (B, H)
                else:
                    torch.mul(dhs[1], zs[0], out=dhs[0])
                dhs[t].addmm_(dghs[t], w_hh)  # (B, 3H) @ (3H, H)
        gf = g.view(T * B, 4 * H)  # (T B, 4H)
        dgh, dgi_nrz = gf[:, H:], gf[:, : 3 * H]  # (T B, 3H): r, z, n and n, r, z
        need = ctx.needs_input_grad
        dx = dh0 = dw_ih = dw_hh = db_ih = db_hh = None
        if need[0]:  # (T, B, m): (g.10), W_ih's rows in the order n, r, z
            dx = (dgi_nrz @ torch.cat([w_ih[2 * H :], w_ih[: 2 * H]])).view(T, B, m)
        if need[1]:
            dh0 = dh[0]  # (B, H)
        if need[2]:
            dw = (x.reshape(T * B, m).t() @ dgi_nrz).t()  # (3H, m), rows n, r, z
            dw_ih = torch.cat([dw[H:], dw[:H]])
        if need[3]:  # H_prev^T dgh: step 0 reads h_0, the others y[:-1]
            dw = h0.t() @ dgh[:B]  # (H, 3H)
            if T > 1:
                dw.addmm_(y[: T - 1].reshape((T - 1) * B, H).t(), dgh[B:])
            dw_hh = dw.t()  # (3H, H)
        if ctx.has_b_ih and need[4] or ctx.has_b_hh and need[5]:
            db = gf.sum(0)  # (4H,): dgi_n, then dgh
            db_ih = torch.cat([db[H : 3 * H], db[:H]]) if need[4] else None
            db_hh = db[H:] if need[5] else None
        return dx, dh0, dw_ih, dw_hh, db_ih, db_hh


def _coefficients(c: Tensor, r: Tensor, z: Tensor, ghn: Tensor, n: Tensor, y: Tensor) -> None:
    """c (K, B, 4, H) = [C_n, C_r, C_z, C_n r] of (g.6) for K steps, from r, z, gh_n, n, y
    (K, B, H) each."""
    c_n, c_r, c_z, c_nr = c.unbind(2)  # (K, B, H) each
    omz = torch.rsub(z, 1)  # 1 - z
    torch.mul(omz, torch.addcmul(n.new_ones(()), n, n, value=-1), out=c_n)
    torch.mul(c_n * ghn, torch.addcmul(r, r, r, value=-1), out=c_r)
    torch.mul(y - n, omz, out=c_z)  # (h_{t-1} - n) z (1 - z), as y - n = z (h_{t-1} - n)
    torch.mul(c_n, r, out=c_nr)


def gru(rnn: nn.GRU, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """rnn(x, h0) for a single-layer, unidirectional nn.GRU, by GRUSequence: (y, h_T) with
    y (T, B, H) ((B, T, H) when batch_first) and h_T (1, B, H)."""
    if rnn.batch_first:
        x = x.transpose(0, 1)  # (T, B, m)
    T, B, _ = x.shape
    w_ih = cast(Tensor, rnn.weight_ih_l0)  # torch sets them by setattr: see rl_base.h_init
    w_hh = cast(Tensor, rnn.weight_hh_l0)
    b_ih = cast(Tensor, rnn.bias_ih_l0) if rnn.bias else None
    b_hh = cast(Tensor, rnn.bias_hh_l0) if rnn.bias else None
    h = x.new_zeros(B, rnn.hidden_size) if h0 is None else h0[0]  # (B, H)
    y, hT = cast(tuple[Tensor, Tensor], GRUSequence.apply(x, h, w_ih, w_hh, b_ih, b_hh))
    return (y.transpose(0, 1) if rnn.batch_first else y), hT.unsqueeze(0)


Call = Callable[[Tensor, Any], tuple[Tensor, Any]]


def gru_call(call: Call) -> Call:
    """call itself, or for an nn.GRU (bare or in Recurrent) that GRUSequence computes exactly, a
    function that uses it whenever autograd records and the module has no hooks."""
    rnn = call.rnn if type(call) is Recurrent else call
    if not isinstance(rnn, nn.GRU) or type(rnn) is not nn.GRU:  # a subclass may change forward
        return call
    if rnn.num_layers != 1 or rnn.bidirectional:
        return call
    cell = rnn
    module, head = cast(nn.Module, call), call.head if type(call) is Recurrent else None

    def fast(x: Tensor, state: Any) -> tuple[Tensor, Any]:
        if (
            not (torch.is_grad_enabled() and x.dim() == 3 and x.shape[0] > 0)
            or torch.is_autocast_enabled(x.device.type)  # nn.GRU's own casts apply
            or _hooked(module, cell)
        ):
            return module(x, state)
        y, h = gru(cell, x, state)
        return (y if head is None else head(y)), h

    return fast


def _hooked(*modules: nn.Module) -> bool:
    """Any forward hook on these modules, or a global one: then they must be called."""
    g = nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
