"""One step of nn.RNN, nn.GRU and nn.LSTM written out, for RTRL and UORO (SEMANTICS.md 8;
forward.py): the step's values, its tangent and its cotangents by hand, per stream.

Every weight W of these modules enters a step through a pre-activation that is linear in it,

    (C.1)  a_j = sum_W u_{W,j} W^T + b                  stream j; u_W its input (x_t, h_{t-1}, the
                                                        layer below's h_t), b the biases

so the derivatives of the step with respect to theta, for each stream j, are outer products of
that stream's rows: along a cotangent nu of the new state h_t,

    (C.2)  nu_j^T dF_j/dW = delta_j u_{W,j}^T,   nu_j^T dF_j/db = delta_j,
           delta_j = nu_j^T dF_j/da_j

and the Jacobian (RTRL) is dF_j/dW[i, (r, c)] = (dF_j/da_j)[i, r] u_{W,j}[c]. The batch's gradient
of the losses is the same with nu the losses' cotangent, summed over the streams:
dl/dW = sum_j delta_j u_{W,j}^T. So one forward pass of the step (values, and the tangent
(dF/dh) s beside them), the head and the loss under autograd, and one backward pass written out,
for the losses' cotangent and the rule's together (a leading axis of cotangents), give everything
RTRL and UORO need; nothing re-runs the step per stream.

The cell is used for Recurrent(rnn, head) with rnn an nn.RNN, nn.GRU or nn.LSTM of one
direction, without proj_size and without active dropout, and only after it reproduced the
module's own first step (forward.py); any other module takes torch.func's general path. Its
state is the flat vector of forward.FlatState: the layers' h, then (LSTM) the layers' c. The
equations are PyTorch's (torch.nn.LSTM's documentation), with sigma the logistic function:

    LSTM   (i, f, g, o) = (sigma, sigma, tanh, sigma)(a),  c_t = f c + i g,  h_t = o tanh(c_t)
    GRU    a_i = x W_ih^T + b_ih, a_h = h W_hh^T + b_hh (two pre-activations), (r, z) = sigma(a_i
           + a_h) on their first two thirds, n = tanh(a_i,n + r a_h,n), h_t = (h - n) z + n
    RNN    h_t = tanh(a) or relu(a)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

Tensor = torch.Tensor


@dataclass
class Site:
    """A pre-activation (batch, rows) of the step (C.1) and the trained parameters entering it
    linearly: (name, u) with u (batch, cols) the input of weight `name`, or (name, None) for a
    bias (frozen ones are constants, not listed)."""

    rows: int
    terms: list[tuple[str, Tensor | None]]


@dataclass
class Tape:
    """What a step keeps for its backward pass: each layer's values, the sites, the weights."""

    layers: list[tuple[Tensor, ...]] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    weights: list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]] = field(
        default_factory=list
    )  # each layer's (W_ih, W_hh, b_ih, b_hh) as the step used them


