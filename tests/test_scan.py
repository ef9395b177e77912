"""The scan layers (SEMANTICS.md 10) against per-step recurrences written here, in float64.

step-by-step   each reference runs the contract's equations one step at a time with plain torch
               operations (complex matrices for the LRU, not the layer's real products), so
               autograd through it is the oracle for the scan's own backward.
driver         TBPTT(k1, k2 > k1) with a scan layer equals the same driver with a module that
               runs the same recurrence step by step.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tbptt
from tbptt import InputError
from tbptt.torch import LRU, TBPTT, MinGRU, ScanLM, cross_entropy_loss, l2_loss, linear_scan

DT = torch.float64
M, H, BATCH = 3, 4, 3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_starts(T: int, seed: int) -> torch.Tensor:
    """Resets at random steps, at the first step of stream 0 and the last step of stream 1."""
    starts = torch.rand(T, BATCH, generator=gen(seed)) < 0.15
    starts[0, 0] = True
    starts[-1, 1] = True
    return starts


def restart(h: torch.Tensor, starts: torch.Tensor, t: int) -> torch.Tensor:
    """(6.1): h_{t-1} is h_init = 0 for the streams that start at step t."""
    return torch.where(starts[t].view(-1, 1), torch.zeros((), dtype=h.dtype), h)


def step_scan(a, b, h0, starts):
    """h_t = a_t h_{t-1} + b_t, one step at a time."""
    h, hs = h0, []
    for t in range(b.shape[0]):
        h = (a[t] if a.dim() == 3 else a) * restart(h, starts, t) + b[t]
        hs.append(h)
    return torch.stack(hs)


def step_mingru(layer: MinGRU, x, h0, starts):
    """(10.2)-(10.3) step by step with the layer's parameters: (h (T, batch, H), h_T)."""
    Wz, bz = layer.linear_z.weight, layer.linear_z.bias
    Wh, bh = layer.linear_h.weight, layer.linear_h.bias
    h, hs = h0, []
    for t in range(x.shape[0]):
        z = torch.sigmoid(x[t] @ Wz.T + bz)
        h = (1 - z) * restart(h, starts, t) + z * (x[t] @ Wh.T + bh)
        hs.append(h)
    return torch.stack(hs), h


def step_lru(layer: LRU, x, h0, starts):
    """(10.4)-(10.6) step by step with complex matrices: (y (T, batch, m), h_T)."""
    lam = torch.exp(-torch.exp(layer.nu_log) + 1j * torch.exp(layer.theta_log))
    B = torch.complex(layer.B_re, layer.B_im)  # (H, m)
    C = torch.complex(layer.C_re, layer.C_im)  # (m, H)
    gamma = torch.exp(layer.gamma_log)
    h, ys = h0, []
    for t in range(x.shape[0]):
        h = lam * restart(h, starts, t) + gamma * (x[t].to(B.dtype) @ B.T)
        ys.append((h @ C.T).real + layer.D * x[t])
    return torch.stack(ys), h


def loss_of(out: torch.Tensor, last: torch.Tensor, seed: int) -> torch.Tensor:
    """A random linear function of every output plus |h_T|^2: gradients reach both."""
    w = torch.randn(out.shape, generator=gen(seed), dtype=out.dtype)
    return (w * out).real.sum() + (last * last.conj()).real.sum()


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def assert_close(got, want, tol: float = 1e-12) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("T", [1, 2, 5, 33, 512])
@pytest.mark.parametrize("kind", ["real, a per step", "complex, a shared"])
def test_linear_scan_equals_the_step_recurrence(T: int, kind: str) -> None:
    """linear_scan: h, h_T and the gradients of a, b and h0 equal the step loop's (1e-12)."""
    cdt = DT if kind.startswith("real") else torch.complex128
    g = gen(T)
    shape = (T, BATCH, H) if kind.startswith("real") else (H,)
    a = (torch.rand(shape, generator=g, dtype=DT) * 0.95).to(cdt)
    if cdt.is_complex:
        a = a * torch.exp(1j * torch.rand(H, generator=g, dtype=DT) * 6)
    a.requires_grad_()
    b = torch.randn(T, BATCH, H, generator=g, dtype=cdt).requires_grad_()
    h0 = torch.randn(BATCH, H, generator=g, dtype=cdt).requires_grad_()
    starts = random_starts(T, T)
    got, want = linear_scan(a, b, h0, starts), step_scan(a, b, h0, starts)
    assert_close([got], [want])
    dg = grads(loss_of(got, got[-1], 1), a, b, h0)
    dw = grads(loss_of(want, want[-1], 1), a, b, h0)
    assert_close(dg, dw)
    assert float(dg[2][0].abs().max()) == 0.0  # stream 0 restarts at step 1: h0 gets nothing


