"""Independent oracles in torch autograd (float64) for the tests of every engine.

Nothing here uses the numpy engine's arithmetic: each oracle runs the model of SEMANTICS.md 1 as
plain torch code, one step at a time, and lets autograd differentiate it. Only the model's
parameter values (`model.params`, `model.f`, `model.g`) and, where a schedule is needed, the
windows of `tbptt.Truncation` are read from tbptt.

    exact_gradient      section 2: the whole sequence, one backward pass
    window_gradient     section 3: one window, h_{s-1} detached (a constant)
    frozen_gradient     section 5, frozen: the sum of window_gradient over a list of windows
    detach_every_k      section 4: the usual PyTorch loop that detaches the state every k steps
    bptt_h              section 4: Williams and Peng's BPTT(h): each loss backpropagated h steps
    theano_truncated    section 4: scan(truncate_gradient=k), as per-step parameter copies
    exact_state_gradients  dL/dh_t and h_0..h_T, for formulas written with them (the seed answer)
    OnlineTBPTT         section 5, online: the canonical rule with the graph kept, each step with
                        its own leaf copy of the parameters in force when it ran; torch.optim steps
                        (recompute=True: the forbidden substitute, to show a test can tell)
    plain_detach_training  ordinary PyTorch training, detaching every k steps (k1 = k2 online)

    Problem, assert_close, rel_err   tiny random problems and the comparison used by the tests

Arrays follow the engine's layout: x is (T, m) for one stream or (T, batch, m); y is (T, [batch,]
p) float for "l2" or integer (T, [batch]) for "cross_entropy"; mask and reset are (T, [batch]).
Gradients come back as numpy float64 arrays keyed like `tbptt.gradients`: A, B, C, [b, c,] h0.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from tbptt import Window

Tensor = torch.Tensor
DTYPE = torch.float64

ACTIVATIONS = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "identity": lambda a: a,
    "softmax": lambda z: torch.softmax(z, dim=-1),
}


# -- data and parameters ------------------------------------------------------------------------
def tensor(a: object, grad: bool = False) -> Tensor:
    """A float64 torch copy of a numpy array (a leaf that requires grad when asked)."""
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=DTYPE, requires_grad=grad)


def leaves(params: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """One fresh leaf tensor per parameter, holding a copy of its value."""
    return {k: tensor(v, grad=True) for k, v in params.items()}


class Data:
    """x, y, mask, reset promoted to (T, batch, ...) torch tensors; `single` if x had no batch
    axis."""

    def __init__(self, x, y, loss: str = "l2", mask=None, reset=None) -> None:
        x = np.asarray(x, dtype=np.float64)
        self.single = x.ndim == 2
        self.x = tensor(x[:, None, :] if self.single else x)  # (T, batch, m)
        T, batch = self.x.shape[:2]
        if loss == "cross_entropy":
            self.y = torch.as_tensor(np.asarray(y, dtype=np.int64).reshape(T, batch))  # (T, batch)
        else:
            self.y = tensor(np.asarray(y, dtype=np.float64).reshape(T, batch, -1))  # (T, batch, p)
        self.mask = None if mask is None else tensor(np.reshape(mask, (T, batch)))
        self.reset = None if reset is None else torch.as_tensor(np.reshape(reset, (T, batch)))
        self.loss = loss

    @property
    def T(self) -> int:
        return self.x.shape[0]

    @property
    def batch(self) -> int:
        return self.x.shape[1]


def initial_state(h0, n: int, data: Data, grad: bool) -> tuple[Tensor, Tensor]:
    """The h0 leaf in the shape the caller gave ((n,) when None and one stream) and its (batch, n)
    view."""
    if h0 is None:
        h0 = np.zeros(n) if data.single else np.zeros((data.batch, n))
    leaf = tensor(h0, grad=grad)
    return leaf, leaf.expand(data.batch, n)


# -- the model, one step at a time (SEMANTICS.md 1) -----------------------------------------------
def state_step(P: dict[str, Tensor], f: str, h_prev: Tensor, x_t: Tensor) -> Tensor:
    """h_t = f(A h_{t-1} + B x_t + b), rows are streams."""
    a = h_prev @ P["A"].T + x_t @ P["B"].T
    if "b" in P:
        a = a + P["b"]
    return ACTIVATIONS[f](a)


def step_loss(P: dict[str, Tensor], g: str, data: Data, h_t: Tensor, t: int) -> Tensor:
    """l_t per stream (batch,): 1/2 ||g(C h_t + c) - y_t||^2, or cross-entropy; times the mask."""
    mask_t = None if data.mask is None else data.mask[t]
    return loss_at(P, g, data.loss, h_t, data.y[t], mask_t)


def loss_at(P: dict[str, Tensor], g: str, loss: str, h_t: Tensor, y_t: Tensor, mask_t) -> Tensor:
    z = h_t @ P["C"].T
    if "c" in P:
        z = z + P["c"]
    if loss == "cross_entropy":
        l = F.cross_entropy(z, y_t, reduction="none")
    else:
        l = 0.5 * ((ACTIVATIONS[g](z) - y_t) ** 2).sum(dim=-1)
    return l if mask_t is None else l * mask_t


def restart(data: Data, t: int, h: Tensor, h0: Tensor) -> Tensor:
    """Where reset[t, j], stream j starts step t from h0 as a constant (SEMANTICS.md 6)."""
    return restart_at(None if data.reset is None else data.reset[t], h, h0)


def restart_at(reset_t, h: Tensor, h0: Tensor) -> Tensor:
    if reset_t is None or not bool(reset_t.any()):
        return h
    return torch.where(reset_t[:, None], h0.detach(), h)


def _as_numpy(grads: dict[str, Tensor | None], like: dict[str, Tensor]) -> dict[str, np.ndarray]:
    return {
        k: np.zeros(tuple(like[k].shape)) if g is None else g.detach().numpy().copy()
        for k, g in grads.items()
    }


def _grad(L: Tensor, inputs: dict[str, Tensor]) -> dict[str, np.ndarray]:
    values = torch.autograd.grad(L, list(inputs.values()), allow_unused=True)
    return _as_numpy(dict(zip(inputs, values, strict=True)), inputs)


# -- frozen oracles -----------------------------------------------------------------------------
def exact_gradient(model, x, y, h0=None, loss="l2", *, mask=None, reset=None):
    """(L, dL/dparams) by autograd through the whole sequence (SEMANTICS.md 2)."""
    data = Data(x, y, loss, mask, reset)
    P = leaves(model.params)
    h0_leaf, h = initial_state(h0, model.n, data, grad=True)
    L = torch.zeros((), dtype=DTYPE)
    for t in range(data.T):
        h = state_step(P, model.f, restart(data, t, h, h0_leaf), data.x[t])
        L = L + step_loss(P, model.g, data, h, t).sum()
    return float(L.detach()), _grad(L, {**P, "h0": h0_leaf})


def window_gradient(model, x, y, s, i, u, h0=None, loss="l2", *, mask=None, reset=None):
    """g^W for the window (s, u, I = [i, u]), 1-based: autograd over steps s..u from a detached
    h_{s-1}; the steps before s run without a graph (SEMANTICS.md 3)."""
    data = Data(x, y, loss, mask, reset)
    P = leaves(model.params)
    h0_leaf, h = initial_state(h0, model.n, data, grad=True)
    with torch.no_grad():
        for t in range(s - 1):  # steps 1..s-1: the trajectory, no gradient
            h = state_step(P, model.f, restart(data, t, h, h0_leaf), data.x[t])
    if s > 1:
        h = h.detach()  # h_{s-1} is a constant
    L = torch.zeros((), dtype=DTYPE)
    for t in range(s - 1, u):  # steps s..u
        h = state_step(P, model.f, restart(data, t, h, h0_leaf), data.x[t])
        if t + 1 >= i:
            L = L + step_loss(P, model.g, data, h, t).sum()
    return _grad(L, {**P, "h0": h0_leaf})


def frozen_gradient(model, x, y, windows: Iterable, h0=None, loss="l2", *, mask=None, reset=None):
    """The frozen TBPTT estimate: sum of window_gradient over windows (objects with s, i, u)."""
    data = Data(x, y, loss, mask, reset)
    total = {k: np.zeros(np.shape(v)) for k, v in model.params.items()}
    total["h0"] = np.zeros(tuple(initial_state(h0, model.n, data, grad=False)[0].shape))
    for w in windows:
        g = window_gradient(model, x, y, w.s, w.i, w.u, h0, loss, mask=mask, reset=reset)
        for k in total:
            total[k] += g[k]
    return total


def detach_every_k(model, x, y, k, flush=True, h0=None, loss="l2", *, mask=None, reset=None):
    """The usual PyTorch loop: run k steps, backward their losses, detach the state, repeat.

    Gradients accumulate in .grad over the chunks (frozen parameters). Without flush the last
    partial chunk is dropped, as Sutskever's pseudo-code drops the last T mod k losses.
    """
    data = Data(x, y, loss, mask, reset)
    P = leaves(model.params)
    h0_leaf, h = initial_state(h0, model.n, data, grad=True)
    for start in range(0, data.T, k):
        stop = min(start + k, data.T)
        if stop - start < k and not flush:
            break
        L = torch.zeros((), dtype=DTYPE)
        for t in range(start, stop):
            h = state_step(P, model.f, restart(data, t, h, h0_leaf), data.x[t])
            L = L + step_loss(P, model.g, data, h, t).sum()
        if L.requires_grad:
            L.backward()
        h = h.detach()  # repackage_hidden: the next chunk starts from a constant
    return _as_numpy({k: v.grad for k, v in {**P, "h0": h0_leaf}.items()}, {**P, "h0": h0_leaf})


def bptt_h(model, x, y, depth, h0=None, loss="l2", *, mask=None, reset=None):
    """Williams and Peng's BPTT(h): every loss l_t backpropagated through steps t-h+1..t."""
    data = Data(x, y, loss, mask, reset)
    P = leaves(model.params)
    h0_leaf, hb = initial_state(h0, model.n, data, grad=True)
    with torch.no_grad():  # the trajectory h_0..h_T, every stored state a constant
        states = [hb.detach()]
        for t in range(data.T):
            states.append(state_step(P, model.f, restart(data, t, states[-1], h0_leaf), data.x[t]))
    for t in range(data.T):
        s = max(0, t - depth + 1)  # 0-based first step of l_t's window
        h = hb if s == 0 else states[s]
        for r in range(s, t + 1):
            h = state_step(P, model.f, restart(data, r, h, h0_leaf), data.x[r])
        l = step_loss(P, model.g, data, h, t).sum()
        if l.requires_grad:
            l.backward()
    return _as_numpy({k: v.grad for k, v in {**P, "h0": h0_leaf}.items()}, {**P, "h0": h0_leaf})


