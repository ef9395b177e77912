"""Hooks for other trainers: the caller's backward and step (k2 <= k1), a hook on the finished
gradient (any k2), and Hugging Face Accelerate driving the update through them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tbptt
from tbptt.torch import TBPTT, ElmanRNN, Recurrent, l2_loss

CHUNKS = (5, 3, 8, 4)  # 20 steps, chunk ends independent of k1


def data(batch=3, m=2, p=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(CHUNKS)
    return torch.randn(T, batch, m, generator=g, dtype=torch.float64), torch.randn(
        T, batch, p, generator=g, dtype=torch.float64
    )


def lstm():
    torch.manual_seed(0)
    return Recurrent(torch.nn.LSTM(2, 4), torch.nn.Linear(4, 1)).double()


def feed(driver, x, y):
    a = 0
    for L in CHUNKS:
        driver.feed(x[a : a + L], y[a : a + L])
        a += L


def test_backward_hook_gets_each_updates_summed_loss_and_trains_as_the_detach_loop():
    """k1 = k2 = 4: backward(loss) once per update with the chunk's summed loss; the parameters
    are those of the plain detach-every-4 loop (to rounding: chunk ends add module calls)."""
    x, y = data()
    seen = []

    def backward(loss):
        seen.append(loss.detach().clone())
        loss.backward()

    model = lstm()
    d = TBPTT(model, tbptt.Truncation(4, 4), torch.optim.SGD(model.parameters(), lr=0.1),
              backward=backward)  # fmt: skip
    feed(d, x, y)
    ref = lstm()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    state, want = None, []
    for a in range(0, 20, 4):  # the plain loop: one module call and one backward per chunk
        out, state = ref(x[a : a + 4], state)
        loss = l2_loss(out, y[a : a + 4]).sum()
        want.append(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = tuple(s.detach() for s in state)
    assert len(seen) == d.updates == 5
    torch.testing.assert_close(torch.stack(seen), torch.stack(want), rtol=1e-12, atol=0)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_step_hook_replaces_the_optimizer_step_after_clipping():
    """step() runs instead of optimizer.step(), on the clipped gradient: SGD by hand = torch SGD."""
    x, y = data()
    norms = []

    def run(step_by_hand: bool):
        model = lstm()
        params = list(model.parameters())

        def step():
            norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in params])))
            with torch.no_grad():
                for p in params:
                    p.add_(p.grad, alpha=-0.1)

        opt = torch.optim.SGD(params, lr=0.0 if step_by_hand else 0.1)
        d = TBPTT(model, tbptt.Truncation(3, 2, inject="window"), opt, clip=0.05,
                  step=step if step_by_hand else None)  # fmt: skip
        feed(d, x, y)
        return model

    got, want = run(True), run(False)
    assert len(norms) == 6 and max(norms) <= 0.05 + 1e-12
    for a, b in zip(got.parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("k1, k2, inject", [(2, 5, "new"), (3, 7, "window"), (4, 4, "new")])
def test_grad_hook_sees_the_exact_update_gradient(k1, k2, inject):
    """A hook doubling the gradient with SGD(lr) = the numpy engine with SGD(2 lr) (1e-10), so the
    hook sees the canonical rule's gradient, k2 > k1 included; last_grad_norm is taken after it."""
    rng = np.random.default_rng(1)
    model = tbptt.ElmanRNN.init(n=4, m=2, p=3, seed=2)
    x, y = rng.normal(size=(20, 3, 2)), rng.normal(size=(20, 3, 3))
    trunc = tbptt.Truncation(k1, k2, inject=inject)
    engine = tbptt.TBPTT(model, trunc, tbptt.SGD(lr=0.1))
    module = ElmanRNN.from_numpy(model)
    norms = []

    def double(params):
        for p in params:
            p.grad.mul_(2.0)
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in params])))

    d = TBPTT(module, trunc, torch.optim.SGD(module.parameters(), lr=0.05), grad_hook=double)
    a = 0
    for L in CHUNKS:
        engine.feed(x[a : a + L], y[a : a + L])
        d.feed(torch.tensor(x[a : a + L]), torch.tensor(y[a : a + L]))
        a += L
        assert d.last_grad_norm == norms[-1]
    assert len(norms) == d.updates == 20 // k1
    for k, v in engine.model.params.items():
        np.testing.assert_allclose(getattr(module, k).detach().numpy(), v, rtol=0, atol=1e-10)


def test_accelerate_backward_and_optimizer_give_the_drivers_parameters():
    """Accelerate (CPU): accelerator.backward for k2 <= k1 and its prepared optimizer; a grad_hook
    for k2 > k1. Both give the parameters of the driver alone, bit for bit."""
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    x, y = data()
    for k1, k2 in ((4, 4), (2, 6)):
        model = lstm()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        model, opt = accelerator.prepare(model, opt)
        hooks = dict(backward=accelerator.backward) if k2 <= k1 else dict(grad_hook=lambda ps: None)
        d = TBPTT(model, tbptt.Truncation(k1, k2), opt, clip=1.0, **hooks)
        feed(d, x, y)
        ref = lstm()
        r = TBPTT(ref, tbptt.Truncation(k1, k2), torch.optim.Adam(ref.parameters(), lr=0.01),
                  clip=1.0)  # fmt: skip
        feed(r, x, y)
        for a, b in zip(model.parameters(), ref.parameters(), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backward=lambda loss: None, trunc=(2, 5)), "backward= applies when k2 <= k1"),
        (dict(step=3), "step must be callable or None, got 3"),
        (dict(grad_hook="x"), "grad_hook must be callable"),
        (dict(backward=lambda loss: None, amp=torch.float16), "cannot be combined with the"),
    ],
)
def test_hooks_that_cannot_apply_are_refused(kwargs, message):
    """A backward hook with k2 > k1, a non-callable hook, or hooks with the driver's GradScaler."""
    k1, k2 = kwargs.pop("trunc", (4, 4))
    model = lstm()
    with pytest.raises(tbptt.InputError, match=None) as err:
        TBPTT(model, tbptt.Truncation(k1, k2), torch.optim.SGD(model.parameters(), lr=0.1),
              **kwargs)  # fmt: skip
    assert message in str(err.value)
