"""tbptt.lightning with the real Lightning Trainer on the CPU: the parameters of tbptt.torch.TBPTT
alone, exact resume from ModelCheckpoint, Lightning 1.x's per-batch behaviour, clipping,
schedulers, max_steps, logging, precision, and the driver's hooks in a plain LightningModule."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from reference import cpu_runs_bfloat16_lstm
from torch import nn

import tbptt

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from tbptt.lightning import TBPTTModule  # noqa: E402
from tbptt.streams import Streams, from_arrays  # noqa: E402
from tbptt.torch import TBPTT, MinGRU, Recurrent, l2_loss  # noqa: E402
from tbptt.torch.streams import StreamDataset, StreamLoader  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice on workers


def recordings(n=10, seed=0):
    """n recordings of 5..29 steps: x (T, 2), y = tanh of the sum of x (T, 1), float64."""
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((int(rng.integers(5, 30)), 2)) for _ in range(n)]
    return xs, [np.tanh(x.sum(1, keepdims=True)) for x in xs]


STREAMS = Streams(from_arrays(*recordings()), 4)


def loader(length=4, dtype=torch.float64, streams=STREAMS):
    return StreamLoader(StreamDataset(streams, length, dtype=dtype))


def network(dropout=0.0, dtype=torch.float64):
    torch.manual_seed(0)
    return Recurrent(nn.LSTM(2, 6, num_layers=2, dropout=dropout), nn.Linear(6, 1)).to(dtype)


class Net(TBPTTModule):
    """A 2-layer LSTM on the recordings; optimizer and scheduler as asked."""

    def __init__(self, trunc, opt="adam", sched=None, dropout=0.0, dtype=torch.float64, **kw):
        super().__init__(trunc, **kw)
        self.net = network(dropout, dtype)
        self.state_batch_dim = 1  # the LSTM's (h, c) are (layers, batch, hidden)
        self.opt, self.sched = opt, sched

    def forward(self, x, state):
        return self.net(x, state)

    def configure_optimizers(self):
        opt = make_optimizer(self.opt, self.parameters())
        if self.sched is None:
            return opt
        interval, step_size = self.sched
        sch = torch.optim.lr_scheduler.StepLR(opt, step_size, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": interval}}


def make_optimizer(kind, params):
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.01)
    return torch.optim.SGD(params, lr=0.05, momentum=0.5)


def trainer(**kw):
    kw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False,
          "num_sanity_val_steps": 0, **kw}  # fmt: skip
    return L.Trainer(**kw)


def alone(trunc, epochs, opt="adam", sched=None, dropout=0.0, clip=None, length=4, **kw):
    """The reference: tbptt.torch.TBPTT alone on the same batches, epoch after epoch."""
    net = network(dropout)
    optimizer = make_optimizer(opt, net.parameters())
    scheduler = None
    if sched is not None:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, sched[1], gamma=0.5)
    d = TBPTT(net, trunc, optimizer, clip=clip,
              scheduler=scheduler if sched and sched[0] == "step" else None, **kw)  # fmt: skip
    losses = []
    for _ in range(epochs):
        for batch in loader(length):
            losses.append(d.feed(*batch))
        if sched is not None and sched[0] == "epoch":
            scheduler.step()
    return d, losses


def assert_same(module, reference, tol=0.0):
    for (name, a), b in zip(module.net.named_parameters(), reference.parameters(), strict=True):
        if tol == 0.0:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "k1, k2, inject, opt", [(4, 4, "new", "adam"), (2, 7, "new", "sgd"), (3, 8, "window", "adam")]
)
def test_same_parameters_as_the_driver_alone(k1, k2, inject, opt):
    """Two epochs of streams with the Trainer = the driver alone on the same batches, bit for bit
    (float64; the issue asks 1e-10)."""
    trunc = tbptt.Truncation(k1, k2, inject=inject)
    module = Net(trunc, opt, clip=0.5)
    t = trainer(max_epochs=2)
    t.fit(module, loader())
    ref, losses = alone(trunc, 2, opt, clip=0.5)
    assert t.global_step == module.driver.updates == ref.updates
    assert module.driver.t == ref.t == 2 * STREAMS.steps
    assert_same(module, ref.model)  # bit for bit: the same operations in the same order
    assert float(t.callback_metrics["train_loss"]) == pytest.approx(losses[-1], rel=1e-6)
    assert "train_loss" in t.progress_bar_metrics


def test_resume_from_model_checkpoint_equals_the_uninterrupted_fit(tmp_path):
    """k1=2, k2=7, LSTM dropout: resuming from a checkpoint mid-epoch, or at an epoch's end,
    gives the parameters of the fit that never stopped, bit for bit (float64)."""
    trunc = tbptt.Truncation(2, 7)
    chunks = STREAMS.chunks(4)  # batches per epoch, 2 updates each
    save = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    whole = Net(trunc, dropout=0.3, clip=1.0)
    trainer(max_epochs=3, callbacks=[save], enable_checkpointing=True).fit(whole, loader())
    ref, _ = alone(trunc, 3, dropout=0.3, clip=1.0)
    assert_same(whole, ref.model, tol=1e-12)  # dropout: the same random numbers as alone
    for step in (6, 2 * chunks):  # batch 3 of epoch 0; the last batch of epoch 0
        path = next(tmp_path.glob(f"*step={step}.ckpt"))
        resumed = Net(trunc, dropout=0.3, clip=1.0)
        trainer(max_epochs=3).fit(resumed, loader(), ckpt_path=path)
        assert resumed.driver.t == whole.driver.t
        assert_same(resumed, whole.net)


@pytest.mark.parametrize(
    "T",
    [
        12,
        11,
    ],
)
def test_lightning_1x_per_batch_state_is_its_split_loop(T):
    """state='per_batch', Truncation(k, k, flush=True): each batch split into chunks of k steps
    (the last shorter), the state from zero every batch, as Lightning 1.x's truncated_bptt_steps
    (its tbptt_split_batch: x[:, t:t + k])."""
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.standard_normal((12, T, 2)))  # 12 sequences of T steps, batch first
    y = torch.tanh(x.sum(2, keepdim=True))
    data = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=4)
    trunc = tbptt.Truncation(4, 4, flush=True)

    class Seq(TBPTTModule):
        def __init__(self):
            super().__init__(trunc, state="per_batch", batch_first=True)
            torch.manual_seed(0)
            self.lstm, self.head = nn.LSTM(2, 5, batch_first=True).double(), nn.Linear(5, 1)
            self.head.double()

        def forward(self, x, state):
            out, state = self.lstm(x, state)
            return self.head(out), state

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    module = Seq()
    t = trainer(max_epochs=2)
    t.fit(module, data)
    ref = Seq()  # Lightning 1.x's loop, written out
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    steps = 0
    for _ in range(2):
        for xb, yb in data:
            hiddens = None  # reset at every batch
            for a in range(0, T, 4):  # tbptt_split_batch: x[:, t:t + k]
                out, hiddens = ref(xb[:, a : a + 4], hiddens)
                loss = l2_loss(out, yb[:, a : a + 4]).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
                hiddens = tuple(h.detach() for h in hiddens)
    assert t.global_step == steps == 2 * 3 * 3  # 2 epochs, 3 batches, 3 chunks each
    for a, b in zip(module.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_lr_scheduler_is_stepped_per_update_or_per_epoch(interval):
    """StepLR with interval 'step' follows the updates, with 'epoch' the epochs; the parameters
    are the driver's alone with the scheduler stepped so."""
    trunc = tbptt.Truncation(2, 5)
    module = Net(trunc, "sgd", sched=(interval, 7 if interval == "step" else 1))
    t = trainer(max_epochs=2)
    t.fit(module, loader())
    ref, _ = alone(trunc, 2, "sgd", sched=(interval, 7 if interval == "step" else 1))
    lr = t.optimizers[0].param_groups[0]["lr"]
    n = module.driver.updates if interval == "step" else 2
    assert lr == pytest.approx(0.05 * 0.5 ** (n // (7 if interval == "step" else 1)))
    assert_same(module, ref.model, tol=1e-10)


def test_max_steps_counts_updates():
    """max_steps is a number of updates (optimizer steps): 2 per batch of 4 steps at k1 = 2."""
    module = Net(tbptt.Truncation(2, 6))
    t = trainer(max_steps=10, max_epochs=-1)
    t.fit(module, loader())
    assert t.global_step == module.driver.updates == 10
    assert module.driver.t == 20


def test_a_second_fit_starts_a_new_stream_with_its_optimizer():
    """fit() twice: the second fit's driver steps the second fit's optimizer, from step 0."""
    module = Net(tbptt.Truncation(2, 6))
    trainer(max_epochs=1).fit(module, loader())
    second = trainer(max_epochs=1)
    second.fit(module, loader())
    assert module.driver.optimizer is second.optimizers[0]
    assert module.driver.t == STREAMS.steps and second.global_step == module.driver.updates


def test_gradient_clip_val_is_refused_with_where_to_clip():
    """Trainer(gradient_clip_val) raises an error that names the module's clip= instead."""
    with pytest.raises(tbptt.InputError, match=r"Pass clip=0\.5 to the module instead"):
        trainer(max_epochs=1, gradient_clip_val=0.5).fit(Net(tbptt.Truncation(2, 4)), loader())


@pytest.mark.cpu_sensitive
def test_bf16_mixed_is_the_drivers_bfloat16_autocast():
    """precision='bf16-mixed' trains as the driver alone with amp=torch.bfloat16 (float32 model);
    on a CPU where torch cannot run nn.LSTM in bfloat16, fit stops at once with the driver's
    one-line error."""
    trunc = tbptt.Truncation(2, 6)
    module = Net(trunc, dtype=torch.float32)
    t = trainer(max_epochs=1, precision="bf16-mixed")
    if not cpu_runs_bfloat16_lstm():
        with pytest.raises(tbptt.InputError, match="cannot run LSTM in bfloat16"):
            t.fit(module, loader(dtype=torch.float32))
        return
    t.fit(module, loader(dtype=torch.float32))
    net = network(dtype=torch.float32)
    d = TBPTT(net, trunc, make_optimizer("adam", net.parameters()), amp=torch.bfloat16)
    for batch in loader(dtype=torch.float32):
        d.feed(*batch)
    assert_same(module, net)  # the same bfloat16 operations (float32 alone differs by ~1e-2)


def test_validation_loss_is_the_streams_mean_loss():
    """The default validation_step carries the state across batches; val_loss is the mean loss
    per unmasked step of the whole validation epoch, computed directly."""
    module = Net(tbptt.Truncation(3, 6))
    t = trainer(max_epochs=1)
    t.fit(module, loader(), val_dataloaders=loader(length=5))
    x, y, mask, reset = STREAMS.read(0, STREAMS.steps)  # the whole epoch in one module run
    with torch.no_grad():
        total, state = 0.0, None
        for a in range(STREAMS.steps):  # step by step, restarting where reset says
            if state is not None and reset is not None and reset[a].any():
                keep = torch.tensor(~reset[a], dtype=torch.float64)[None, :, None]
                state = tuple(s * keep for s in state)
            out, state = module.net(torch.tensor(x[a : a + 1]), state)
            losses = l2_loss(out, torch.tensor(y[a : a + 1]))
            total += float((losses * torch.tensor(mask[a : a + 1])).sum())
    want = total / float(mask.sum())
    assert float(t.callback_metrics["val_loss"]) == pytest.approx(want, rel=1e-6)


def test_manual_backward_as_the_drivers_backward_in_a_plain_lightning_module():
    """A hand-written LightningModule: TBPTT(backward=self.manual_backward, step=opt.step) with
    k1 = k2 trains as the driver alone, and global_step counts its updates."""
    trunc = tbptt.Truncation(4, 4)

    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = network()
            self.tbptt = None

        def training_step(self, batch, batch_idx):
            if self.tbptt is None:
                opt = self.optimizers()
                self.tbptt = TBPTT(self.net, trunc, opt.optimizer, backward=self.manual_backward,
                                   step=opt.step)  # fmt: skip
            self.log("loss", self.tbptt.feed(*batch))

        def configure_optimizers(self):
            return make_optimizer("adam", self.parameters())

    module = Plain()
    t = trainer(max_epochs=2)
    t.fit(module, loader())
    ref, _ = alone(trunc, 2)
    assert t.global_step == ref.updates
    assert_same(module, ref.model, tol=1e-12)


DDP_TRUNC = tbptt.Truncation(2, 7)
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_ddp_on_two_processes_gives_the_single_process_parameters(tmp_path):
    """strategy='ddp', 2 CPU processes (gloo) with 2 streams each: the parameters of the driver
    alone on all 4 streams (1e-10, float64; SGD tells a summed gradient from an averaged one),
    with the driver's all-reduce the only reduction (a counting comm hook on DDP's reducer)."""
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    res = subprocess.run(
        [sys.executable, os.path.join(HERE, "lightning_worker.py"), str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    ref, _ = alone(DDP_TRUNC, 2, "sgd", clip=0.5)
    assert got["streams"] == 2 and ref.batch == 4
    assert got["reducer_calls"] == 0  # DDP's reducer never armed: the driver's sum alone
    assert got["updates"] == got["global_step"] == ref.updates and got["t"] == ref.t
    for a, b in zip(got["params"], ref.model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-10)


def test_bad_settings_are_input_errors():
    """A flush with carried state, an unknown state mode, or options the module sets itself."""
    with pytest.raises(tbptt.InputError, match="flush=True needs the end of a stream"):
        Net(tbptt.Truncation(2, 4, flush=True))
    with pytest.raises(tbptt.InputError, match="state must be one of"):
        Net(tbptt.Truncation(2, 4), state="reset")
    with pytest.raises(tbptt.InputError, match="are set by tbptt.lightning itself"):
        Net(tbptt.Truncation(2, 4), amp=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(tbptt.InputError, match="a batch must be"):
            trainer(max_epochs=1).fit(
                Net(tbptt.Truncation(2, 4)),
                torch.utils.data.DataLoader([torch.zeros(3)], batch_size=None),
            )


class ScanNet(TBPTTModule):
    """A MinGRU and a linear head whose forward takes starts (SEMANTICS.md 10); counts its calls
    and records the mask of each (None where the piece has no reset)."""

    def __init__(self, trunc, **kw):
        super().__init__(trunc, **kw)
        torch.manual_seed(0)
        self.net = ScanHead()
        self.calls: list[tuple[int, torch.Tensor | None]] = []

    def forward(self, x, state, *, starts=None):
        self.calls.append((x.shape[0], None if starts is None else starts.clone()))
        return self.net(x, state, starts=starts)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class ScanHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = MinGRU(2, 5, dtype=torch.float64), nn.Linear(5, 1).double()

    def forward(self, x, state, starts=None):
        h, state = self.rnn(x, state, starts=starts)
        return self.head(h), state


class SplitHead(nn.Module):
    """The reference: the same layers without the keyword, not packable, so the driver splits
    each call at the resets and restarts the state from zeros in between (call.py's split)."""

    packable = False

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, state):
        return self.inner(x, state)


@pytest.mark.parametrize("k1, k2", [(4, 4), (2, 4)])  # chained; overlapping (recomputed windows)
def test_a_module_taking_starts_gets_the_pieces_mask_once_per_piece(k1, k2):
    """Under the Trainer, a module whose forward takes starts is called once per piece of the
    schedule with the whole piece's reset mask (training and validation), as often as on the
    same batches without resets; it trains as the per-reset split calls of the driver alone
    (1e-12, float64)."""
    trunc = tbptt.Truncation(k1, k2)
    batches = list(loader())
    assert sum(int(b[3] is not None and bool(b[3][1:].any())) for b in batches) >= 2
    module = ScanNet(trunc)
    ref = SplitHead(copy.deepcopy(module.net))
    trainer(max_epochs=1).fit(module, loader(), val_dataloaders=loader(length=5))
    n_val = len(list(loader(5)))
    training, validation = module.calls[:-n_val], module.calls[-n_val:]

    plain = ScanNet(trunc)  # the same batches without resets: the calls the schedule needs
    driver = TBPTT(plain, trunc, torch.optim.SGD(plain.parameters(), lr=0.05))
    for x, y, mask, _ in batches:
        driver.feed(x, y, mask)
    assert [n for n, _ in training] == [n for n, _ in plain.calls]
    assert all(s is None for _, s in plain.calls)

    def mask(n, s):  # None: no reset in the piece
        return torch.zeros(n, 4, dtype=torch.bool) if s is None else s

    val = list(loader(5))
    assert [n for n, _ in validation] == [b[0].shape[0] for b in val]  # one call per batch
    for (n, s), b in zip(validation, val, strict=True):
        assert torch.equal(mask(n, s), mask(n, b[3]))
    if k1 == k2 == 4:  # one piece per batch: each call's mask is the batch's reset
        assert len(training) == len(batches)
        for (n, s), b in zip(training, batches, strict=True):
            assert torch.equal(mask(n, s), mask(n, b[3]))

    alone = TBPTT(ref, trunc, torch.optim.SGD(ref.parameters(), lr=0.05))
    for batch in batches:
        alone.feed(*batch)
    for (name, a), b in zip(module.net.named_parameters(), ref.inner.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
