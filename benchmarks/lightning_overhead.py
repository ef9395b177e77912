"""tbptt.lightning against the driver alone: time per update at the LSTM benchmark size (issue 16).

Model, data and schedule of torch_driver.py: Recurrent(nn.LSTM(32, 128), nn.Linear(128, 32)),
l2_loss, SGD, batch 32, k1 = k2 = 32 (and k2 = 4 k1), chunks of 128 steps (4 updates each), read
by the same StreamLoader (tbptt.torch.streams) in every case:

    driver      for batch in loader: driver.feed(*batch)
    lightning   Trainer(max_epochs=1).fit(TBPTTModule, loader): manual optimization, one
                training_step per batch, the step through Lightning's optimizer, self.log of the
                loss; no logger, progress bar, checkpoint or model summary
    lightning + logger, bar    the same with a CSVLogger (every 50 steps) and the progress bar

Each case times its own batches 1..N-1 (from the start of the second batch to the end of the
last), so Trainer set-up and the first batch's warm-up are left out of the time per update; the
cases run interleaved (common.interleave) and each figure is the median of per-repetition ratios.
"""

from __future__ import annotations

import sys
import tempfile
import time

from common import Group, Row, interleave, load

M, N, P, BATCH, K1, CHUNK = 32, 128, 32, 32, 32, 128
TARGET = 1.10


def run(quick: bool, reps: int | None, threads: int) -> Group:
    group = Group("tbptt.lightning: time per update against the driver alone", load_before=load())
    try:
        import lightning as L
        import torch
        from torch import nn

        import tbptt
        from tbptt.lightning import TBPTTModule
        from tbptt.streams import Streams, from_arrays
        from tbptt.torch import TBPTT, Recurrent, l2_loss
        from tbptt.torch.streams import StreamDataset, StreamLoader
    except ImportError as exc:
        group.skipped = f"lightning is not installed ({exc}): pip install 'tbptt[lightning]'"
        group.load_after = load()
        return group
    import warnings

    import numpy as np

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    reps = reps or (3 if quick else 5)
    chunks = 8 if quick else 16
    rng = np.random.default_rng(0)
    T = chunks * CHUNK * BATCH
    xs = rng.standard_normal((T, M)).astype(np.float32)
    ys = rng.standard_normal((T, P)).astype(np.float32)
    streams = Streams(from_arrays([xs], [ys]), BATCH, layout="split")  # one recording, 32 streams

    def loader():
        return StreamLoader(StreamDataset(streams, CHUNK))

    def network():
        torch.manual_seed(0)
        return Recurrent(nn.LSTM(M, N), nn.Linear(N, P))

    class Net(TBPTTModule):
        def __init__(self, k2: int):
            super().__init__(tbptt.Truncation(K1, k2), loss_fn=l2_loss)
            self.net = network()

        def forward(self, x, state):
            return self.net(x, state)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    own: dict[str, list[float]] = {}

    class Clock(L.Callback):
        def __init__(self, name: str) -> None:
            self.name, self.t0 = name, None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx == 1:
                self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            own[self.name].append(time.perf_counter() - self.t0)

    def driver(name: str, k2: int):
        def go():
            net = network()
            d = TBPTT(net, tbptt.Truncation(K1, k2), torch.optim.SGD(net.parameters(), lr=1e-4),
                      loss_fn=l2_loss)  # fmt: skip
            t0 = None
            for i, batch in enumerate(loader()):
                if i == 1:
                    t0 = time.perf_counter()
                d.feed(*batch)
            own[name].append(time.perf_counter() - t0)

        return go

    def lightning(name: str, k2: int, extras: bool = False):
        def go():
            with tempfile.TemporaryDirectory() as tmp:
                kw = dict(logger=False, enable_progress_bar=False)
                if extras:
                    kw = dict(logger=L.pytorch.loggers.CSVLogger(tmp), enable_progress_bar=True)
                trainer = L.Trainer(
                    accelerator="cpu", devices=1, max_epochs=1, enable_checkpointing=False,
                    enable_model_summary=False, default_root_dir=tmp, callbacks=[Clock(name)],
                    **kw,
                )  # fmt: skip
                stderr, sys.stderr = sys.stderr, open("/dev/null", "w")  # noqa: SIM115
                try:
                    trainer.fit(Net(k2), loader())
                finally:
                    sys.stderr.close()
                    sys.stderr = stderr

        return go

    cases = {
        "driver k2=k1": driver("driver k2=k1", K1),
        "lightning k2=k1": lightning("lightning k2=k1", K1),
        "lightning+ k2=k1": lightning("lightning+ k2=k1", K1, extras=True),
        "driver k2=4k1": driver("driver k2=4k1", 4 * K1),
        "lightning k2=4k1": lightning("lightning k2=4k1", 4 * K1),
    }
    for name in cases:
        own[name] = []
    t = interleave(cases, reps=reps)
    for name in cases:  # the cases' own clocks: batches 1..N-1, no set-up
        t.times[name] = own[name][-reps:]
    updates = (chunks - 1) * CHUNK // K1
    group.notes.append(
        f"Recurrent(nn.LSTM({M}, {N}), nn.Linear({N}, {P})), batch {BATCH}, k1={K1}, SGD, "
        f"{chunks} chunks of {CHUNK} steps from a StreamLoader; each case timed over batches 1.."
        f"{chunks - 1} ({updates} updates); driver alone "
        f"{1e3 * t.median('driver k2=k1') / updates:.1f} ms per update at k2=k1, "
        f"{1e3 * t.median('driver k2=4k1') / updates:.1f} ms at k2=4k1; {t.contention()}."
    )
    for k, target in (("k2=k1", TARGET), ("k2=4k1", TARGET)):
        r = t.ratio(f"lightning {k}", f"driver {k}")
        lo, hi = t.spread(f"lightning {k}", f"driver {k}")
        group.rows.append(
            Row(
                f"{k}: Lightning time per update / driver alone",
                r,
                "x",
                f"<= {target}x",
                r <= target,
                f"per-repetition range {lo:.2f}-{hi:.2f}",
            )  # fmt: skip
        )
    r = t.ratio("lightning+ k2=k1", "driver k2=k1")
    lo, hi = t.spread("lightning+ k2=k1", "driver k2=k1")
    group.rows.append(
        Row(
            "k2=k1, with CSVLogger and progress bar: Lightning / driver alone",
            r,
            "x",
            "",
            None,
            f"per-repetition range {lo:.2f}-{hi:.2f}",
        )  # fmt: skip
    )
    group.load_after = load()
    return group
