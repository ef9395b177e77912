"""The torch driver on nn.LSTM, nn.GRU and nn.RNN against hand-written autograd references
(float64).

canonical     SEMANTICS.md 5 written out step by step: every step records the state it started
              from and the parameter values in force; each update re-runs its window s..u from
              the recorded h_{s-1}, each step with its own recorded values, and takes the
              autograd gradient of the injected losses. Independent of the driver's segments.
detach loop   the plain PyTorch loop: detach the state, run k steps, loss.backward(), step.
"""

from __future__ import annotations

import pytest
import torch
from reference import cpu_runs_bfloat16_lstm
from torch import nn
from torch.func import functional_call

import tbptt
from tbptt import InputError
from tbptt.torch import TBPTT, Recurrent, l2_loss

DT = torch.float64
M, H, P, BATCH, T = 3, 5, 2, 2, 29
CHUNKS = [(0, 4), (4, 11), (11, 12), (12, 29)]


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, BATCH, M, generator=g, dtype=DT)
    y = torch.randn(T, BATCH, P, generator=g, dtype=DT)
    reset = torch.rand(T, BATCH, generator=g) < 0.12
    return x, y, reset


def lstm(kind: type = nn.LSTM, layers: int = 2, seed: int = 1, **kw) -> Recurrent:
    torch.manual_seed(seed)
    return Recurrent(kind(M, H, num_layers=layers, **kw), nn.Linear(H, P)).to(DT)