def theano_truncated(model, x, y, k, h0=None, loss="l2"):
    """Theano's scan(truncate_gradient=k) with the output inside the scanned step: the gradient of
    the whole loss with respect to the parameters as used by the last k steps only.

    Each step gets its own leaf copy of the parameters; the full graph is built; the gradient is
    the sum over the copies of the last k steps, which is what a reverse scan over k steps sees.
    """
    data = Data(x, y, loss)
    h0_leaf, h = initial_state(h0, model.n, data, grad=True)
    copies, L = [], torch.zeros((), dtype=DTYPE)
    for t in range(data.T):
        P = leaves(model.params)
        copies.append(P)
        h = state_step(P, model.f, h, data.x[t])
        L = L + step_loss(P, model.g, data, h, t).sum()
    used = [(name, P[name]) for P in copies[max(0, data.T - k) :] for name in P]
    if k >= data.T:  # the reverse scan reaches the initial state
        used.append(("h0", h0_leaf))
    values = torch.autograd.grad(L, [v for _, v in used])
    out = {name: np.zeros(np.shape(v)) for name, v in model.params.items()}
    out["h0"] = np.zeros(tuple(h0_leaf.shape))
    for (name, _), g in zip(used, values, strict=True):
        out[name] += g.numpy()
    return out


