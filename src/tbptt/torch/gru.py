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

The forward saves r, z, n and gh_n of every step. The backward walks the steps in reverse with
dh_t = dy_t + (the gradient reaching h_t from step t + 1), dh_T adding the final state's gradient.
Writing the step's gate-gradients as dh_t times coefficients that do not depend on dh (computed
for all steps at once, before the walk):

    (g.6)  C_r = (1 - z) (1 - n^2) gh_n r (1 - r),   C_z = (h_{t-1} - n) z (1 - z),
           C_n = (1 - z) (1 - n^2)
    (g.7)  dgh_t = dh_t * [C_r, C_z, C_n r]           (B, 3H): d/d gh_t
    (g.8)  dh_{t-1} = dy_{t-1} + dh_t * z_t + dgh_t @ W_hh          one (B,3H)@(3H,H) per step
    (g.9)  dgi_t = dh_t * [C_r, C_z, C_n]             = dgh_t with its n part divided by r

and then, over the stacked time axis, one matrix product each:

    (g.10) dW_ih = dgi^T X,  dW_hh = dgh^T H_prev,  db_ih = sum dgi,  db_hh = sum dgh,
           dx = dgi W_ih,    dh_0 = dh_0 from (g.8)

with X (T B, m), H_prev (T B, H) = [h_0, h_1, .., h_{T-1}] and dgi, dgh (T B, 3H).

gru_call(module) is how rl and packing call a module on a round: for an nn.GRU of exactly that
class (or tbptt.torch.Recurrent around one) with one layer, one direction and no hooks, while
autograd records, it runs GRUSequence on the module's own parameters (weight_ih_l0, ...), so
their .grad is what nn.GRU's would be; anything else (no gradient: the fused kernel is faster
then) calls the module itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .modules import Recurrent

Tensor = torch.Tensor


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
        w_hh_t = w_hh.t()  # (H, 3H)
        gh = x.new_empty(T, B, 3, H)  # (T, B, 3, H): (g.2)
        rz = x.new_empty(T, B, 2, H)  # (T, B, 2, H): r, z
        n = x.new_empty(T, B, H)  # (T, B, H)
        y = x.new_empty(T, B, H)  # (T, B, H)
        h = h0
        for gi_t, gh_t, rz_t, n_t, y_t in zip(
            gi.unbind(0), gh.unbind(0), rz.unbind(0), n.unbind(0), y.unbind(0), strict=True
        ):
            ghf = gh_t.view(B, 3 * H)  # (B, 3H)
            if b_hh is None:
                torch.mm(h, w_hh_t, out=ghf)
            else:
                torch.addmm(b_hh, h, w_hh_t, out=ghf)
            torch.add(gi_t[:, :2], gh_t[:, :2], out=rz_t).sigmoid_()  # (B, 2, H): (g.3)
            torch.addcmul(gi_t[:, 2], rz_t[:, 0], gh_t[:, 2], out=n_t).tanh_()  # (g.4)
            torch.lerp(n_t, h, rz_t[:, 1], out=y_t)  # (B, H): (g.5)
            h = y_t
        ctx.save_for_backward(x, h0, w_ih, w_hh, y, rz, n, gh[:, :, 2])
        ctx.set_materialize_grads(True)
        ctx.has_b_ih, ctx.has_b_hh = b_ih is not None, b_hh is not None
        return y, y[T - 1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor, dhT: Tensor) -> tuple[Tensor | None, ...]:
        x, h0, w_ih, w_hh, y, rz, n, ghn = ctx.saved_tensors
        T, B, m = x.shape
        H = w_hh.shape[1]
        r, z = rz[:, :, 0], rz[:, :, 1]  # (T, B, H) each
        h_prev = torch.cat([h0.unsqueeze(0), y[: T - 1]])  # (T, B, H)
        c_n = (1 - z) * (1 - n * n)  # (T, B, H): (g.6)
        c = torch.stack(  # (T, B, 3, H): the coefficients of dgh, (g.7)
            [c_n * ghn * r * (1 - r), (h_prev - n) * z * (1 - z), c_n * r], dim=2
        )
        dgh = x.new_empty(T, B, 3, H)  # (T, B, 3, H)
        dh = x.new_empty(T + 1, B, H)  # (T + 1, B, H): dh[t + 1] is dh_t, dh[0] is dh_0
        torch.add(dy[T - 1], dhT, out=dh[T])
        dhs, dghs, zs = dh.unbind(0), dgh.unbind(0), z.unbind(0)
        for t in range(T - 1, -1, -1):  # (g.8)
            torch.mul(dhs[t + 1].unsqueeze(1), c[t], out=dghs[t])  # (B, 3, H)
            if t > 0:
                torch.addcmul(dy[t - 1], dhs[t + 1], zs[t], out=dhs[t])  # (B, H)
            else:
                torch.mul(dhs[1], zs[0], out=dhs[0])
            dhs[t].addmm_(dghs[t].view(B, 3 * H), w_hh)  # (B, 3H) @ (3H, H)
        dgi = dgh.clone()  # (T, B, 3, H): (g.9)
        torch.mul(dh[1:], c_n, out=dgi[:, :, 2])
        dgi_f, dgh_f = dgi.view(T * B, 3 * H), dgh.view(T * B, 3 * H)  # (T B, 3H)
        need = ctx.needs_input_grad
        dx = (dgi_f @ w_ih).view(T, B, m) if need[0] else None  # (T, B, m): (g.10)
        dh0 = dh[0] if need[1] else None  # (B, H)
        dw_ih = dgi_f.t() @ x.reshape(T * B, m) if need[2] else None  # (3H, m)
        dw_hh = dgh_f.t() @ h_prev.reshape(T * B, H) if need[3] else None  # (3H, H)
        db_ih = dgi_f.sum(0) if ctx.has_b_ih and need[4] else None  # (3H,)
        db_hh = dgh_f.sum(0) if ctx.has_b_hh and need[5] else None  # (3H,)
        return dx, dh0, dw_ih, dw_hh, db_ih, db_hh


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
    if type(rnn) is not nn.GRU or rnn.num_layers != 1 or rnn.bidirectional:
        return call
    module, head = cast(nn.Module, call), call.head if type(call) is Recurrent else None

    def fast(x: Tensor, state: Any) -> tuple[Tensor, Any]:
        if not (torch.is_grad_enabled() and x.dim() == 3 and x.shape[0] > 0) or _hooked(
            module, rnn
        ):
            return module(x, state)
        y, h = gru(rnn, x, state)
        return (y if head is None else head(y)), h

    return fast


def _hooked(*modules: nn.Module) -> bool:
    """Any forward hook on these modules, or a global one: then they must be called."""
    g = nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