class Cell:
    """The step of Recurrent(rnn, head) written out: step() for the values and the tangent,
    vjp() for the cotangents; the head is applied by the caller (it is the module's own)."""

    def __init__(self, model: nn.Module, rnn: nn.RNNBase, names: dict[int, str]) -> None:
        self.model, self.rnn, self.names = model, rnn, names
        self.kind = "LSTM" if isinstance(rnn, nn.LSTM) else "GRU" if isinstance(rnn, nn.GRU) else ""
        self.relu = getattr(rnn, "nonlinearity", "tanh") == "relu"
        self.layers, self.hidden = rnn.num_layers, rnn.hidden_size
        self.n = self.layers * self.hidden * (2 if self.kind == "LSTM" else 1)
        self.n_top = self.layers * self.hidden  # the output, the last layer's h: h_t[n_top - H:]
        self.tdim = 1 if rnn.batch_first else 0  # x's time axis
        self._blocks: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._trained: dict[tuple[int, str], str | None] = {}  # (layer, kind): theta's name

    @property
    def head(self) -> nn.Module | None:
        return getattr(self.model, "head", None)

    def weights(self, k: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Layer k's W_ih, W_hh, b_ih, b_hh (None: no biases), as values."""
        rnn = self.rnn
        W_ih, W_hh = (getattr(rnn, f"{w}_l{k}").detach() for w in ("weight_ih", "weight_hh"))
        if not rnn.bias:
            return W_ih, W_hh, None, None
        b_ih, b_hh = (getattr(rnn, f"{w}_l{k}").detach() for w in ("bias_ih", "bias_hh"))
        return W_ih, W_hh, b_ih, b_hh

    def _site(self, tape: Tape, k: int, rows: int, terms: list[tuple[str, Tensor | None]]):
        """The site of a pre-activation of layer k: terms (weight kind, u), the trained ones
        (their names found once per layer and kind)."""
        kept = []
        for kind, u in terms:
            name = self._trained.get((k, kind), False)
            if name is False:
                p = getattr(self.rnn, f"{kind}_l{k}", None)
                name = self._trained[(k, kind)] = None if p is None else self.names.get(id(p))
            if name is not None:
                kept.append((name, u))
        tape.sites.append(Site(rows, kept))

    # -- the values and the tangent -------------------------------------------------------------
    @torch.no_grad()
    def step(
        self, x: Tensor, v: Tensor, s: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tape]:
        """From h_{t-1} = v (batch, n) and x_t (x's one step): the rnn's output (batch, hidden),
        h_t (batch, n), (dF/dh) s for a tangent s (batch, n) of h_{t-1} (None: none), the tape."""
        L, H, lstm = self.layers, self.hidden, self.kind == "LSTM"
        inp, t_inp, tape = x.select(self.tdim, 0), None, Tape()
        hs, cs, ths, tcs = [], [], [], []
        for k in range(L):
            W = self.weights(k)
            tape.weights.append(W)
            h0 = v[:, k * H : (k + 1) * H]
            th0 = None if s is None else s[:, k * H : (k + 1) * H]
            if lstm:
                c0 = v[:, (L + k) * H : (L + k + 1) * H]
                tc0 = None if s is None else s[:, (L + k) * H : (L + k + 1) * H]
                h, c, th, tc = self._lstm(tape, k, W, inp, h0, c0, t_inp, th0, tc0)
                cs.append(c)
                tcs.append(tc)
            elif self.kind == "GRU":
                h, th = self._gru(tape, k, W, inp, h0, t_inp, th0)
            else:
                h, th = self._rnn(tape, k, W, inp, h0, t_inp, th0)
            hs.append(h)
            ths.append(th)
            inp, t_inp = h, th
        new = torch.cat(hs + cs, 1)  # (batch, n)
        Js = None if s is None else torch.cat(ths + tcs, 1)
        return inp, new, Js, tape

    @staticmethod
    def _pre(W, x: Tensor, h0: Tensor, tx: Tensor | None, th0: Tensor | None):
        """a = x W_ih^T + b_ih + h0 W_hh^T + b_hh and its tangent (th0 W_hh^T + tx W_ih^T)."""
        a = torch.addmm(W[3], h0, W[1].t()) if W[3] is not None else h0 @ W[1].t()
        a.addmm_(x, W[0].t())
        if W[2] is not None:
            a += W[2]
        ta = None
        if th0 is not None:
            ta = th0 @ W[1].t()
            if tx is not None:
                ta.addmm_(tx, W[0].t())
        return a, ta

    def _lstm(self, tape, k, W, x, h0, c0, tx, th0, tc0):
        """One LSTM layer: h, c and their tangents.

        With act = (i, f, g, o) and act' its elementwise derivative, the step keeps
        Q = (g, c_{t-1}, i, tanh c_t) act' (batch, 4 hidden), f and dh_t/dc_t = o (1 - tanh^2 c_t):
        the tangent is tq = ta Q, tc = tq_i + tq_f + tq_g + f tc_{t-1}, th = tq_o + dh/dc tc, and
        the backward pass (_lstm_back) da = (gc', gc', gc', gh) Q with gc' = gc + gh dh/dc."""
        a, ta = self._pre(W, x, h0, tx, th0)
        self._site(tape, k, a.shape[1], [("weight_ih", x), ("weight_hh", h0)] + BIASES)
        H = self.hidden
        a[:, : 2 * H].sigmoid_()  # act in place of a: i, f
        a[:, 2 * H : 3 * H].tanh_()  # g
        a[:, 3 * H :].sigmoid_()  # o
        i, f, g, o = a.chunk(4, 1)
        c = torch.addcmul(f * c0, i, g)
        tc_ = c.tanh()
        h = o * tc_
        dh_dc = torch.addcmul(o, h, tc_, value=-1)  # o (1 - tanh^2 c)
        # act' = (1 - act)(act + b), b = 1 on g's block: s (1 - s) for sigma, 1 - g^2 for tanh
        Q = torch.cat((g, c0, i, tc_), 1).mul_((1 - a).mul_(a + self._tanh_block(a)))
        tape.layers.append((f, Q, dh_dc))
        if ta is None:
            return h, c, None, None
        assert tc0 is not None  # a tangent of h comes with one of c
        tq = ta.mul_(Q)
        tc = tq[:, : 3 * H].view(-1, 3, H).sum(1).addcmul_(f, tc0)
        th = torch.addcmul(tq[:, 3 * H :], dh_dc, tc)
        return h, c, th, tc

    def _tanh_block(self, like: Tensor) -> Tensor:
        """(4 hidden,): 1 on the block of g (tanh), 0 elsewhere (kept per dtype and device)."""
        b = self._blocks.get((like.dtype, like.device))
        if b is None:
            H = self.hidden
            b = torch.zeros(4 * H, dtype=like.dtype, device=like.device)
            b[2 * H : 3 * H] = 1
            self._blocks[(like.dtype, like.device)] = b
        return b

    def _gru(self, tape, k, W, x, h0, tx, th0):
        """One GRU layer: h and its tangent."""
        a_i = torch.addmm(W[2], x, W[0].t()) if W[2] is not None else x @ W[0].t()
        a_h = torch.addmm(W[3], h0, W[1].t()) if W[3] is not None else h0 @ W[1].t()
        self._site(tape, k, a_i.shape[1], [("weight_ih", x), ("bias_ih", None)])
        self._site(tape, k, a_h.shape[1], [("weight_hh", h0), ("bias_hh", None)])
        ir, iz, i_n = a_i.chunk(3, 1)
        hr, hz, h_n = a_h.chunk(3, 1)
        r, z = (hr + ir).sigmoid_(), (hz + iz).sigmoid_()
        n = (i_n + h_n * r).tanh_()
        h = (h0 - n) * z + n
        tape.layers.append((r, z, n, h_n, h0))
        if th0 is None:
            return h, None
        tr, tz, tn = (th0 @ W[1].t()).chunk(3, 1)
        if tx is not None:
            ti = (tx @ W[0].t()).chunk(3, 1)
            tr, tz, tn_i = tr + ti[0], tz + ti[1], ti[2]
        else:
            tn_i = 0
        tr = r * (1 - r) * tr
        tz = z * (1 - z) * tz
        tn = (1 - n * n) * (tn_i + tn * r + h_n * tr)
        return h, (th0 - tn) * z + (h0 - n) * tz + tn

    def _rnn(self, tape, k, W, x, h0, tx, th0):
        """One layer of nn.RNN (tanh or relu): h and its tangent."""
        a, ta = self._pre(W, x, h0, tx, th0)
        self._site(tape, k, a.shape[1], [("weight_ih", x), ("weight_hh", h0)] + BIASES)
        h = a.relu() if self.relu else a.tanh()
        dh = (a > 0).to(a.dtype) if self.relu else 1 - h * h  # f'(a)
        tape.layers.append((dh,))
        return h, None if ta is None else ta * dh

    # -- the cotangents -------------------------------------------------------------------------
    @torch.no_grad()
    def vjp(
        self, tape: Tape, cot: Tensor, top: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """Cotangents (K, batch, n) of h_t, and (K, batch, hidden) of the rnn's output (None:
        zero), pulled back through the step: each site's delta (K, batch, rows) (C.2) and the
        cotangents of h_{t-1} (K, batch, n)."""
        L, H, lstm = self.layers, self.hidden, self.kind == "LSTM"
        deltas: list[Tensor] = []
        dh0s: list[Tensor | None] = [None] * L
        dc0s: list[Tensor | None] = [None] * L
        above = top  # the cotangent of layer k's h from the layers above (and the output)
        for k in range(L - 1, -1, -1):
            W = tape.weights[k]
            gh = cot[..., k * H : (k + 1) * H]
            gh = gh if above is None else gh + above
            if lstm:
                gc = cot[..., (L + k) * H : (L + k + 1) * H]
                da, dc0s[k] = self._lstm_back(tape.layers[k], gh, gc)
                dh0, dx, got = da @ W[1], (da @ W[0] if k else None), [da]
            elif self.kind == "GRU":
                da_i, da_h, dh0 = self._gru_back(tape.layers[k], gh)
                dh0 = dh0 + da_h @ W[1]
                dx, got = (da_i @ W[0] if k else None), [da_i, da_h]
            else:
                da = gh * tape.layers[k][0]
                dh0, dx, got = da @ W[1], (da @ W[0] if k else None), [da]
            deltas[:0] = got
            dh0s[k], above = dh0, dx
        return deltas, torch.cat(dh0s + (dc0s if lstm else []), -1)  # type: ignore[arg-type]

    @staticmethod
    def _lstm_back(saved, gh: Tensor, gc: Tensor) -> tuple[Tensor, Tensor]:
        """An LSTM layer's pre-activation cotangent and c_{t-1}'s, from h_t's and c_t's."""
        f, Q, dh_dc = saved
        gc = torch.addcmul(gc, gh, dh_dc)
        return torch.cat((gc, gc, gc, gh), -1).mul_(Q), gc * f

    @staticmethod
    def _gru_back(saved, gh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A GRU layer's two pre-activation cotangents, and h_{t-1}'s direct one (through z)."""
        r, z, n, h_n, h0 = saved
        gz, gn = gh * (h0 - n), gh * (1 - z)
        gan = gn * (1 - n * n)  # of n's pre-activation a_i,n + r a_h,n
        gr = gan * h_n
        gar, gaz = gr * r * (1 - r), gz * z * (1 - z)
        return torch.cat((gar, gaz, gan), -1), torch.cat((gar, gaz, gan * r), -1), gh * z

    @staticmethod
    def param_grads(tape: Tape, deltas: list[Tensor]) -> dict[str, Tensor]:
        """The batch's gradient of each trained parameter from the sites' deltas (batch, rows)
        of one cotangent, summed over the streams: delta^T u, and delta for a bias."""
        out = {}
        for site, d in zip(tape.sites, deltas, strict=True):
            for k, u in site.terms:
                out[k] = d.sum(0) if u is None else d.t() @ u
        return out


BIASES: list[tuple[str, Tensor | None]] = [("bias_ih", None), ("bias_hh", None)]


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
    return Cell(model, rnn, {id(p): k for k, p in params.items()})


def _terms(
    sites: list[Site], deltas: list[Tensor], names: list[str]
) -> list[tuple[Tensor, Tensor | None]]:
    """(delta at the parameter's pre-activation, its input u or None) for each parameter of
    theta, in the order of names."""
    by_name = {k: (d, u) for site, d in zip(sites, deltas, strict=True) for k, u in site.terms}
    return [by_name[k] for k in names]


class OuterRows:
    """nu_j^T dF/dtheta for every stream j as outer products (C.2): per parameter of theta,
    delta (batch, rows) and its input u (batch, cols), or None for a bias. Never formed whole."""

    def __init__(self, sites: list[Site], deltas: list[Tensor], names: list[str]) -> None:
        self.terms = _terms(sites, deltas, names)

    def norm(self) -> Tensor:
        """(batch,) ||nu_j^T dF/dtheta||: ||delta u^T||^2 = ||delta||^2 ||u||^2."""
        total = None
        for delta, u in self.terms:
            d2 = (delta * delta).sum(1)
            d2 = d2 if u is None else d2 * (u * u).sum(1)
            total = d2 if total is None else total + d2
        assert total is not None  # theta is not empty
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
    """dF_j/dtheta for every stream j as outer products (C.2): per parameter of theta,
    dF_j/da_j (batch, n, rows) and u (batch, cols), or None for a bias. Never formed alone."""

    def __init__(self, sites: list[Site], Da: list[Tensor], names: list[str]) -> None:
        self.terms = _terms(sites, Da, names)

    def add_to(self, blocks: list[Tensor]) -> None:
        """blocks[k] (batch, n, numel_k) += dF/dtheta's columns of parameter k."""
        for block, (Da, u) in zip(blocks, self.terms, strict=True):
            if u is None:
                block.add_(Da)
            else:  # (batch, n, rows, cols)
                batch, n, rows = Da.shape
                block.view(batch, n, rows, u.shape[1]).addcmul_(Da[..., None], u[:, None, None, :])
