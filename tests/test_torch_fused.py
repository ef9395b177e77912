"""tbptt.torch.ElmanRNN on torch's RNN kernel (f = tanh, relu) against a plain autograd loop.

The kernel is nn.RNN's: (B x_t + b) + (A h_{t-1} + 0), then f. The reference below is the model
of SEMANTICS.md 1 written step by step; the module must give the same outputs, final state and
parameter gradients to rounding (float64), alone and under the driver (k2 > k1 runs it through
torch.func.functional_call with parameter copies; resets split a chunk into several calls).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import rel_err

import tbptt
from tbptt.torch import TBPTT, ElmanRNN, l2_loss

ACT = {"tanh": torch.tanh, "relu": torch.relu}


def reference(net: ElmanRNN, x, h):
    """The seed's model, one step at a time: (1.1)-(1.4) with g = identity."""
    hs = []
    for t in range(x.shape[0]):
        a = h @ net.A.T + x[t] @ net.B.T
        if net.b is not None:
            a = a + net.b
        h = ACT[net.f](a)
        hs.append(h)
    z = torch.stack(hs) @ net.C.T
    return (z if net.c is None else z + net.c), h


@pytest.mark.parametrize("f", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_kernel_equals_the_step_loop(f, bias, batch_first, dtype):
    """Outputs, final state and gradients equal the autograd step loop (1e-12 in float64)."""
    torch.manual_seed(0)
    net = ElmanRNN(n=6, m=3, p=2, f=f, bias=bias, batch_first=batch_first, dtype=dtype, seed=1)
    if bias:
        with torch.no_grad():
            net.b.normal_(0, 0.5)
            net.c.normal_(0, 0.5)
    x = torch.randn(9, 4, 3, dtype=dtype)
    h0 = torch.randn(4, 6, dtype=dtype)
    out, h = net(x.transpose(0, 1) if batch_first else x, h0)
    if batch_first:
        out = out.transpose(0, 1)
    want_out, want_h = reference(net, x, h0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    params = list(net.parameters())
    got = [out, h, *torch.autograd.grad((out**3).sum() + h.sum(), params)]
    want = [want_out, want_h, *torch.autograd.grad((want_out**3).sum() + want_h.sum(), params)]
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype
        assert rel_err(a.detach().numpy(), b.detach().numpy()) < tol


@pytest.mark.parametrize("k2", [4, 10])
@pytest.mark.parametrize("batch_first", [False, True])
def test_fused_relu_under_the_driver_equals_numpy_engine(k2, batch_first):
    """relu on the kernel, trained by the driver with resets (and copies when k2 > k1): as numpy."""
    rng = np.random.default_rng(4)
    T, batch = 30, 3
    model = tbptt.ElmanRNN.init(n=5, m=2, p=3, f="relu", seed=5)
    x, y = rng.normal(size=(T, batch, 2)), rng.normal(size=(T, batch, 3))
    reset = rng.random((T, batch)) < 0.15
    trunc = tbptt.Truncation(4, k2)
    ref = tbptt.TBPTT(model, trunc, tbptt.SGD(lr=0.05))
    net = ElmanRNN.from_numpy(model, batch_first=batch_first)
    drv = TBPTT(
        net,
        trunc,
        torch.optim.SGD(net.parameters(), lr=0.05),
        loss_fn=l2_loss,
        batch_first=batch_first,
    )
    tr = (lambda a: a.swapaxes(0, 1)) if batch_first else (lambda a: a)
    for i in range(0, T, 6):
        sl = slice(i, i + 6)
        ref.feed(x[sl], y[sl], reset=reset[sl])
        drv.feed(
            *(torch.as_tensor(tr(a)) for a in (x[sl], y[sl])), reset=torch.as_tensor(tr(reset[sl]))
        )
    got = net.to_numpy().params
    for k, want in ref.model.params.items():
        assert rel_err(got[k], want) < 1e-10, k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fused_kernel_on_cuda_equals_cpu():
    """On CUDA (cuDNN or torch's kernel) the module gives the CPU's numbers to float64 rounding."""
    net = ElmanRNN(n=6, m=3, p=2, dtype=torch.float64, seed=1)
    x = torch.randn(9, 4, 3, dtype=torch.float64)
    out, h = net(x)
    out_c, h_c = net.to("cuda")(x.to("cuda"))
    assert rel_err(out_c.cpu().detach().numpy(), out.detach().numpy()) < 1e-12
    assert rel_err(h_c.cpu().detach().numpy(), h.detach().numpy()) < 1e-12