def canonical(model, trunc, opt, x, y, reset=None, clip=None) -> None:
    """Online TBPTT by the canonical rule, replayed step by step (module docstring)."""
    named = dict(model.named_parameters())
    entering, used = [], []  # per step: the state it started from, the index of its values
    values: list[dict[str, torch.Tensor]] = []
    state, u_prev = None, 0

    def restart(s, t):  # (6.1) for step t (0-based)
        if reset is None or s is None or not reset[t].any():
            return s
        where = reset[t].view(1, -1, 1)
        if isinstance(s, torch.Tensor):
            return torch.where(where, torch.zeros((), dtype=DT), s)
        return tuple(torch.where(where, torch.zeros((), dtype=DT), si) for si in s)

    for t in range(x.shape[0]):
        if u_prev == t:  # the first step after an update: the values in force from now on
            values.append({k: v.detach().clone() for k, v in named.items()})
        with torch.no_grad():
            state = restart(state, t)
            entering.append(state)
            _, state = model(x[t : t + 1], state)
        used.append(len(values) - 1)
        if trunc.is_update(t + 1):
            w = trunc.window(t + 1, u_prev)
            leaves = [{k: v.clone().requires_grad_() for k, v in V.items()} for V in values]
            h, L = entering[w.s - 1], 0
            for r in range(w.s - 1, w.u):  # steps s..u, 0-based r
                h = h if r == w.s - 1 else restart(h, r)
                out, h = functional_call(model, leaves[used[r]], (x[r : r + 1], h))
                if r + 1 >= w.i:
                    L = L + l2_loss(out, y[r : r + 1]).sum()
            flat = [v for V in leaves for v in V.values()]
            grads = torch.autograd.grad(L, flat, allow_unused=True)
            acc: dict[str, torch.Tensor] = {}
            it = iter(grads)
            for V in leaves:
                for k in V:
                    g = next(it)
                    if g is not None:
                        acc[k] = acc[k] + g if k in acc else g
            for k, p in named.items():
                p.grad = acc.get(k)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(list(named.values()), clip)
            opt.step()
            u_prev = t + 1


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(
        float((p - q).abs().max().detach())
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


@pytest.mark.parametrize(
    "k1, k2, inject",
    [(2, 5, "new"), (3, 3, "new"), (2, 7, "window"), (3, 5, "last"), (5, 2, "window")],
)
@pytest.mark.parametrize("resets", [False, True])
def test_lstm_equals_canonical_reference(k1: int, k2: int, inject: str, resets: bool) -> None:
    """A 2-layer nn.LSTM with a head, trained online with Adam: the canonical rule to 1e-10."""
    x, y, reset = data()
    reset = reset if resets else None
    trunc = tbptt.Truncation(k1, k2, inject)
    model = lstm()
    driver = TBPTT(model, trunc, torch.optim.Adam(model.parameters(), lr=0.01), clip=0.5)
    for a, b in CHUNKS:
        driver.feed(x[a:b], y[a:b], reset=None if reset is None else reset[a:b])
    ref = lstm()
    canonical(ref, trunc, torch.optim.Adam(ref.parameters(), lr=0.01), x, y, reset, clip=0.5)
    assert driver.updates == len(trunc.update_times(T))
    assert max_diff(model, ref) < 1e-10


@pytest.mark.parametrize("kind", [nn.GRU, nn.RNN])
def test_gru_and_rnn_equal_canonical_reference(kind: type) -> None:
    """nn.GRU and nn.RNN (one state tensor, 2 layers) with overlapping windows and resets."""
    x, y, reset = data()
    trunc = tbptt.Truncation(3, 7, "new")
    model = lstm(kind)
    driver = TBPTT(model, trunc, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for a, b in CHUNKS:
        driver.feed(x[a:b], y[a:b], reset=reset[a:b])
    ref = lstm(kind)
    canonical(ref, trunc, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), x, y, reset)
    assert max_diff(model, ref) < 1e-10


def detach_loop(model, opt, x, y, k, clip) -> None:
    """The plain loop: repackage the hidden state, k steps, loss.backward(), clip, step."""
    state = None
    for a in range(0, x.shape[0], k):
        if state is not None:
            state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        out, state = model(x[a : a + k], state)
        loss = l2_loss(out, y[a : a + k]).sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_k1_equals_k2_is_the_detach_loop_bit_for_bit(kind: type, dtype: torch.dtype) -> None:
    """k1 = k2 = k: the driver's parameters equal the plain detach-every-k loop's exactly."""
    x, y, _ = data()
    x, y, k = x[:28].to(dtype), y[:28].to(dtype), 4
    model, ref = lstm(kind).to(dtype), lstm(kind).to(dtype)
    driver = TBPTT(
        model, tbptt.Truncation(k, k), torch.optim.Adam(model.parameters(), lr=0.01), clip=0.1
    )
    for a in range(0, 28, 8):  # chunks of 2k: each split into two k-step module calls
        driver.feed(x[a : a + 8], y[a : a + 8])
    detach_loop(ref, torch.optim.Adam(ref.parameters(), lr=0.01), x, y, k, 0.1)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("k1, k2, inject", [(2, 5, "new"), (3, 3, "new"), (3, 8, "last")])
def test_checkpointing_changes_no_number(k1: int, k2: int, inject: str) -> None:
    """checkpoint=True (torch.utils.checkpoint per segment) gives the same parameters, dropout
    on."""
    x, y, reset = data()
    trunc = tbptt.Truncation(k1, k2, inject, flush=True)
    results = []
    for ckpt in (False, True):
        model = lstm(dropout=0.3)
        torch.manual_seed(7)
        driver = TBPTT(model, trunc, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint=ckpt)
        for a, b in CHUNKS:
            driver.feed(x[a:b], y[a:b], reset=reset[a:b])
        driver.finish()
        results.append(model)
    for p, q in zip(results[0].parameters(), results[1].parameters(), strict=True):
        assert torch.equal(p, q)


def test_batch_first_equals_time_major() -> None:
    """An nn.LSTM(batch_first=True) fed (batch, L, m) chunks trains like the time-major one."""
    x, y, reset = data()
    trunc = tbptt.Truncation(2, 5, "new", flush=True)
    models = []
    for bf in (False, True):
        model = lstm(batch_first=bf)
        driver = TBPTT(model, trunc, torch.optim.SGD(model.parameters(), lr=0.1), batch_first=bf)
        for a, b in CHUNKS:
            tx = lambda v: v.transpose(0, 1) if bf else v  # noqa: E731, B023
            driver.feed(tx(x[a:b]), tx(y[a:b]), reset=tx(reset[a:b]))
        driver.finish()
        models.append(model)
    assert max_diff(*models) < 1e-12


class DictCell(nn.Module):
    """A module whose state is a dict holding a tuple: {"h": h, "mem": (c, count)}."""

    state_batch_dim = 0

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(M, H)
        self.head = nn.Linear(H, P)

    def forward(self, x, state):
        if state is None:
            z = x.new_zeros(x.shape[1], H)
            state = {"h": z, "mem": (z, x.new_zeros(x.shape[1], 1))}
        h, (c, n) = state["h"], state["mem"]
        outs = []
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], (h, c))
            n = n + 1
            outs.append(self.head(h))
        return torch.stack(outs), {"h": h, "mem": (c, n)}