@pytest.mark.parametrize("T", [1, 2, 7, 64, 512])
@pytest.mark.parametrize("resets", [False, True])
def test_mingru_equals_the_step_recurrence(T: int, resets: bool) -> None:
    """MinGRU: outputs, final state, parameter, input and initial-state gradients (1e-12)."""
    torch.manual_seed(T)
    layer = MinGRU(M, H, dtype=DT)
    x = torch.randn(T, BATCH, M, generator=gen(T), dtype=DT).requires_grad_()
    h0 = torch.randn(BATCH, H, generator=gen(T + 1), dtype=DT).requires_grad_()
    starts = random_starts(T, T) if resets else None
    ref_starts = starts if resets else torch.zeros(T, BATCH, dtype=torch.bool)
    (h, last), (h_ref, last_ref) = (
        layer(x, h0, starts=starts),
        step_mingru(layer, x, h0, ref_starts),
    )
    assert_close([h, last], [h_ref, last_ref])
    wrt = (*layer.parameters(), x, h0)
    assert_close(grads(loss_of(h, last, 2), *wrt), grads(loss_of(h_ref, last_ref, 2), *wrt))


@pytest.mark.parametrize("T", [1, 2, 7, 64, 512])
@pytest.mark.parametrize("resets", [False, True])
def test_lru_equals_the_step_recurrence(T: int, resets: bool) -> None:
    """LRU: outputs, complex final state, every parameter's, x's and h0's gradients (1e-12)."""
    torch.manual_seed(T)
    layer = LRU(M, H, r_min=0.5, r_max=0.99, dtype=DT)
    x = torch.randn(T, BATCH, M, generator=gen(T), dtype=DT).requires_grad_()
    h0 = torch.randn(BATCH, H, generator=gen(T + 1), dtype=torch.complex128).requires_grad_()
    starts = random_starts(T, T) if resets else None
    ref_starts = starts if resets else torch.zeros(T, BATCH, dtype=torch.bool)
    (y, last), (y_ref, last_ref) = layer(x, h0, starts=starts), step_lru(layer, x, h0, ref_starts)
    assert last.dtype == torch.complex128 and y.dtype == DT
    assert_close([y, last], [y_ref, last_ref])
    wrt = (*layer.parameters(), x, h0)
    assert_close(grads(loss_of(y, last, 2), *wrt), grads(loss_of(y_ref, last_ref, 2), *wrt))


@pytest.mark.parametrize("layer", ["mingru", "lru"])
def test_two_chunks_with_the_carried_state_are_one_chunk(layer: str) -> None:
    """Chunks cut anywhere, each from the state the previous one returned, give the outputs,
    final state and gradients (parameters and h0) of one call over the whole sequence."""
    torch.manual_seed(0)
    mod = MinGRU(M, H, dtype=DT) if layer == "mingru" else LRU(M, H, dtype=DT)
    sdt = DT if layer == "mingru" else torch.complex128
    T = 40
    x = torch.randn(T, BATCH, M, generator=gen(3), dtype=DT)
    h0 = torch.randn(BATCH, H, generator=gen(4), dtype=sdt).requires_grad_()
    starts = random_starts(T, 5)
    whole, last = mod(x, h0, starts=starts)
    outs, state = [], h0
    for a, b in [(0, 1), (1, 17), (17, 18), (18, 40)]:
        out, state = mod(x[a:b], state, starts=starts[a:b])
        outs.append(out)
    pieces = torch.cat(outs)
    assert_close([pieces, state], [whole, last])
    wrt = (*mod.parameters(), h0)
    assert_close(grads(loss_of(pieces, state, 6), *wrt), grads(loss_of(whole, last, 6), *wrt))