def exact_state_gradients(model, x, y, h0=None, loss="l2"):
    """dL/dh_t for t = 1..T (T, [batch,] n) and the states h_0..h_T, by autograd (retain_grad)."""
    data = Data(x, y, loss)
    P = leaves(model.params)
    _, h = initial_state(h0, model.n, data, grad=False)
    states, L = [h], torch.zeros((), dtype=DTYPE)
    for t in range(data.T):
        h = state_step(P, model.f, h, data.x[t])
        h.retain_grad()
        states.append(h)
        L = L + step_loss(P, model.g, data, h, t).sum()
    L.backward()
    delta = torch.stack([s.grad for s in states[1:]]).numpy()
    H = torch.stack([s.detach() for s in states]).numpy()
    if data.single:
        return delta[:, 0], H[:, 0]
    return delta, H


# -- online oracle (SEMANTICS.md 5, canonical rule) ---------------------------------------------
def torch_optimizer(optimizer, params: list[Tensor]) -> torch.optim.Optimizer:
    """The torch.optim twin of a tbptt.SGD or tbptt.Adam."""
    name = type(optimizer).__name__
    if name == "SGD":
        return torch.optim.SGD(
            params, lr=optimizer.lr, momentum=optimizer.momentum, nesterov=optimizer.nesterov
        )
    if name == "Adam":
        return torch.optim.Adam(
            params, lr=optimizer.lr, betas=(optimizer.beta1, optimizer.beta2), eps=optimizer.eps
        )
    raise TypeError(f"no torch twin for {name}")