def test_nested_dict_state_matches_lstm_cell_reference() -> None:
    """A dict-of-tuple state trains like the same cell unrolled by the canonical reference."""
    x, y, _ = data()
    trunc = tbptt.Truncation(2, 5, "new")
    torch.manual_seed(3)
    model = DictCell().to(DT)
    driver = TBPTT(model, trunc, torch.optim.SGD(model.parameters(), lr=0.1))
    for a, b in CHUNKS:
        driver.feed(x[a:b], y[a:b])
    assert set(driver.state) == {"h", "mem"} and driver.state["mem"][1][0, 0] == T
    torch.manual_seed(3)
    ref = DictCell().to(DT)
    wrapped = _TupleState(ref)
    canonical(wrapped, trunc, torch.optim.SGD(ref.parameters(), lr=0.1), x, y)
    assert max_diff(model, ref) < 1e-10


class _TupleState(nn.Module):
    """DictCell with its state flattened to a tuple, for the reference's restart()."""

    def __init__(self, inner: DictCell) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, state):
        s = None if state is None else {"h": state[0], "mem": (state[1], state[2])}
        out, new = self.inner(x, s)
        return out, (new["h"], *new["mem"])


def test_memory_is_bounded_by_k2() -> None:
    """Over a long stream the driver keeps the graph of at most k2 steps (and records of k1 +
    k2)."""
    k1, k2 = 3, 7
    model = lstm(layers=1)
    driver = TBPTT(
        model,
        tbptt.Truncation(k1, k2, "new", flush=True),
        torch.optim.SGD(model.parameters(), lr=0.01),
    )
    x, y, _ = data()
    kept = []
    for _ in range(4):
        for a in range(0, T, 2):
            driver.feed(x[a : a + 2], y[a : a + 2])
            graphs = sum(s.L for s in driver.rule.segments if s.graph is not None)
            records = sum(s.L for s in driver.rule.segments)
            kept.append((graphs, records))
    assert max(g for g, _ in kept) <= k2 and max(r for _, r in kept) <= k1 + k2
    assert driver.t == 4 * T


@pytest.mark.cpu_sensitive
def test_amp_bfloat16_on_cpu_trains_close_to_float32_or_is_refused_at_once() -> None:
    """amp=True on the CPU (bfloat16 autocast) runs and stays near the float32 result where the
    CPU can run nn.LSTM in bfloat16; where it cannot, building the driver is a one-line error."""
    x, y, _ = data()
    if not cpu_runs_bfloat16_lstm(M):
        model = lstm().float()
        with pytest.raises(InputError, match="cannot run LSTM in bfloat16") as info:
            TBPTT(model, tbptt.Truncation(2, 5), torch.optim.SGD(model.parameters()), amp=True)
        assert "\n" not in str(info.value)
        return
    out = []
    for amp in (False, True):
        model = lstm().float()
        driver = TBPTT(
            model, tbptt.Truncation(2, 5), torch.optim.SGD(model.parameters(), lr=0.05), amp=amp
        )
        losses = [driver.feed(x[a:b].float(), y[a:b].float()) for a, b in CHUNKS]
        out.append((model, losses))
    assert max_diff(out[0][0], out[1][0]) < 0.05
    assert all(abs(a - b) < 0.1 * abs(a) + 0.05 for a, b in zip(out[0][1], out[1][1], strict=True))


def test_amp_float16_uses_a_grad_scaler_and_stays_close() -> None:
    """amp=torch.float16 brings a GradScaler (here on the CPU, ElmanRNN) and trains near float32."""
    from tbptt.torch import ElmanRNN

    x, y, _ = data()
    out = []
    for amp in (False, torch.float16):
        model = ElmanRNN(n=8, m=M, p=P, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.02)
        driver = TBPTT(model, tbptt.Truncation(2, 5), opt, amp=amp, clip=1.0)
        for a, b in CHUNKS:
            driver.feed(x[a:b].float(), y[a:b].float())
        out.append((model, driver))
    assert out[0][1].scaler is None and out[1][1].scaler.get_scale() > 0
    assert out[1][1].updates == out[0][1].updates == 14
    assert max_diff(out[0][0], out[1][0]) < 0.05