def test_scan_lm_equals_its_step_by_step_calls() -> None:
    """ScanLM (both cells, token ids) over a chunk with resets equals calling it one step at a
    time with the carried state: outputs, states and parameter gradients (1e-12)."""
    T = 30
    x = torch.randint(0, 7, (T, BATCH), generator=gen(8))
    starts = random_starts(T, 9)
    for cell in ("mingru", "lru"):
        torch.manual_seed(1)
        lm = ScanLM(cell, 7, 6, 7, num_layers=2, state_size=5, dtype=DT)
        out, state = lm(x, starts=starts)
        outs, s = [], None
        for t in range(T):
            o, s = lm(x[t : t + 1], s, starts=starts[t : t + 1])
            outs.append(o)
        steps = torch.cat(outs)
        assert_close([out, *state], [steps, *s])
        w = torch.randn(out.shape, generator=gen(10), dtype=DT)
        ps = list(lm.parameters())
        assert_close(grads((w * out).sum(), *ps), grads((w * steps).sum(), *ps))


# -- under the driver --------------------------------------------------------------------------


class StepMinGRU(nn.Module):
    """MinGRU's parameters, run step by step: the driver's reference module."""

    state_batch_dim = 0

    def __init__(self, scan: MinGRU) -> None:
        super().__init__()
        self.linear_z, self.linear_h = nn.Linear(M, H), nn.Linear(M, H)
        self.to(DT).load_state_dict(scan.state_dict())

    def forward(self, x, state=None):
        h0 = x.new_zeros(x.shape[1], H) if state is None else state
        return step_mingru(self, x, h0, torch.zeros(x.shape[:2], dtype=torch.bool))


class StepLRU(nn.Module):
    """LRU's parameters, run step by step with complex matrices."""

    state_batch_dim = 0

    def __init__(self, scan: LRU) -> None:
        super().__init__()
        for name, p in scan.named_parameters():
            setattr(self, name, nn.Parameter(p.detach().clone()))

    def forward(self, x, state=None):
        h0 = torch.zeros(x.shape[1], H, dtype=torch.complex128) if state is None else state
        return step_lru(self, x, h0, torch.zeros(x.shape[:2], dtype=torch.bool))


def train(model: nn.Module, trunc: tbptt.Truncation, x, y, reset, lr: float = 0.05) -> TBPTT:
    driver = TBPTT(model, trunc, torch.optim.Adam(model.parameters(), lr=lr), loss_fn=l2_loss)
    for a, b in [(0, 5), (5, 6), (6, 19), (19, 30)]:
        driver.feed(x[a:b], y[a:b], reset=reset[a:b])
    driver.finish()
    return driver