class OnlineTBPTT:
    """Online TBPTT(k1, k2) by the canonical rule, in torch autograd.

    The forward pass runs once. Step t uses its own leaf copy P_t of the parameter values in force
    when it ran, and the state graph is never cut (except by resets), so the graph of every kept
    step stays as it was computed. The update at u with window (s, u, I) is

        sum_{t=s..u} d(sum_{t' in I} l_t') / dP_t

    which is the derivative through steps s..u only: the losses depend on P_t for t < s only
    through h_{s-1}, and those copies are simply not asked for. torch.optim applies the update
    (after torch.nn.utils.clip_grad_norm_ when clip is set). Only the last k2 steps are looked
    up; the state's graph still reaches back to step 1, so memory and time grow with the stream
    (meant for test-sized streams).
    """

    def __init__(
        self,
        model,
        truncation,
        optimizer,
        loss="l2",
        clip=None,
        h0=None,
        recompute=False,
        reduction="sum",
    ) -> None:
        self.reduction = reduction  # "mean": L divided by its injected (step, stream) weights
        self.f, self.g, self.n = model.f, model.g, model.n
        self.names = list(model.params)
        self.W = leaves(model.params)  # the current parameters, updated in place by torch.optim
        self.opt = torch_optimizer(optimizer, list(self.W.values()))
        self.truncation, self.loss, self.clip = truncation, loss, clip
        self.h0_arg = h0
        self.h: Tensor | None = None
        self.h0: Tensor | None = None
        self.t = 0
        self.u_prev = 0
        self.updates = 0
        self.steps: dict[int, tuple[dict[str, Tensor], Tensor]] = {}  # t -> (P_t, l_t per stream)
        # recompute=True is the variant section 5 forbids as a silent substitute: re-run the
        # window from the stored h_{s-1} with the current parameters (to show the tests tell)
        self.recompute = recompute
        self.records: dict[int, tuple] = {}  # t -> (h_{t-1} detached, x_t, y_t, mask_t, reset_t)
        self.history: list[dict[str, np.ndarray]] = []  # parameters after each update

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in self.W.items()}

    def feed(self, x, y, mask=None, reset=None) -> float:
        """Run a chunk step by step, updating where the schedule says; the chunk's mean loss."""
        data = Data(x, y, self.loss, mask, reset)
        if self.h is None:
            h0 = self.h0_arg if self.h0_arg is not None else np.zeros(self.n)
            self.h0 = tensor(h0).expand(data.batch, self.n)
            self.h = self.h0
        total = 0.0
        for t in range(data.T):
            P = {k: v.detach().clone().requires_grad_() for k, v in self.W.items()}
            mask_t = None if data.mask is None else data.mask[t]
            reset_t = None if data.reset is None else data.reset[t]
            self.records[self.t + 1] = (self.h.detach(), data.x[t], data.y[t], mask_t, reset_t)
            self.records.pop(self.t + 1 - self.truncation.k2, None)
            self.h = state_step(P, self.f, restart(data, t, self.h, self.h0), data.x[t])
            l = step_loss(P, self.g, data, self.h, t)
            total += float(l.detach().sum())
            self.t += 1
            self.steps[self.t] = (P, l)
            self.steps.pop(self.t - self.truncation.k2, None)  # the graph of the last k2 steps
            if self.t % self.truncation.k1 == 0:
                self._update(self.truncation.window(self.t, self.u_prev))
        count = data.T * data.batch if data.mask is None else float(data.mask.sum())
        return total / count if count > 0 else 0.0  # sum(w l) / sum(w)

    def finish(self) -> None:
        """The flush update at the end of the stream (contract version 2, section 4): the next
        scheduled window, at u_prev + k1, cut at T; none when that leaves it empty."""
        tr = self.truncation
        if not (tr.flush and self.t % tr.k1 != 0):
            return
        s = max(1, self.u_prev + tr.k1 - tr.k2 + 1)
        if s > self.t:
            return
        i = {"new": self.u_prev + 1, "window": s, "last": self.t}[tr.inject]
        self._update(Window(s=s, i=i, u=self.t))

    def _update(self, w) -> None:
        if self.recompute:
            h, L = self.records[w.s][0], 0
            for t in w.steps:
                _, x_t, y_t, mask_t, reset_t = self.records[t]
                h = state_step(self.W, self.f, restart_at(reset_t, h, self.h0), x_t)
                if t >= w.i:
                    L = L + loss_at(self.W, self.g, self.loss, h, y_t, mask_t).sum()
            inputs = list(self.W.items())
        else:
            L = sum(self.steps[t][1].sum() for t in w.losses)
            inputs = [(k, self.steps[t][0][k]) for t in w.steps for k in self.names]
        if self.reduction == "mean":  # section 5, Reduction: the mean over injected losses
            masks = [self.records[t][3] for t in w.losses]
            N = sum(float(m.sum()) if m is not None else self.h.shape[0] for m in masks)
            L = L / N if N > 0 else L
        grads = torch.autograd.grad(L, [v for _, v in inputs], retain_graph=True, allow_unused=True)
        total = {k: torch.zeros_like(v) for k, v in self.W.items()}
        for (k, _), g in zip(inputs, grads, strict=True):
            if g is not None:
                total[k] += g
        for k, v in self.W.items():
            v.grad = total[k]
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.W.values()), self.clip)
        self.opt.step()
        self.u_prev = w.u
        self.updates += 1
        self.history.append(self.params)


