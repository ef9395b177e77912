"""tbptt.torch.rl against the contract's per-step references (SEMANTICS.md 9), float64.

ref_unroll    9(a) written out: each environment alone, one step per call, h_init at a start,
              the state detached at t = k, 2k, ...
ref_segments  9(b) written out: the segments found by walking each environment's steps, each run
              alone from h_init or states[tb], its burn-in without gradient.

Outputs, final states and the gradient of a random linear function of the outputs (every
parameter's, and x's) are compared to 1e-10 relative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from torch import nn

from tbptt import InputError
from tbptt.torch import ElmanRNN, MinGRU, Recurrent, ScanLM, rl
from tbptt.torch.packing import run as packed_run
from tbptt.torch.rounds import rounds

DT = torch.float64
M, H, P = 3, 5, 2
T, N = 11, 4
KINDS = ["rnn", "gru", "lstm", "bare_lstm", "elman", "elman_sigmoid", "user", "mingru", "lru_lm"]
STARTS = ("mingru", "lru_lm")  # modules that take the starts themselves (SEMANTICS.md 10)


class Leaky(nn.Module):
    """A user's module whose h_init is not zeros: h_t = tanh(W x_t + U h_{t-1}) + h_{t-1} / 2,
    state {"h": (N, H)}, no state_batch_dim (the batch axis is found from the shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.W, self.U, self.out = nn.Linear(M, H), nn.Linear(H, H, bias=False), nn.Linear(H, P)
        self.register_buffer("h0", torch.linspace(-1.0, 1.0, H))

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        h = self.h0.expand(x.shape[1], H) if state is None else state["h"]
        ys = []
        for t in range(x.shape[0]):
            h = torch.tanh(self.W(x[t]) + self.U(h)) + 0.5 * h
            ys.append(self.out(h))
        return (torch.stack(ys) if ys else x.new_zeros(0, x.shape[1], P)), {"h": h}


def make(kind: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(the module, its recurrent submodule, whose calls are counted)."""
    torch.manual_seed(seed)
    if kind in ("rnn", "gru", "lstm"):
        cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind]
        m = Recurrent(cls(M, H, num_layers=2), nn.Linear(H, P)).to(DT)
        return m, m.rnn
    if kind == "bare_lstm":
        m = nn.LSTM(M, H).to(DT)
        return m, m
    if kind.startswith("elman"):
        m = ElmanRNN(n=H, m=M, p=P, f="sigmoid" if kind.endswith("sigmoid") else "tanh", seed=1)
        return m.to(DT), m.to(DT)
    if kind == "mingru":
        m = MinGRU(M, H, dtype=DT)
        return m, m
    if kind == "lru_lm":  # two LRU blocks on an input projection: complex states, a tuple
        m = ScanLM("lru", M, H, P, num_layers=2, tokens=False, dtype=DT)
        return m, m
    m = Leaky().to(DT)
    return m, m


def batch_axis(kind: str) -> int:
    return 0 if kind.startswith("elman") or kind in ("user", *STARTS) else 1


def h_init_ref(kind: str, model: nn.Module) -> object:
    """h_init for one environment, written out per kind."""
    z = torch.zeros(2 if kind in ("rnn", "gru", "lstm") else 1, 1, H, dtype=DT)
    if kind in ("lstm", "bare_lstm"):
        return (z, z.clone())
    if kind.startswith("elman"):
        return torch.zeros(1, H, dtype=DT)
    if kind == "user":
        return {"h": model.h0[None].clone()}
    if kind == "mingru":
        return torch.zeros(1, H, dtype=DT)
    if kind == "lru_lm":
        return (torch.zeros(1, H, dtype=torch.complex128),) * 2
    return z


def tmap(fn, s):
    if isinstance(s, torch.Tensor):
        return fn(s)
    if isinstance(s, dict):
        return {k: tmap(fn, v) for k, v in s.items()}
    return tuple(tmap(fn, v) for v in s)


def tleaves(s) -> list[torch.Tensor]:
    if isinstance(s, torch.Tensor):
        return [s]
    return [t for v in (s.values() if isinstance(s, dict) else s) for t in tleaves(v)]


def tcat(states: list, d: int):
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(states, d)
    if isinstance(first, dict):
        return {k: tcat([s[k] for s in states], d) for k in first}
    return tuple(tcat([s[i] for s in states], d) for i in range(len(first)))


def rollout(seed: int = 0, T: int = T, N: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, N, M) requiring grad; starts with an episode starting at t = 0 (env 0), at T-1
    (env 1), at every step (env 2), never (env 3), and at random in the others."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, M, generator=g, dtype=DT).requires_grad_()
    starts = torch.rand(T, N, generator=g) < 0.25
    if N >= 4:
        starts[:, :4] = False
        starts[0, 0] = starts[T - 1, 1] = True
        starts[:, 2] = True
    return x, starts


def random_state(kind: str, model: nn.Module, lead: tuple[int, ...], N: int, seed: int):
    """A random state for N environments with `lead` axes in front (stored states, state0)."""
    g = torch.Generator().manual_seed(seed)
    one = h_init_ref(kind, model)
    d = batch_axis(kind)

    def rand(t: torch.Tensor) -> torch.Tensor:
        shape = list(t.shape)
        shape[d] = N
        return 0.5 * torch.randn(*lead, *shape, generator=g, dtype=t.dtype)  # complex: the LRU

    return tmap(rand, one)


def ref_unroll(kind, model, x, starts, state0, k):
    """9(a), one environment and one step per call: (y (T, N, P), final)."""
    T, N = starts.shape
    d = batch_axis(kind)
    ys = [[None] * N for _ in range(T)]
    finals = []
    for n in range(N):
        h = h_init_ref(kind, model)
        if state0 is not None:
            h = tmap(lambda s, n=n: s.narrow(d, n, 1), state0)
        for t in range(T):
            if starts[t, n]:
                h = h_init_ref(kind, model)
            elif k and t > 0 and t % k == 0:
                h = tmap(torch.Tensor.detach, h)
            out, h = model(x[t : t + 1, n : n + 1], h)
            ys[t][n] = out[0, 0]
        finals.append(tmap(torch.Tensor.detach, h))
    return torch.stack([torch.stack(r) for r in ys]), tcat(finals, d)


def ref_plan(starts: torch.Tensor, length: int | None, burn_in: int) -> list[tuple]:
    """The segments of 9(b) by walking each environment: (n, t0, t1, tb)."""
    T, N = starts.shape
    out = []
    for n in range(N):
        bounds, e, firsts = [], 0, []
        for t in range(T):
            if starts[t, n]:
                e = t
            if t == 0 or starts[t, n] or (length and (t - e) % length == 0):
                bounds.append(t)
                firsts.append(e)
        for i, t0 in enumerate(bounds):
            t1 = bounds[i + 1] - 1 if i + 1 < len(bounds) else T - 1
            out.append((n, t0, t1, max(t0 - burn_in, firsts[i])))
    return out


def ref_segment(kind, model, x, starts, states, n, t0, t1, tb) -> torch.Tensor:
    """9(b) for one segment: its outputs (t1 - t0 + 1, P)."""
    d = batch_axis(kind)
    if starts[tb, n]:
        h = h_init_ref(kind, model)
    else:
        h = tmap(lambda s: s[tb].narrow(d, n, 1), states)
    with torch.no_grad():
        for t in range(tb, t0):
            _, h = model(x[t : t + 1, n : n + 1], h)
    h = tmap(torch.Tensor.detach, h)
    ys = []
    for t in range(t0, t1 + 1):
        out, h = model(x[t : t + 1, n : n + 1], h)
        ys.append(out[0, 0])
    return torch.stack(ys)


def grads(model: nn.Module, x: torch.Tensor, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, [*params, x], allow_unused=True))


def close(a, b, rel: float = 1e-10) -> None:
    """Equal shapes and values within rel of the larger of 1 and the reference's largest value;
    a and b are states (tensors or nestings) or lists of tensors."""
    a = a if isinstance(a, list) else tleaves(a)
    b = b if isinstance(b, list) else tleaves(b)
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        u, v = u.detach(), v.detach()
        assert u.shape == v.shape
        if v.numel():
            assert float((u - v).abs().max()) <= rel * max(1.0, float(v.abs().max()))


# -- (a) ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3, T, None])
def test_unroll_equals_the_per_step_reference(kind: str, k: int | None) -> None:
    """9(a): outputs, final states and gradients equal the reference for every k."""
    model, _ = make(kind)
    x, starts = rollout()
    state0 = random_state(kind, model, (), N, seed=5)
    y, final = rl.unroll(model, x, starts, state0, k=k)
    y_ref, final_ref = ref_unroll(kind, model, x, starts, state0, k)
    close(y, y_ref)
    close(final, final_ref)
    W = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    close(grads(model, x, (W * y).sum()), grads(model, x, (W * y_ref).sum()))


@pytest.mark.parametrize("kind", KINDS)
def test_unroll_from_h_init_and_per_step_path(kind: str) -> None:
    """state0=None starts from h_init (not zeros for the user module); packed=False agrees."""
    model, _ = make(kind, seed=3)
    x, starts = rollout(seed=4)
    y_ref, final_ref = ref_unroll(kind, model, x, starts, None, 4)
    W = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    want = grads(model, x, (W * y_ref).sum())
    for packed in (True, False):
        y, final = rl.unroll(model, x, starts, k=4, packed=packed)
        close(y, y_ref)
        close(final, final_ref)
        close(grads(model, x, (W * y).sum()), want)


# -- (b) ----------------------------------------------------------------------------------------

PLANS = [(None, 0), (1, 0), (3, 0), (4, 2), (5, 7), (None, 3)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length,burn_in", PLANS)
def test_segments_in_shuffled_minibatches_equal_the_reference(kind, length, burn_in) -> None:
    """9(b): each shuffled minibatch's outputs and gradients equal its segments' references."""
    model, _ = make(kind, seed=1)
    x, starts = rollout(seed=2)
    states = random_state(kind, model, (T,), N, seed=9)  # stored with older parameters
    segs = rl.Segments(starts, length=length, burn_in=burn_in)
    plan = ref_plan(starts, length, burn_in)
    assert [(n, t0, t1 - t0 + 1) for n, t0, t1, _ in plan] == list(
        zip(segs.env.tolist(), segs.t0.tolist(), segs.lengths.tolist(), strict=True)
    )
    assert segs.L == max(t1 - t0 + 1 for _, t0, t1, _ in plan)
    g = torch.Generator().manual_seed(0)
    batches = list(segs.minibatches(3, generator=g))
    assert len(batches) == math.ceil(len(segs) / 3)
    assert sorted(torch.cat(batches).tolist()) == list(range(len(segs)))
    for idx in batches:
        y = segs.run(model, x, states, idx)  # (L, S', P)
        assert y.shape == (segs.L, idx.numel(), H if kind in ("bare_lstm", "mingru") else P)
        W = torch.randn(y.shape, generator=g, dtype=DT)  # weighs the padding too
        loss_ref = 0
        for j, s in enumerate(idx.tolist()):
            n, t0, t1, tb = plan[s]
            y_s = ref_segment(kind, model, x, starts, states, n, t0, t1, tb)
            close(y[: t1 - t0 + 1, j], y_s)
            assert (y[t1 - t0 + 1 :, j] == 0).all()
            loss_ref = loss_ref + (W[: t1 - t0 + 1, j] * y_s).sum()
        close(grads(model, x, (W * y).sum()), grads(model, x, loss_ref))


def test_segments_without_cuts_equal_unroll() -> None:
    """9(b) with length None, no burn-in and states from (a) equals (a) with k = None."""
    model, _ = make("lstm", seed=2)
    x, starts = rollout(seed=3)
    state0 = random_state("lstm", model, (), N, seed=4)
    states = rl.states(model, x, starts, state0)
    segs = rl.Segments(starts)
    y = segs.run(model, x, states)  # (L, S, P)
    y_a, _ = rl.unroll(model, x, starts, state0)
    close(segs.gather(y_a), y)
    W = torch.randn(y_a.shape, dtype=DT, generator=torch.Generator().manual_seed(0))
    close(grads(model, x, (segs.gather(W) * y).sum()), grads(model, x, (W * y_a).sum()))


@pytest.mark.parametrize("kind", ["gru", "mingru"])
def test_padding_and_other_steps_are_inert(kind: str) -> None:
    """NaN in x outside a minibatch's segments and burn-ins changes no output or gradient;
    gather puts zeros on the padding whatever the buffer holds."""
    model, _ = make(kind, seed=4)
    x, starts = rollout(seed=6)
    states = random_state(kind, model, (T,), N, seed=1)
    segs = rl.Segments(starts, length=4, burn_in=2)
    idx = torch.tensor([5, 0, 9])
    plan = ref_plan(starts, 4, 2)
    used = torch.zeros(T, N, dtype=torch.bool)
    for s in idx.tolist():
        n, t0, t1, tb = plan[s]
        used[tb : t1 + 1, n] = True
    x2 = x.detach().clone()
    x2[~used] = float("nan")
    x2.requires_grad_()
    y, y2 = segs.run(model, x, states, idx), segs.run(model, x2, states, idx)
    close(y2, y)
    W = torch.randn(y.shape, dtype=DT)
    g, g2 = grads(model, x, (W * y).sum()), grads(model, x2, (W * y2).sum())
    close(g2[:-1], g[:-1])
    close([g2[-1][used]], [g[-1][used]])
    assert (g2[-1][~used] == 0).all()
    buf = torch.randn(T, N, 2, dtype=DT)
    buf[~used] = float("nan")
    got = segs.gather(buf, idx)
    assert (got[~segs.mask[:, idx]] == 0).all() and not got.isnan().any()


# -- states and acting ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lstm", "elman", "user", "lru_lm"])
def test_states_and_acting_follow_the_reference(kind: str) -> None:
    """rl.states is the state before every step of 9(a); at= fills exactly the steps asked for;
    rl.restart in a collection loop (9(c)) gives the same states."""
    model, _ = make(kind, seed=7)
    x, starts = rollout(seed=8)
    x = x.detach()
    d = batch_axis(kind)
    state0 = random_state(kind, model, (), N, seed=3)
    ref = []  # the state step t starts from, per step, all environments
    with torch.no_grad():
        for t in range(T):
            ref.append(
                tcat([_state_before(kind, model, x, starts, state0, t, n) for n in range(N)], d)
            )
    ref_all = _stack_time(ref)  # leaves (T, ...)
    close(rl.states(model, x, starts, state0), ref_all)
    segs = rl.Segments(starts, length=3, burn_in=1)
    part = rl.states(model, x, starts, state0, at=segs.stored)
    for got, want in zip(tleaves(part), tleaves(ref_all), strict=True):
        sel = segs.stored.view(T, *([1] * d), N, *([1] * (got.dim() - d - 2))).expand_as(got)
        close([got[sel]], [want[sel]])
        assert got[~sel].isnan().all()
    init = rl.h_init(model, x)
    state, acted = state0, []
    with torch.no_grad():
        for t in range(T):
            state = rl.restart(state, starts[t], init, module=model)
            acted.append(state)
            _, state = model(x[t : t + 1], state)
    close(_stack_time(acted), ref_all)


def _state_before(kind, model, x, starts, state0, t, n):
    d = batch_axis(kind)
    h = tmap(lambda s: s.narrow(d, n, 1), state0)
    for u in range(t + 1):
        if starts[u, n]:
            h = h_init_ref(kind, model)
        if u < t:
            _, h = model(x[u : u + 1, n : n + 1], h)
    return h


def _stack_time(per_step: list):
    first = per_step[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(per_step)
    if isinstance(first, dict):
        return {k: _stack_time([s[k] for s in per_step]) for k in first}
    return tuple(_stack_time([s[i] for s in per_step]) for i in range(len(first)))


# -- calls ----------------------------------------------------------------------------------------


def count(sub: nn.Module) -> list:
    calls: list = []
    sub.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("kind", ["gru", "lstm", "bare_lstm", "elman"])
def test_calls_grow_with_neither_environments_nor_episode_starts(kind: str) -> None:
    """The recurrent module is called at most floor(log2 T) + 1 times for (a) and (b), plus one
    call per BPTT window for k; the same bound for 2 environments without starts and 64 with
    many."""
    Tl = 40
    bound = int(math.log2(Tl)) + 1
    for Nl, p in ((2, 0.0), (64, 0.3)):
        model, sub = make(kind)
        calls = count(sub)
        g = torch.Generator().manual_seed(Nl)
        x = torch.randn(Tl, Nl, M, dtype=DT, generator=g)
        starts = torch.rand(Tl, Nl, generator=g) < p
        rl.unroll(model, x, starts)
        assert len(calls) <= bound
        calls.clear()
        rl.unroll(model, x, starts, k=7)
        assert len(calls) <= int(math.log2(7)) + 1 + math.ceil(Tl / 7) - 1
        segs = rl.Segments(starts, length=16, burn_in=4)
        states = rl.states(model, x, starts, at=segs.stored)
        calls.clear()
        segs.run(model, x, states)
        assert len(calls) <= 2 * (int(math.log2(16)) + 1)  # burn-ins, then segments
        calls.clear()
        rl.unroll(model, x, starts, packed=False)
        assert len(calls) == Tl


def test_a_module_that_takes_starts_is_called_once_per_piece() -> None:
    """MinGRU takes the starts: unroll calls it once (once per BPTT window with k), Segments.run
    once for a minibatch (once more for burn-ins of one length), for 2 environments without starts
    and 16 with many; outputs, final states and gradients equal the per-step reference."""
    Tl = 40
    for Nl, p in ((2, 0.0), (16, 0.3)):
        model = MinGRU(M, H, dtype=DT)
        calls = count(model)
        g = torch.Generator().manual_seed(Nl)
        x = torch.randn(Tl, Nl, M, dtype=DT, generator=g).requires_grad_()
        starts = torch.rand(Tl, Nl, generator=g) < p
        for k in (None, 7):
            calls.clear()
            y, final = rl.unroll(model, x, starts, k=k)
            assert len(calls) == math.ceil(Tl / (k or Tl))
            y_ref, final_ref = ref_unroll("mingru", model, x, starts, None, k)
            close(y, y_ref)
            close(final, final_ref)
            W = torch.randn(y.shape, generator=g, dtype=DT)
            close(grads(model, x, (W * y).sum()), grads(model, x, (W * y_ref).sum()))
        for burn_in, want in ((0, 1), (4, 2)):
            segs = rl.Segments(starts, length=16, burn_in=burn_in)
            states = rl.states(model, x.detach(), starts, at=segs.stored)
            idx = next(segs.minibatches(5, generator=g))
            calls.clear()
            y = segs.run(model, x, states, idx)  # (L, S', H)
            plan = ref_plan(starts, 16, burn_in)
            warm = any(plan[s][3] < plan[s][1] for s in idx.tolist())
            assert len(calls) == (want if warm else 1)
            assert warm or Nl > 2 or burn_in == 0  # 2 environments without starts: burn-ins
            W = torch.randn(y.shape, generator=g, dtype=DT)
            loss_ref = 0
            for j, s in enumerate(idx.tolist()):
                n, t0, t1, tb = plan[s]
                y_s = ref_segment("mingru", model, x, starts, states, n, t0, t1, tb)
                close(y[: t1 - t0 + 1, j], y_s)
                assert (y[t1 - t0 + 1 :, j] == 0).all()
                loss_ref = loss_ref + (W[: t1 - t0 + 1, j] * y_s).sum()
            close(grads(model, x, (W * y).sum()), grads(model, x, loss_ref))


# -- the packing core as the driver will call it ----------------------------------------------


def test_packing_core_batch_first_and_the_drivers_zero_state() -> None:
    """packing.run with time_dim=1, state None and restart None (the driver's convention:
    zeros) equals calls split at every reset row, as the driver's _outputs makes them."""
    torch.manual_seed(0)
    lstm = nn.LSTM(M, H, batch_first=True).to(DT)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, T, M, dtype=DT, generator=g).requires_grad_()  # (batch, L, m)
    reset = torch.rand(N, T, generator=g) < 0.3
    reset[:, 4] = False
    outs, state = [], None
    for t in range(T):  # the reference: one step per call, zeros where reset
        if reset[:, t].any() and state is not None:
            keep = (~reset[:, t]).to(DT).view(1, N, 1)
            state = tuple(s * keep for s in state)
        out, state = lstm(x[:, t : t + 1], state)
        outs.append(out)
    y_ref = torch.cat(outs, dim=1)
    y, final = packed_run(lstm, x, reset, None, None, [1, 1], time_dim=1)
    close(y, y_ref)
    close(final, state)
    W = torch.randn(y.shape, dtype=DT, generator=g)
    close(grads(lstm, x, (W * y).sum()), grads(lstm, x, (W * y_ref).sum()))


@settings(max_examples=200, deadline=None)
@given(lengths=hs.lists(hs.integers(1, 300), min_size=1, max_size=60), bits=hs.integers(0, 2**60))
def test_rounds_run_every_piece_and_read_ends_exactly(lengths, bits) -> None:
    """Every piece runs at least its steps in order, a read end exactly; the sizes add up to the
    longest length, in at most floor(log2 L) + 1 calls."""
    length = np.array(lengths)
    need_end = np.array([(bits >> i) & 1 for i in range(length.size)], dtype=bool)
    done = np.zeros_like(length)
    schedule = rounds(length, need_end)
    for size, which, offset in schedule:
        assert (offset == done[which]).all() and (done[which] < length[which]).all()
        done[which] += size
    assert (done >= length).all() and (done[need_end] == length[need_end]).all()
    assert sum(size for size, _, _ in schedule) == length.max()
    assert len(schedule) <= int(math.log2(length.max())) + 1


# -- random shapes ------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    T_=hs.integers(1, 9),
    N_=hs.integers(1, 4),
    bits=hs.integers(0, 2**36 - 1),
    k=hs.one_of(hs.none(), hs.integers(1, 9)),
    length=hs.one_of(hs.none(), hs.integers(1, 9)),
    burn_in=hs.integers(0, 4),
)
def test_random_rollouts_equal_the_references(T_, N_, bits, k, length, burn_in) -> None:
    """Any starts, k, length and burn-in: (a) and (b) equal their references (GRU)."""
    model, _ = make("gru", seed=bits % 7)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(T_, N_, M, dtype=DT, generator=g).requires_grad_()
    starts = torch.tensor([(bits >> i) & 1 for i in range(T_ * N_)], dtype=torch.bool)
    starts = starts.view(T_, N_)
    y, final = rl.unroll(model, x, starts, k=k)
    y_ref, final_ref = ref_unroll("gru", model, x, starts, None, k)
    close(y, y_ref)
    close(final, final_ref)
    W = torch.randn(y.shape, dtype=DT, generator=g)
    close(grads(model, x, (W * y).sum()), grads(model, x, (W * y_ref).sum()))
    states = random_state("gru", model, (T_,), N_, seed=bits % 11)
    segs = rl.Segments(starts, length=length, burn_in=burn_in)
    ys = segs.run(model, x, states)
    for j, (n, t0, t1, tb) in enumerate(ref_plan(starts, length, burn_in)):
        close(ys[: t1 - t0 + 1, j], ref_segment("gru", model, x, starts, states, n, t0, t1, tb))


