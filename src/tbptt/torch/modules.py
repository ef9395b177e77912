"""Modules that follow the driver's protocol, module(x, state) -> (output, new_state), and losses.

ElmanRNN is the seed's model (SEMANTICS.md 1) as an nn.Module with the numpy engine's names:

    (1.1)  a_t = A h_{t-1} + B x_t + b
    (1.2)  h_t = f(a_t)
    (1.3)  z_t = C h_t + c
    (1.4)  yhat_t = g(z_t)

Its forward returns yhat_t = g(z_t) for an elementwise g, and the logits z_t when g = "softmax"
(cross_entropy_loss applies the softmax itself, as (1.5) with g = softmax asks). For f = tanh or
relu the steps (1.1)-(1.2) run on torch's RNN kernel, the one nn.RNN uses (same arithmetic, the
step loop in C++); other f step through time in Python. Integer inputs (ids (L, batch), the
ids of tbptt.OneHot) look B x_t up as a column of B (an embedding of B^T).

Recurrent wraps nn.RNN, nn.GRU or nn.LSTM (any number of layers) and an output head:
module(x, state) = (head(rnn(x, state).output), rnn(x, state).state); state None means zeros.

Losses return the contract's per-step, per-stream l_t, shape (L, batch) (or (batch, L) for
batch-first data); the driver masks them and sums over the injected steps and the streams:

    (1.5)  l_t = 1/2 ||yhat_t - y_t||^2          l2_loss
           l_t = -log softmax(z_t)[y_t]           cross_entropy_loss (integer targets)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..inputs import OneHot

Tensor = torch.Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "identity": lambda a: a,
}
OUTPUTS = (*ACTIVATIONS, "softmax")
FUSED = ("tanh", "relu")  # the f that torch's RNN kernel runs (nn.RNN's nonlinearity)
IDS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def l2_loss(output: Tensor, y: Tensor) -> Tensor:
    """l_t = 1/2 ||yhat_t - y_t||^2 over the last axis: (L, batch, p) -> (L, batch)."""
    if y.shape != output.shape:  # broadcasting would silently compute another loss
        o, g = tuple(output.shape), tuple(y.shape)
        if len(o) == len(g) and o[:-1] == g[:-1]:  # the driver passes pieces of a chunk: say p
            raise InputError(
                f"y has {g[-1]} values per step and stream, but the model outputs {o[-1]} "
                f"(l2_loss needs y of the output's shape (..., {o[-1]}))"
            )
        raise InputError(f"y must have the model output's shape {o} for l2_loss, got {g}")
    r = output - y  # (L, batch, p)
    return 0.5 * (r * r).sum(-1)


def cross_entropy_loss(logits: Tensor, y: Tensor) -> Tensor:
    """l_t = -log softmax(z_t)[y_t]: logits (L, batch, p), integer y (L, batch) -> (L, batch)."""
    lead = y.shape
    if lead != logits.shape[:-1] or y.is_floating_point():
        raise InputError(
            f"y must hold integer class indices of shape {tuple(logits.shape[:-1])} (the logits' "
            f"shape without the class axis) for cross_entropy_loss, got {y.dtype} {tuple(lead)}"
        )
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
    ).view(lead)


class ElmanRNN(nn.Module):
    """The seed's model h_t = f(A h_{t-1} + B x_t + b), yhat_t = g(C h_t + c) (SEMANTICS.md 1).

    Args:
        n: hidden units, m: inputs, p: outputs (keywords, as in tbptt.ElmanRNN.init).
        bias: whether the model has the biases b and c.
        f: state activation, one of tanh, sigmoid, relu, identity.
        g: output activation, one of tanh, sigmoid, relu, identity, softmax. With "softmax" the
            forward returns the logits z_t, for cross_entropy_loss.
        batch_first: x and the output are (batch, L, ...) instead of (L, batch, ...).
        dtype, device: of the parameters. seed: for the initial values (torch's default
            generator when None).

    Parameters A (n, n), B (n, m), C (p, n), b (n,), c (p,) start as tbptt.ElmanRNN.init's: uniform
    in +-1/sqrt(n), biases zero. The state is h (batch, n); None means zeros.
    """

    state_batch_dim = 0  # h is (batch, n)

    def __init__(
        self,
        *,
        n: int,
        m: int,
        p: int,
        bias: bool = True,
        f: str = "tanh",
        g: str = "identity",
        batch_first: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("n", n), ("m", m), ("p", p)):
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        if f not in ACTIVATIONS:
            raise InputError(f"f must be one of {tuple(ACTIVATIONS)}, got {f!r}")
        if g not in OUTPUTS:
            raise InputError(f"g must be one of {OUTPUTS}, got {g!r}")
        self.f, self.g, self.batch_first = f, g, bool(batch_first)
        kw = {"dtype": dtype, "device": device}
        self.A = nn.Parameter(torch.empty(n, n, **kw))
        self.B = nn.Parameter(torch.empty(n, m, **kw))
        self.C = nn.Parameter(torch.empty(p, n, **kw))
        self.b = nn.Parameter(torch.zeros(n, **kw)) if bias else None
        self.c = nn.Parameter(torch.zeros(p, **kw)) if bias else None
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        k = 1 / math.sqrt(n)
        with torch.no_grad():
            for W in (self.A, self.B, self.C):
                W.copy_(torch.rand(W.shape, generator=gen, dtype=torch.float64) * 2 * k - k)

    @property
    def n(self) -> int:
        return self.A.shape[0]

    @property
    def m(self) -> int:
        return self.B.shape[1]

    @property
    def p(self) -> int:
        return self.C.shape[0]

    def forward(self, x: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run (1.1)-(1.4) over x (L, batch, m) from h (batch, n); returns (yhat or z, h_L).

        x may also be integer ids (L, batch) of one-hot inputs (tbptt.OneHot's ids): B x_t is then
        column ids_t of B, looked up (an embedding of B^T), and dL/dB a scatter-add.
        """
        if isinstance(x, OneHot):
            x = torch.as_tensor(x.ids, device=self.A.device)
        ids = x.dtype in IDS  # integer inputs: one-hot x_t given by its index
        if self.batch_first:
            x = x.transpose(0, 1)  # (L, batch, m), or ids (L, batch)
        want = "(L, batch) integer ids" if ids else f"(L, batch, {self.m})"
        if x.dim() != (2 if ids else 3) or (not ids and x.shape[-1] != self.m):
            raise InputError(f"x must have shape {want}, got {tuple(x.shape)}")
        L, batch = x.shape[:2]
        if h is None:
            h = self.A.new_zeros(batch, self.n)
        elif not isinstance(h, Tensor) or h.shape != (batch, self.n):
            got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise InputError(f"state must have shape ({batch}, {self.n}) (batch, n), got {got}")
        if self.f in FUSED and not ids:
            H, h = self._fused(x, h)
        else:
            if ids:
                Bx = F.embedding(x.long(), self.B.T)  # (L, batch, n): column ids_t of B, every t
                if self.b is not None:
                    Bx = Bx + self.b
            else:
                Bx = F.linear(x, self.B, self.b)  # (L, batch, n): B x_t + b, one product
            f, AT = ACTIVATIONS[self.f], self.A.T
            hs = []
            for t in range(L):  # (1.1), (1.2): the only loop
                h = f(torch.addmm(Bx[t], h, AT))  # (batch, n): f(B x_t + b + A h_{t-1})
                hs.append(h)
            H = torch.stack(hs)  # (L, batch, n)
        z = F.linear(H, self.C, self.c)  # (L, batch, p): C h_t + c (1.3), one product
        out = z if self.g == "softmax" else ACTIVATIONS[self.g](z)  # (1.4)
        return (out.transpose(0, 1) if self.batch_first else out), h

    def _fused(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """(1.1), (1.2) for f = tanh or relu on torch's RNN kernel (what nn.RNN runs): the same
        arithmetic, (B x_t + b) + (A h_{t-1} + 0), with the step loop in C++ (or cuDNN)."""
        params: list[Tensor] = [self.B, self.A]
        if self.b is not None:  # nn.RNN has two biases; the seed's model has one
            params += [self.b, self.b.new_zeros(self.n)]
        rnn = torch._VF.rnn_tanh if self.f == "tanh" else torch._VF.rnn_relu
        H, h_n = rnn(x, h[None], params, self.b is not None, 1, 0.0, self.training, False, False)
        return H, h_n[0]  # (L, batch, n), (batch, n)

    # -- the numpy engine's model ---------------------------------------------------------------
    @classmethod
    def from_numpy(cls, model: object, *, batch_first: bool = False) -> ElmanRNN:
        """The same model (values, f, g, dtype) as a tbptt.ElmanRNN."""
        from ..numpy.elman import ElmanRNN as NumpyElman

        if not isinstance(model, NumpyElman):
            raise InputError(f"model must be a tbptt.ElmanRNN, got {type(model).__name__}")
        if (model.b is None) != (model.c is None):
            raise InputError("the torch ElmanRNN has both biases b and c or neither")
        dtype = torch.float64 if model.dtype == np.float64 else torch.float32
        out = cls(
            n=model.n,
            m=model.m,
            p=model.p,
            bias=model.b is not None,
            f=model.f,
            g=model.g,
            batch_first=batch_first,
            dtype=dtype,
        )
        with torch.no_grad():
            for k, v in model.params.items():
                getattr(out, k).copy_(torch.from_numpy(np.array(v)))
        return out

    def to_numpy(self) -> object:
        """This model's current values as a tbptt.ElmanRNN (numpy)."""
        from ..numpy.elman import ElmanRNN as NumpyElman

        def arr(p: Tensor) -> np.ndarray:
            return p.detach().cpu().numpy().copy()

        b, c = (None if p is None else arr(p) for p in (self.b, self.c))
        return NumpyElman(arr(self.A), arr(self.B), arr(self.C), b, c, f=self.f, g=self.g)

    def extra_repr(self) -> str:
        bias = self.b is not None
        return f"m={self.m}, n={self.n}, p={self.p}, f={self.f!r}, g={self.g!r}, bias={bias}"


class Recurrent(nn.Module):
    """module(x, state) -> (head(rnn_out), new_state) for nn.RNN, nn.GRU, nn.LSTM and the like.

    Args:
        rnn: a module called as rnn(x, state) -> (output, new_state); nn.RNN, nn.GRU and nn.LSTM
            (any layers, directions, proj_size, batch_first) are checked against their state shape.
        head: applied to the rnn's output (e.g. nn.Linear(hidden, p)); None means the identity.

    State None means zeros (the rnn's own default). nn.RNN and nn.GRU carry h, nn.LSTM (h, c), each
    (layers * directions, batch, hidden), batch on axis 1 even when batch_first.
    """

    def __init__(self, rnn: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(rnn, nn.Module):
            raise InputError(f"rnn must be an nn.Module, got {type(rnn).__name__}")
        if head is not None and not isinstance(head, nn.Module):
            raise InputError(f"head must be an nn.Module or None, got {type(head).__name__}")
        self.rnn, self.head = rnn, head
        if isinstance(rnn, nn.RNNBase):
            self.state_batch_dim = 1
        elif hasattr(rnn, "state_batch_dim"):
            self.state_batch_dim = rnn.state_batch_dim

    @property
    def batch_first(self) -> bool | None:
        """The rnn's layout when it declares one."""
        return getattr(self.rnn, "batch_first", None)

    def forward(self, x: Tensor, state: object = None) -> tuple[Tensor, object]:
        if state is not None and isinstance(self.rnn, nn.RNNBase):
            self._check_state(x, state)
        out, new_state = self.rnn(x, state)
        return (out if self.head is None else self.head(out)), new_state

    def _check_state(self, x: Tensor, state: object) -> None:
        rnn = self.rnn
        assert isinstance(rnn, nn.RNNBase)  # forward checks the state of an nn.RNNBase only
        batch = x.shape[0 if rnn.batch_first else 1] if x.dim() == 3 else None
        layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
        h_size = rnn.proj_size if getattr(rnn, "proj_size", 0) else rnn.hidden_size
        if isinstance(rnn, nn.LSTM):
            want = ((layers, batch, h_size), (layers, batch, rnn.hidden_size))
            pair = state if isinstance(state, tuple | list) and len(state) == 2 else None
            got = type(state).__name__ if pair is None else tuple(tuple(s.shape) for s in pair)
            ok = pair is not None and all(isinstance(s, Tensor) for s in pair) and got == want
            if not ok:
                raise InputError(
                    f"state must be (h, c) of shapes {want} for this nn.LSTM, got {got}"
                )
        else:
            want = (layers, batch, h_size)
            got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            if got != want:
                raise InputError(
                    f"state must be a tensor of shape {want} for this {type(rnn).__name__}, "
                    f"got {got}"
                )
