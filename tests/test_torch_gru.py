"""tbptt.torch.gru's GRUSequence against torch's nn.GRU (float64), and its use by rl's layouts.

The reference is nn.GRU itself through autograd: outputs, final state, and the gradients of a
random linear function of both with respect to every parameter, x and h_0.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tbptt.torch import Recurrent, rl
from tbptt.torch import gru as gru_mod
from tbptt.torch.gru import GRUSequence, gru, gru_call

DT = torch.float64
M, H = 3, 6


def case(T: int, B: int, bias: bool, seed: int = 0, batch_first: bool = False):
    torch.manual_seed(seed)
    rnn = nn.GRU(M, H, bias=bias, batch_first=batch_first).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (B, T, M) if batch_first else (T, B, M)
    x = torch.randn(*shape, generator=g, dtype=DT, requires_grad=True)
    h0 = torch.randn(1, B, H, generator=g, dtype=DT, requires_grad=True)
    wy = torch.randn(*shape[:2], H, generator=g, dtype=DT)  # the random linear function
    wh = torch.randn(1, B, H, generator=g, dtype=DT)
    return rnn, x, h0, wy, wh


def results(fn, rnn: nn.Module, x: torch.Tensor, h0: torch.Tensor, wy, wh) -> list[torch.Tensor]:
    """[y, h_T, d/dx, d/dh0, d/d every parameter] of sum(wy y) + sum(wh h_T)."""
    y, hT = fn(x, h0)
    loss = (wy * y).sum() + (wh * hT).sum()
    grads = torch.autograd.grad(loss, [x, h0, *rnn.parameters()])
    return [y.detach(), hT.detach(), *grads]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("T", [1, 2, 17, 128])
def test_sequence_equals_nn_gru(T: int, B: int, bias: bool) -> None:
    rnn, x, h0, wy, wh = case(T, B, bias, seed=T + B)
    want = results(rnn, rnn, x, h0, wy, wh)
    got = results(lambda x, h: gru(rnn, x, h), rnn, x, h0, wy, wh)
    assert len(got) == len(want) == 4 + (4 if bias else 2)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 7, 10])
def test_blocks_of_coefficients(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward's blocks of steps (ROWS // B of them, the last one shorter) change nothing."""
    monkeypatch.setattr(gru_mod, "ROWS", rows)
    rnn, x, h0, wy, wh = case(11, 3, True, seed=3)
    want = results(rnn, rnn, x, h0, wy, wh)
    got = results(lambda x, h: gru(rnn, x, h), rnn, x, h0, wy, wh)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_batch_first_and_no_state() -> None:
    rnn, x, _, wy, wh = case(9, 4, True, seed=5, batch_first=True)
    want = results(lambda x, h: rnn(x), rnn, x, x, wy, wh)[:3] + list(
        torch.autograd.grad(
            ((wy * rnn(x)[0]).sum() + (wh * rnn(x)[1]).sum()), list(rnn.parameters())
        )
    )
    got = results(lambda x, h: gru(rnn, x), rnn, x, x, wy, wh)[:3] + list(
        torch.autograd.grad(
            (wy * gru(rnn, x)[0]).sum() + (wh * gru(rnn, x)[1]).sum(), list(rnn.parameters())
        )
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_gradcheck() -> None:
    g = torch.Generator().manual_seed(7)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=DT).requires_grad_()

    m, h, T, B = 2, 3, 4, 2
    args = (leaf(T, B, m), leaf(B, h), leaf(3 * h, m), leaf(3 * h, h), leaf(3 * h), leaf(3 * h))
    assert torch.autograd.gradcheck(GRUSequence.apply, args)
    assert torch.autograd.gradcheck(GRUSequence.apply, (*args[:4], None, None))


def test_gradients_reach_the_modules_parameters() -> None:
    """loss.backward() fills nn.GRU's own .grad (what an optimizer reads), as nn.GRU would."""
    rnn, x, h0, wy, wh = case(6, 2, True)
    ((wy * rnn(x, h0)[0]).sum()).backward()
    want = [p.grad.clone() for p in rnn.parameters()]  # type: ignore[union-attr]
    rnn.zero_grad()
    ((wy * gru(rnn, x, h0)[0]).sum()).backward()
    for p, w in zip(rnn.parameters(), want, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, w, rtol=0, atol=1e-12)


# -- the dispatch ---------------------------------------------------------------------------------


def uses_sequence(module: nn.Module, x: torch.Tensor, grad: bool = True) -> bool:
    with torch.set_grad_enabled(grad):
        y, _ = gru_call(module)(x, None)
    todo, seen = [y.grad_fn], set()  # the graph's nodes
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        if "GRUSequence" in type(fn).__name__:
            return True
        seen.add(fn)
        todo += [f for f, _ in fn.next_functions]
    return False


def test_dispatch_only_where_it_is_exact() -> None:
    """A single-layer, unidirectional nn.GRU, bare or in Recurrent, without hooks, with grad."""
    x = torch.randn(5, 2, M, dtype=DT)
    assert uses_sequence(nn.GRU(M, H).to(DT), x)
    assert uses_sequence(Recurrent(nn.GRU(M, H), nn.Linear(H, 2)).to(DT), x)
    assert not uses_sequence(nn.GRU(M, H).to(DT), x, grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_sequence(nn.GRU(M, H), x.float())
    assert not uses_sequence(nn.GRU(M, H, num_layers=2).to(DT), x)
    assert not uses_sequence(nn.LSTM(M, H).to(DT), x)

    class MyGRU(nn.GRU):  # a subclass may change forward
        pass

    assert not uses_sequence(MyGRU(M, H).to(DT), x)
    hooked = nn.GRU(M, H).to(DT)
    calls: list = []
    hooked.register_forward_hook(lambda *_: calls.append(1))
    assert not uses_sequence(hooked, x)
    assert calls == [1]


@pytest.mark.parametrize("wrapped", [False, True])
def test_rl_layouts_with_a_single_layer_gru(wrapped: bool) -> None:
    """rl.unroll (with k) and Segments.run through GRUSequence equal them through nn.GRU itself
    (a forward hook makes the dispatch call the module): outputs, final states, gradients."""
    torch.manual_seed(0)
    rnn = nn.GRU(M, H).to(DT)
    module = Recurrent(rnn, nn.Linear(H, 2)).to(DT) if wrapped else rnn
    T, N = 30, 6
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, N, M, generator=g, dtype=DT)
    starts = torch.rand(T, N, generator=g) < 0.15
    state0 = torch.randn(1, N, H, generator=g, dtype=DT)
    segs = rl.Segments(starts, length=8, burn_in=3)
    states = rl.states(module, x, starts, state0, at=segs.stored)

    def run() -> list[torch.Tensor]:
        module.zero_grad()
        y, final = rl.unroll(module, x, starts, state0, k=7)
        ys = segs.run(module, x, states)
        w = torch.linspace(-1, 1, y[..., :1].numel(), dtype=DT).view(y.shape[:-1] + (1,))
        ((w * y).sum() + (ys * ys).sum()).backward()
        return [y.detach(), final, ys.detach()] + [p.grad.clone() for p in module.parameters()]  # type: ignore[union-attr]

    assert uses_sequence(module, x)
    got = run()
    handle = rnn.register_forward_hook(lambda *_: None)  # the module's own path
    want = run()
    handle.remove()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