# -- bad input ----------------------------------------------------------------------------------


def bad_cases():
    model, _ = make("lstm")
    x, starts = rollout()
    x = x.detach()
    segs = rl.Segments(starts, length=3, burn_in=1)
    states = rl.states(model, x, starts)
    wrong_n = random_state("lstm", model, (), N + 1, seed=0)
    short = tuple(s[:-1] for s in states)
    return model, [
        ("starts", lambda: rl.unroll(model, x, starts.float())),
        ("starts", lambda: rl.unroll(model, x, starts[0])),
        ("x", lambda: rl.unroll(model, x[:-1], starts)),
        ("x", lambda: segs.run(model, x[:, :-1], states)),
        ("state0", lambda: rl.unroll(model, x, starts, wrong_n)),
        ("state0", lambda: rl.states(model, x, starts, wrong_n)),
        ("k", lambda: rl.unroll(model, x, starts, k=0)),
        ("states", lambda: segs.run(model, x, None)),
        ("states", lambda: segs.run(model, x, short)),
        ("length", lambda: rl.Segments(starts, length=0)),
        ("burn_in", lambda: rl.Segments(starts, burn_in=-1)),
        ("index", lambda: segs.run(model, x, states, torch.tensor([0, len(segs)]))),
        ("index", lambda: segs.gather(x, torch.tensor([1, 1]))),
        ("buf", lambda: segs.gather(x[:, :-1])),
        ("size", lambda: segs.minibatches(0)),
        ("at", lambda: rl.states(model, x, starts, at=segs.stored[1:])),
        ("starts_t", lambda: rl.restart(None, starts[0].float(), states)),
        ("module", lambda: rl.unroll(nn.Linear(M, P), x, starts)),
        ("state", lambda: packed_run(model, x, starts, wrong_n, None, 1)),
    ]


def test_bad_input_is_one_input_error_naming_the_argument_before_any_call() -> None:
    """Each bad argument raises InputError naming it, before the recurrent module runs."""
    model, cases = bad_cases()
    calls = count(model.rnn)
    for name, fn in cases:
        with pytest.raises(InputError, match=rf"\b{name}\b"):
            fn()
    assert not calls


def test_a_module_that_takes_starts_gets_its_bad_states_named_before_any_call() -> None:
    """state0 for another N and states of another T, for a module that takes starts (rl checks
    their batch and time axes itself, not by calling for h_init): InputError naming them."""
    model = MinGRU(M, H, dtype=DT)
    calls = count(model)
    x, starts = rollout()
    segs = rl.Segments(starts, length=3)
    with pytest.raises(InputError, match=r"state0 must hold the module's state for N=4"):
        rl.unroll(model, x, starts, torch.zeros(N + 1, H, dtype=DT))
    with pytest.raises(InputError, match=r"states must hold a time axis of 11 steps"):
        segs.run(model, x, torch.zeros(T - 1, N, H, dtype=DT))
    assert not calls