def plain_detach_training(model, optimizer, k, chunks, loss="l2", clip=None):
    """Ordinary PyTorch training: forward k steps, backward, optimizer step, detach the state.

    chunks: a list of (x, y) pieces of one stream, concatenated in time; the last partial piece
    of fewer than k steps is not trained on (no flush). Returns the final parameters.
    """
    x = np.concatenate([c[0] for c in chunks])
    y = np.concatenate([c[1] for c in chunks])
    data = Data(x, y, loss)
    W = leaves(model.params)
    opt = torch_optimizer(optimizer, list(W.values()))
    h = torch.zeros(data.batch, model.n, dtype=DTYPE)
    for start in range(0, data.T - k + 1, k):
        opt.zero_grad()
        L = torch.zeros((), dtype=DTYPE)
        for t in range(start, start + k):
            h = state_step(W, model.f, h, data.x[t])
            L = L + step_loss(W, model.g, data, h, t).sum()
        L.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(W.values()), clip)
        opt.step()
        h = h.detach()
    return {k: v.detach().numpy().copy() for k, v in W.items()}


# -- test problems and comparison ----------------------------------------------------------------
class Problem:
    """A tiny random model with data: the same arguments go to the engine and to the oracles.

    `model` is a new ElmanRNN object on the initial values each time it is read: tbptt.TBPTT
    trains the model it is given, and every trainer of a test starts from the same values.
    """

    @property
    def model(self):
        return self._model.copy()

    @model.setter
    def model(self, value) -> None:
        self._model = value

    def __init__(
        self,
        T: int = 7,
        n: int = 3,
        m: int = 2,
        p: int = 2,
        batch: int | None = None,
        *,
        f: str = "tanh",
        g: str = "identity",
        loss: str = "l2",
        bias: bool = True,
        h0: bool = False,
        mask: bool = False,
        reset: bool = False,
        seed: int = 0,
        scale: float = 1.0,
    ) -> None:
        import tbptt

        if loss == "cross_entropy":
            g = "softmax"
        rng = np.random.default_rng(seed)
        A = rng.normal(0, scale / np.sqrt(n), (n, n))
        B = rng.normal(0, 1 / np.sqrt(m), (n, m))
        C = rng.normal(0, 1 / np.sqrt(n), (p, n))
        b, c = (rng.normal(0, 0.3, n), rng.normal(0, 0.3, p)) if bias else (None, None)
        self._model = tbptt.ElmanRNN(A, B, C, b, c, f=f, g=g)
        lead = (T,) if batch is None else (T, batch)
        self.x = rng.normal(size=(*lead, m))
        if loss == "cross_entropy":
            self.y = rng.integers(0, p, lead)
        else:
            self.y = rng.normal(0, 0.5, (*lead, p))
        self.h0 = None if not h0 else rng.normal(0, 0.5, n if batch is None else (batch, n))
        self.mask = (rng.random(lead) < 0.7).astype(np.float64) if mask else None
        self.reset = (rng.random(lead) < 0.25) if reset else None
        self.loss = loss
        self.T = T

    @property
    def kw(self) -> dict:
        """h0, loss, mask and reset, as keywords both the engine and the oracles accept."""
        return {"h0": self.h0, "loss": self.loss, "mask": self.mask, "reset": self.reset}


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want|| (the absolute error when want is 0)."""
    diff = float(np.linalg.norm(np.asarray(got) - np.asarray(want)))
    scale = float(np.linalg.norm(want))
    return diff / scale if scale > 0 else diff


def assert_close(got: dict, want: dict, rtol: float = 1e-10, atol: float = 1e-13) -> None:
    """Same keys and shapes; every array within rtol relative (atol absolute near zero)."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        a, b = np.asarray(got[k]), np.asarray(want[k])
        assert a.shape == b.shape, f"{k}: shape {a.shape} != {b.shape}"
        diff = float(np.linalg.norm(a - b))
        assert diff <= rtol * float(np.linalg.norm(b)) + atol, (
            f"{k}: relative error {rel_err(a, b):.3g} (abs {diff:.3g}) over {rtol:g}"
        )


def cpu_runs_bfloat16_lstm(m: int = 3) -> bool:
    """Whether torch itself (no tbptt) runs nn.LSTM forward and backward under bfloat16 autocast
    on this CPU: oneDNN needs AVX-512 (BF16) for it (ONEDNN_MAX_CPU_ISA=AVX2 turns it off)."""
    layer = torch.nn.LSTM(m, 4)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = layer(torch.randn(3, 2, m))
        out.float().sum().backward()
    except RuntimeError:
        return False
    return True