@pytest.mark.parametrize("layer", ["mingru", "lru"])
@pytest.mark.parametrize("k1, k2", [(3, 7), (2, 5)])
def test_driver_with_overlapping_windows_equals_the_step_by_step_module(layer, k1, k2) -> None:
    """TBPTT(k1, k2 > k1) with the scan layer and with a step-by-step module: the same
    parameters after every update (1e-10), resets inside the chunks."""
    T = 30
    x = torch.randn(T, BATCH, M, generator=gen(11), dtype=DT)
    y = torch.randn(T, BATCH, M if layer == "lru" else H, generator=gen(12), dtype=DT)
    reset = torch.rand(T, BATCH, generator=gen(13)) < 0.1
    torch.manual_seed(2)
    scan = MinGRU(M, H, dtype=DT) if layer == "mingru" else LRU(M, H, dtype=DT)
    ref = StepMinGRU(scan) if layer == "mingru" else StepLRU(scan)
    trunc = tbptt.Truncation(k1, k2, "new", flush=True)
    d_scan, d_ref = train(scan, trunc, x, y, reset), train(ref, trunc, x, y, reset)
    assert d_scan.updates == d_ref.updates == len(trunc.update_times(T)) == 30 // k1
    for (name, p), q in zip(scan.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("layer", ["mingru", "lru"])
def test_every_chunk_starts_from_the_carried_state_under_the_driver(layer: str) -> None:
    """With lr = 0 the driver's chunks of any length, cut by its windows and resets, leave the
    state and losses of one call over the whole stream: no chunk starts from zeros."""
    T = 30
    x = torch.randn(T, BATCH, M, generator=gen(14), dtype=DT)
    y = torch.zeros(T, BATCH, M if layer == "lru" else H, dtype=DT)
    reset = torch.rand(T, BATCH, generator=gen(15)) < 0.1
    reset[0] = False
    torch.manual_seed(3)
    mod = MinGRU(M, H, dtype=DT) if layer == "mingru" else LRU(M, H, dtype=DT)
    driver = train(mod, tbptt.Truncation(4, 9), x, y, reset, lr=0.0)
    out, last = mod(x, starts=reset)
    torch.testing.assert_close(driver.state, last, rtol=1e-12, atol=1e-12)
    assert driver.state.dtype == (DT if layer == "mingru" else torch.complex128)


def test_rtrl_on_mingru_is_exact_bptt() -> None:
    """RTRL calls the layer one step at a time under torch.func (the one-step path of plain
    operations): its frozen gradient equals the scan's exact BPTT (1e-10), resets included."""
    from tbptt.torch.methods import frozen_gradients

    T = 12
    x = torch.randn(T, BATCH, M, generator=gen(17), dtype=DT)
    y = torch.randn(T, BATCH, H, generator=gen(18), dtype=DT)
    reset = torch.rand(T, BATCH, generator=gen(19)) < 0.2
    torch.manual_seed(6)
    layer = MinGRU(M, H, dtype=DT)
    rtrl = frozen_gradients("rtrl", layer, x, y, reset=reset, k1=4)
    exact = frozen_gradients("tbptt", layer, x, y, reset=reset, k1=T)
    for name, g in exact.items():
        torch.testing.assert_close(rtrl[name], g, rtol=1e-10, atol=1e-10, msg=name)


def test_a_saved_run_with_complex_states_resumes_exactly(tmp_path) -> None:
    """ScanLM("lru") under TBPTT(3, 7): save after 13 steps, load into a fresh driver, go on;
    parameters and the complex carried states equal the uninterrupted run's exactly."""
    x = torch.randint(0, 7, (30, BATCH), generator=gen(20))
    y = torch.randint(0, 7, (30, BATCH), generator=gen(21))

    def make() -> TBPTT:
        torch.manual_seed(7)
        lm = ScanLM("lru", 7, 6, 7, state_size=5, dtype=DT)
        opt = torch.optim.Adam(lm.parameters(), lr=0.01)
        return TBPTT(lm, tbptt.Truncation(3, 7), opt, loss_fn=cross_entropy_loss)

    whole, first = make(), make()
    for d, cuts in ((whole, [(0, 13), (13, 30)]), (first, [(0, 13)])):
        for a, b in cuts:
            d.feed(x[a:b], y[a:b])
    first.save(tmp_path / "lru.pt")
    second = make()
    second.load(tmp_path / "lru.pt")
    second.feed(x[13:], y[13:])
    for p, q in zip(whole.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert all(torch.equal(a, b) for a, b in zip(whole.state, second.state, strict=True))
    assert second.state[0].dtype == torch.complex128


class Counting(MinGRU):
    """MinGRU that counts its calls."""

    calls = 0

    def forward(self, x, state=None, *, starts=None):
        Counting.calls += 1
        return super().forward(x, state, starts=starts)


def test_a_module_that_takes_starts_is_called_once_per_piece_not_once_per_reset() -> None:
    """A chunk of 16 steps under TBPTT(8, 8) is two pieces: two calls, whatever the resets."""
    torch.manual_seed(4)
    layer = Counting(M, H, dtype=DT)
    reset = torch.zeros(16, BATCH, dtype=torch.bool)
    reset[3, 0] = reset[11, 2] = reset[12, 1] = True
    x = torch.randn(16, BATCH, M, generator=gen(16), dtype=DT)
    driver = TBPTT(layer, tbptt.Truncation(8, 8), torch.optim.SGD(layer.parameters(), lr=0.1))
    Counting.calls = 0
    driver.feed(x, torch.zeros(16, BATCH, H, dtype=DT), reset=reset)
    assert Counting.calls == 2


# -- dtypes, initialisation, errors --------------------------------------------------------------


def test_float32_layers_return_float32_and_complex64() -> None:
    """float32 parameters: float32 outputs and states, complex64 for the LRU's state."""
    x = torch.randn(5, 2, M)
    h, s = MinGRU(M, H)(x)
    y, c = LRU(M, H)(x)
    out, states = ScanLM("lru", 9, 6, 9)(torch.randint(0, 9, (5, 2)))
    assert (h.dtype, s.dtype, y.dtype, c.dtype) == (torch.float32,) * 3 + (torch.complex64,)
    assert out.dtype == torch.float32 and {t.dtype for t in states} == {torch.complex64}


def test_lru_initialisation_is_the_papers_ring() -> None:
    """lambda uniform on the ring r_min <= |lambda| < r_max (uniform in area: |lambda|^2 uniform),
    phase in [0, max_phase), gamma = sqrt(1 - |lambda|^2), as init_lru_parameters draws them."""
    torch.manual_seed(5)
    layer = LRU(2, 4000, r_min=0.4, r_max=0.9, max_phase=math.pi / 10, dtype=DT)
    r, phase, gamma = (
        torch.exp(p.detach()) for p in (layer.nu_log, layer.theta_log, layer.gamma_log)
    )
    r = torch.exp(-r)  # |lambda|
    assert 0.4 <= float(r.min()) and float(r.max()) < 0.9
    assert 0 <= float(phase.min()) and float(phase.max()) < math.pi / 10
    assert abs(float((r**2).mean()) - (0.4**2 + 0.9**2) / 2) < 0.01  # sd of the mean 0.003
    torch.testing.assert_close(gamma, torch.sqrt(1 - r**2))
    assert abs(float(layer.B_re.detach().std()) - 1 / math.sqrt(4)) < 0.02  # normal / sqrt(2 m)


def call(module, x, state=None, starts=None):
    return module(x, state, starts=starts)


MG, LR = MinGRU(M, H, dtype=DT), LRU(M, H, dtype=DT)
X = torch.zeros(5, BATCH, M, dtype=DT)


@pytest.mark.parametrize(
    "module, x, state, starts, words",
    [
        (MG, torch.zeros(5, BATCH, M + 1, dtype=DT), None, None, r"x must be .*\(T, batch, 3\)"),
        (MG, torch.zeros(5, M, dtype=DT), None, None, r"x must be .*got torch.float64 \(5, 3\)"),
        (MG, X.float(), None, None, r"x must be a torch.float64 tensor.*got torch.float32"),
        (MG, X, None, torch.zeros(5, BATCH + 1, dtype=torch.bool), r"starts must have shape"),
        (MG, X, None, torch.zeros(5, BATCH), r"starts must be a bool tensor.*torch.float32"),
        (MG, X, torch.zeros(1, H, dtype=DT), None, r"state must be .*\(3, 4\).*\(1, 4\)"),
        (MG, X, torch.zeros(H, dtype=DT), None, r"state must be .*got torch.float64 \(4,\)"),
        (MG, X, torch.zeros(BATCH, H), None, r"state must be a torch.float64 .*torch.float32"),
        (LR, X, torch.zeros(BATCH, H, dtype=DT), None, r"torch.complex128.*got torch.float64"),
        (LR, X, torch.zeros(BATCH, H, dtype=torch.complex64), None, r"got torch.complex64"),
        (LR, X, torch.zeros(1, H, dtype=torch.complex128), None, r"\(3, 4\).*got .*\(1, 4\)"),
        (LR, X, torch.zeros(H, dtype=torch.complex128), None, r"state must be .*got .*\(4,\)"),
        (LR, torch.zeros(5, BATCH, M - 1, dtype=DT), None, None, r"x must be .*\(T, batch, 3\)"),
        (LR, X, None, torch.zeros(5, BATCH, dtype=torch.long), r"starts must be a bool tensor"),
        (LR, X, None, torch.zeros(4, BATCH, dtype=torch.bool), r"starts must have shape \(5, 3\)"),
        (MG, X, None, torch.zeros(5, dtype=torch.bool), r"starts must have shape .*got \(5,\)"),
        (MG, X, None, torch.zeros(5, 1, dtype=torch.bool), r"starts must have shape .*\(5, 1\)"),
    ],
)
def test_bad_input_is_one_input_error_naming_the_argument(module, x, state, starts, words):
    """Wrong widths, shapes that would broadcast, dtypes: one InputError, raised before torch
    runs (no operator dispatched: the check reads shapes and dtypes only)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ran: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ran.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as ops, pytest.raises(InputError, match=words):
        call(module, x, state, starts)
    assert ops.ran == []


def test_scan_lm_bad_state_and_ids() -> None:
    """ScanLM names the layer whose state is wrong, a state of the wrong length, bad ids."""
    lm = ScanLM("lru", 7, 6, 7, num_layers=2, dtype=DT)
    x = torch.zeros(4, 2, dtype=torch.long)
    _, state = lm(x)
    bad = (state[0], state[1].real)
    with pytest.raises(InputError, match=r"state\[1\] must be a torch.complex128 tensor"):
        lm(x, bad)
    with pytest.raises(InputError, match=r"state must be a tuple of 2 layer states.*tuple of 1"):
        lm(x, state[:1])
    with pytest.raises(InputError, match=r"token ids in 0..6, got values from 0 to 7"):
        lm(torch.tensor([[0, 7]] * 4))
    with pytest.raises(InputError, match=r"cell must be one of \('mingru', 'lru'\)"):
        ScanLM("gru", 7, 6, 7)
    with pytest.raises(InputError, match=r"\['r_min'\] are not options of the mingru cell"):
        ScanLM("mingru", 7, 6, 7, cell_options={"r_min": 0.9})


def test_layers_are_exported() -> None:
    """The scan layers import from tbptt.torch (tbptt itself imports no torch:
    test_torch_docs.py)."""
    import tbptt.torch as tt

    assert {"MinGRU", "LRU", "ScanLM", "linear_scan"} <= set(tt.__all__)


@pytest.mark.slow
def test_state_passing_example_writes_its_table_csv_and_figure(tmp_path, capsys) -> None:
    """examples/state_passing.py, tiny: both modes of every model, the table, a CSV of finite
    losses at every position and a PNG."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "state_passing.py"
    spec = importlib.util.spec_from_file_location("state_passing", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    csv, png = tmp_path / "sp.csv", tmp_path / "sp.png"
    args = "--steps 2 --hidden 8 --eval-length 130 --eval-sequences 2 --threads 1"
    example.main([*args.split(), "--csv", str(csv), "--out", str(png)])
    out = capsys.readouterr().out
    assert "| mingru | carried (TBPTT) |" in out and "| 1-128 |" in out
    rows = csv.read_text().splitlines()
    assert rows[0] == "position," + ",".join(
        f"{c}_{m}" for c in ("mingru", "lru", "lstm") for m in ("zero", "carry")
    )
    values = [[float(v) for v in r.split(",")[1:]] for r in rows[1:]]
    assert len(values) == 130 and all(math.isfinite(v) and v > 0 for r in values for v in r)
    assert png.read_bytes()[:4] == b"\x89PNG"
