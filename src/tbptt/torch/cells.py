"""One step of nn.RNN, nn.GRU and nn.LSTM written out, for RTRL and UORO (SEMANTICS.md 8;
forward.py): the module's arithmetic, with the pre-activations that its weights enter kept.

Every weight W of these modules enters a step through a pre-activation that is linear in it,

    (C.1)  a_j = sum_W u_{W,j} W^T + b                  stream j; u_W its input (x_t, h_{t-1}, the
                                                        layer below's h_t), b the biases

so the immediate derivative of the step's state h_t along a cotangent nu, for each stream, is an
outer product of that stream's rows:

    (C.2)  nu_j^T dF_j/dW = delta_j u_{W,j}^T,   nu_j^T dF_j/db = delta_j,
           delta_j = nu_j^T dF_j/da_j

and the Jacobian of the step (RTRL) is dF_j/dW[i, (r, c)] = (dF_j/da_j)[i, r] u_{W,j}[c]. The
per-stream derivatives the methods need then come from the one forward pass of the step and
backward passes to its pre-activations a (elementwise, and the layers above), instead of re-running
the step per stream under torch.func.vmap. The cell is used for Recurrent(rnn, head) with rnn an
nn.RNN, nn.GRU or nn.LSTM of one direction, without proj_size and without active dropout, and
only after it reproduced the module's own first step (forward.py); any other module takes
torch.func's general path. The equations are PyTorch's (torch.nn.LSTM's documentation):

    LSTM   (i, f, g, o) = (sigma, sigma, tanh, sigma)(a),  c_t = f c + i g,  h_t = o tanh(c_t)
    GRU    a_i = x W_ih^T + b_ih, a_h = h W_hh^T + b_hh (two pre-activations), (r, z) = sigma(a_i
           + a_h) on their first two thirds, n = tanh(a_i,n + r a_h,n), h_t = (h - n) z + n
    RNN    h_t = tanh(a) or relu(a)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


@dataclass
class Site:
    """A pre-activation a (batch, rows) of the step (C.1) and the trained parameters entering it
    linearly: (name, u) with u (batch, cols) the input of weight `name` (detached), or
    (name, None) for a bias."""

    a: Tensor
    terms: list[tuple[str, Tensor | None]]


class Cell:
    """module(x_t, state) of Recurrent(rnn, head) as (output, new_state, its tangent, sites): the
    rnn's step written out (C.1), the head applied to its output as the module applies it. Given
    a tangent of the state (the same structure), the tangent of the new state, (dF/dh) s, is
    computed beside the values (forward mode written out: one product by W_hh per layer and
    elementwise terms), without a graph."""

    def __init__(self, model: nn.Module, rnn: nn.RNNBase, names: dict[int, str]) -> None:
        self.model, self.rnn, self.names = model, rnn, names
        self.kind = "LSTM" if isinstance(rnn, nn.LSTM) else "GRU" if isinstance(rnn, nn.GRU) else ""
        self.relu = getattr(rnn, "nonlinearity", "tanh") == "relu"

    def __call__(self, x: Tensor, state, tangent=None) -> tuple[Tensor, object, object, list]:
        rnn, sites = self.rnn, []
        td = 1 if rnn.batch_first else 0
        inp, t_inp = x.select(td, 0), None  # (batch, m): the one step; x has no tangent
        lstm = self.kind == "LSTM"
        states = tuple(state) if lstm else (state,)  # each (layers, batch, hidden)
        tangents = None if tangent is None else tuple(tangent) if lstm else (tangent,)
        new, new_t = [], []
        layer = self._lstm if lstm else self._gru if self.kind == "GRU" else self._rnn
        for k in range(rnn.num_layers):
            W = [getattr(rnn, f"{w}_l{k}") for w in ("weight_ih", "weight_hh")]
            b = [getattr(rnn, f"{w}_l{k}") for w in ("bias_ih", "bias_hh")] if rnn.bias else []
            s_k = tuple(a[k] for a in states)
            t_k = None if tangents is None else tuple(a[k] for a in tangents)
            got, t_got = layer(inp, s_k, t_inp, t_k, W, b, sites)
            new.append(got)
            new_t.append(t_got)
            inp, t_inp = got[0], (None if t_got is None else t_got[0])
        stacked = [torch.stack(a) for a in zip(*new, strict=True)]  # (layers, batch, hidden)
        t_stacked = None if tangents is None else [torch.stack(a) for a in zip(*new_t, strict=True)]
        out = inp.unsqueeze(td)  # the rnn's output: the last layer's h_t, (1, batch, hidden)
        head = getattr(self.model, "head", None)
        out = out if head is None else head(out)
        if not lstm:
            return out, stacked[0], None if t_stacked is None else t_stacked[0], sites
        return out, tuple(stacked), None if t_stacked is None else tuple(t_stacked), sites

    @staticmethod
    def _pre_tangent(tx: Tensor | None, th: Tensor, W: list[Tensor]) -> Tensor:
        """The tangent of a pre-activation: th W_hh^T (+ tx W_ih^T above the first layer)."""
        ta = th @ W[1].detach().t()
        return ta if tx is None else ta.addmm_(tx, W[0].detach().t())

    def _lstm(self, x, state, tx, ts, W, b, sites):
        """One LSTM layer: (h, c) and their tangent."""
        h0, c0 = state
        a = F.linear(h0, W[1], b[1] if b else None) + F.linear(x, W[0], b[0] if b else None)
        self._site(sites, a, [(W[0], x), (W[1], h0)] + [(p, None) for p in b])
        i, f, g, o = a.chunk(4, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c0 + i * g
        tc_ = torch.tanh(c)
        h = o * tc_
        if ts is None:
            return (h, c), None
        with torch.no_grad():
            ti, tf, tg, to = self._pre_tangent(tx, ts[0], W).chunk(4, 1)
            tc = (tf * f * (1 - f)) * c0 + f * ts[1] + (ti * i * (1 - i)) * g
            tc += i * (tg * (1 - g * g))
            th = (to * o * (1 - o)) * tc_ + o * (1 - tc_ * tc_) * tc
        return (h, c), (th, tc)

    def _gru(self, x, state, tx, ts, W, b, sites):
        """One GRU layer: (h,) and its tangent."""
        (h0,) = state
        a_i = F.linear(x, W[0], b[0] if b else None)  # (batch, 3 hidden)
        a_h = F.linear(h0, W[1], b[1] if b else None)
        self._site(sites, a_i, [(W[0], x)] + [(p, None) for p in b[:1]])
        self._site(sites, a_h, [(W[1], h0)] + [(p, None) for p in b[1:]])
        ir, iz, i_n = a_i.chunk(3, 1)
        hr, hz, h_n = a_h.chunk(3, 1)
        r, z = torch.sigmoid(hr + ir), torch.sigmoid(hz + iz)
        n = torch.tanh(i_n + h_n * r)
        h = (h0 - n) * z + n
        if ts is None:
            return (h,), None
        with torch.no_grad():
            tr_h, tz_h, tn_h = (ts[0] @ W[1].detach().t()).chunk(3, 1)
            tr_i, tz_i, tn_i = (0, 0, 0) if tx is None else (tx @ W[0].detach().t()).chunk(3, 1)
            tr = r * (1 - r) * (tr_h + tr_i)
            tz = z * (1 - z) * (tz_h + tz_i)
            tn = (1 - n * n) * (tn_i + tn_h * r + h_n * tr)
            th = (ts[0] - tn) * z + (h0 - n) * tz + tn
        return (h,), (th,)

    def _rnn(self, x, state, tx, ts, W, b, sites):
        """One layer of nn.RNN (tanh or relu): (h,) and its tangent."""
        (h0,) = state
        a = F.linear(h0, W[1], b[1] if b else None) + F.linear(x, W[0], b[0] if b else None)
        self._site(sites, a, [(W[0], x), (W[1], h0)] + [(p, None) for p in b])
        h = torch.relu(a) if self.relu else torch.tanh(a)
        if ts is None:
            return (h,), None
        with torch.no_grad():
            ta = self._pre_tangent(tx, ts[0], W)
            th = ta * (a > 0) if self.relu else ta * (1 - h * h)
        return (h,), (th,)

    def _site(self, sites: list[Site], a: Tensor, terms: list[tuple[Tensor, Tensor | None]]):
        """The site of a, with the trained parameters among terms (frozen ones are constants;
        none: no site)."""
        names = self.names
        kept = [(names[id(p)], u if u is None else u.detach()) for p, u in terms if id(p) in names]
        if kept:
            sites.append(Site(a, kept))


def cell_for(model: nn.Module, params: dict[str, Tensor]) -> Cell | None:
    """The written-out step of model when it is Recurrent(rnn, head) with rnn an nn.RNN, nn.GRU or
    nn.LSTM that the cell covers, each of its weights a parameter; None otherwise."""
    from .modules import Recurrent

    if type(model) is not Recurrent:  # a subclass may change forward
        return None
    rnn = model.rnn
    if type(rnn) not in (nn.RNN, nn.GRU, nn.LSTM) or not isinstance(rnn, nn.RNNBase):
        return None
    if rnn.bidirectional or getattr(rnn, "proj_size", 0) or (rnn.training and rnn.dropout > 0):
        return None
    if rnn._forward_hooks or rnn._forward_pre_hooks:  # torch's registries: hooks see the call
        return None
    kinds = ("weight_ih", "weight_hh", *(("bias_ih", "bias_hh") if rnn.bias else ()))
    weights = [getattr(rnn, f"{w}_l{k}", None) for k in range(rnn.num_layers) for w in kinds]
    if not all(isinstance(w, nn.Parameter) for w in weights):
        return None  # a parametrization (weight_norm, ...) computes its weights
    names = {id(p): k for k, p in params.items()}
    return Cell(model, rnn, names)


def _terms(sites: list[Site], grads: tuple, names: list[str]) -> list[tuple[Tensor, Tensor | None]]:
    """(the gradient at a parameter's pre-activation, its input u or None) for each parameter of
    theta, in the order of names."""
    by_name = {k: (g, u) for site, g in zip(sites, grads, strict=True) for k, u in site.terms}
    return [by_name[k] for k in names]


class OuterRows:
    """nu_j^T dF/dtheta for every stream j as outer products (C.2): per parameter of theta,
    delta (batch, rows) and its input u (batch, cols), or None for a bias. Never formed whole."""

    def __init__(self, h: Tensor, sites: list[Site], nu: Tensor, names: list[str]) -> None:
        deltas = torch.autograd.grad(h, [s.a for s in sites], nu)  # (batch, rows) each
        self.terms = _terms(sites, deltas, names)

    def norm(self) -> Tensor:
        """(batch,) ||nu_j^T dF/dtheta||: ||delta u^T||^2 = ||delta||^2 ||u||^2."""
        total = torch.zeros((), dtype=self.terms[0][0].dtype, device=self.terms[0][0].device)
        for delta, u in self.terms:
            d2 = (delta * delta).sum(1)
            total = total + (d2 if u is None else d2 * (u * u).sum(1))
        return total.sqrt()

    def add_to(self, blocks: list[Tensor], beta: Tensor) -> None:
        """blocks[k] (batch, numel_k) += beta (batch, 1) * delta u^T of parameter k."""
        for block, (delta, u) in zip(blocks, self.terms, strict=True):
            d = delta * beta  # (batch, rows)
            if u is None:
                block.add_(d)
            else:  # (batch, rows, cols): the parameter's rows in the stream's theta~
                block.view(len(d), d.shape[1], u.shape[1]).addcmul_(d[:, :, None], u[:, None, :])


class OuterJacobian:
    """The step's Jacobians for every stream j from one backward pass per state entry (batched):
    dF_j/dh (batch, n, n), and dF_j/dtheta as outer products (C.2), per parameter of theta
    (dF_j/da_j (batch, n, rows), u (batch, cols) or None). dF/dtheta is never formed alone."""

    def __init__(self, leaf: Tensor, h: Tensor, sites: list[Site], names: list[str]) -> None:
        batch, n = h.shape
        basis = torch.eye(n, dtype=h.dtype, device=h.device)[:, None].expand(n, batch, n)
        got = torch.autograd.grad(
            h, [leaf, *(s.a for s in sites)], basis, is_grads_batched=True, allow_unused=True
        )  # each (n_out, batch, ...)
        Jh = torch.zeros_like(basis) if got[0] is None else got[0]
        self.Jh = Jh.permute(1, 0, 2)  # (batch, n_out, n_in)
        self.terms = _terms(sites, tuple(g.permute(1, 0, 2) for g in got[1:]), names)

    def add_to(self, blocks: list[Tensor]) -> None:
        """blocks[k] (batch, n, numel_k) += dF/dtheta's columns of parameter k."""
        for block, (Da, u) in zip(blocks, self.terms, strict=True):
            if u is None:
                block.add_(Da)
            else:  # (batch, n, rows, cols)
                batch, n, rows = Da.shape
                block.view(batch, n, rows, u.shape[1]).addcmul_(Da[..., None], u[:, None, None, :])
