"""tbptt.lightning against the driver alone: time per update at the LSTM benchmark size (issue 16).

Model, data and schedule of torch_driver.py: Recurrent(nn.LSTM(32, 128), nn.Linear(128, 32)),
l2_loss, SGD, batch 32, k1 = 32 with k2 = k1 and k2 = 4 k1, chunks of 128 steps (4 updates
each), read by StreamLoaders (tbptt.torch.streams) of the same streams.

The two run in lockstep, in one process: Trainer.fit trains a TBPTTModule (manual optimization,
one training_step per batch, the step through Lightning's optimizer, self.log of the loss; no
logger, progress bar, checkpoint or model summary), and a callback, at the end of each of its
batches, feeds the same batch to a second, identical model trained by tbptt.torch.TBPTT alone
(its loader's next batch, then driver.feed), timing that. Lightning's time for batch i is the
interval between the starts of batches i and i + 1 (to the epoch's end for the last), less the
reference's time inside it: Lightning's loop, hooks, data fetching and the training step. So
both are measured in the same seconds, and a burst of load from other jobs hits both; batch 0
(warm-up) is left out. Each repetition gives one ratio (sum of Lightning's times / sum of the
driver's); the figure is the median over repetitions, the details their range. A third case adds
a CSVLogger (every 50 steps) and the progress bar (written to /dev/null).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from common import QUIET, Group, Row, load

M, N, P, BATCH, K1, CHUNK = 32, 128, 32, 32, 32, 128
TARGET = 1.10
CASES = {"k2=k1": (K1, False), "k2=4k1": (4 * K1, False), "k2=k1 + logger, bar": (K1, True)}


def missing() -> str | None:
    """Why the group cannot run (lightning or tbptt's parts not importable), or None."""
    try:
        import lightning  # noqa: F401
        import torch  # noqa: F401

        import tbptt.lightning  # noqa: F401
        import tbptt.streams  # noqa: F401
        import tbptt.torch.streams  # noqa: F401
    except ImportError as exc:
        return f"lightning is not installed ({exc}): pip install 'tbptt[lightning]'"
    return None


def make_streams(chunks: int):
    """One recording of random data, `chunks` chunks of CHUNK steps for each of BATCH streams."""
    import numpy as np

    from tbptt.streams import Streams, from_arrays

    rng = np.random.default_rng(0)
    T = chunks * CHUNK * BATCH
    xs = rng.standard_normal((T, M)).astype(np.float32)
    ys = rng.standard_normal((T, P)).astype(np.float32)
    return Streams(from_arrays([xs], [ys]), BATCH, layout="split")  # one recording, 32 streams


def loader(streams):
    from tbptt.torch.streams import StreamDataset, StreamLoader

    return StreamLoader(StreamDataset(streams, CHUNK))


def network():
    import torch
    from torch import nn

    from tbptt.torch import Recurrent

    torch.manual_seed(0)
    return Recurrent(nn.LSTM(M, N), nn.Linear(N, P))


def classes(streams) -> tuple[type, type]:
    """The TBPTTModule under test, and the callback timing it against the driver alone."""
    import lightning as L
    import torch

    import tbptt
    from tbptt.lightning import TBPTTModule
    from tbptt.torch import TBPTT, l2_loss

    class Net(TBPTTModule):
        def __init__(self, k2: int):
            super().__init__(tbptt.Truncation(K1, k2), loss_fn=l2_loss)
            self.net = network()

        def forward(self, x, state):
            return self.net(x, state)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    class Lockstep(L.Callback):
        """Times Lightning's batches and, after each, the driver alone on the same batch."""

        def __init__(self, k2: int) -> None:
            net = network()
            self.ref = TBPTT(net, tbptt.Truncation(K1, k2), torch.optim.SGD(net.parameters(),
                             lr=1e-4), loss_fn=l2_loss)  # fmt: skip
            self.batches = iter(loader(streams))
            self.light, self.alone, self.start, self.inside = [], [], None, 0.0

        def _close(self, now: float, i: int) -> None:
            if self.start is not None and i >= 2:  # batch i - 1 ended; batch 0 is warm-up
                self.light.append(now - self.start - self.inside)

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            now = time.perf_counter()
            self._close(now, batch_idx)
            self.start, self.inside = now, 0.0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            t0 = time.perf_counter()
            self.ref.feed(*next(self.batches))  # the driver alone: fetch and feed
            dt = time.perf_counter() - t0
            self.inside += dt
            if batch_idx >= 1:
                self.alone.append(dt)

        def on_train_epoch_end(self, trainer, module) -> None:
            self._close(time.perf_counter(), 2)

    return Net, Lockstep


def fit(kinds, streams, chunks: int, k2: int, extras: bool = False) -> tuple[float, float]:
    """One lockstep run: (Lightning seconds, driver seconds) over batches 1..chunks-1."""
    import lightning as L
    import torch

    Net, Lockstep = kinds
    clock = Lockstep(k2)
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(logger=False, enable_progress_bar=False)
        if extras:
            kw = dict(logger=L.pytorch.loggers.CSVLogger(tmp), enable_progress_bar=True)
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=1, enable_checkpointing=False,
            enable_model_summary=False, default_root_dir=tmp, callbacks=[clock], **kw,
        )  # fmt: skip
        out, err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (the bar's output)
        try:
            trainer.fit(Net(k2), loader(streams))
        finally:
            sys.stdout.close()
            sys.stdout, sys.stderr = out, err
    assert len(clock.light) == len(clock.alone) == chunks - 1
    for a, b in zip(trainer.lightning_module.net.parameters(), clock.ref.model.parameters(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b), "Lightning and the driver alone trained differently"
    return sum(clock.light), sum(clock.alone)


def measure(kinds, streams, chunks: int, reps: int) -> dict[str, list[tuple[float, float]]]:
    """Every case once as warm-up, then `reps` repetitions, each in a rotated order."""
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in CASES}
    for k2, extras in CASES.values():
        fit(kinds, streams, chunks, k2, extras)  # warm-up
    for r in range(reps):
        names = list(CASES)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            QUIET.wait()
            got[name].append(fit(kinds, streams, chunks, *CASES[name]))
    return got


def describe(got: dict, chunks: int, reps: int) -> str:
    """The setting and the medians per update, for the notes."""
    updates = (chunks - 1) * CHUNK // K1
    per_update = {
        name: (
            statistics.median(a for a, _ in v) / updates,
            statistics.median(b for _, b in v) / updates,
        )
        for name, v in got.items()
    }  # fmt: skip
    return (
        f"Recurrent(nn.LSTM({M}, {N}), nn.Linear({N}, {P})), batch {BATCH}, k1={K1}, SGD, "
        f"{chunks} chunks of {CHUNK} steps; Lightning and the driver alone in lockstep on the same "
        f"batches (module docstring), {reps} repetitions of {updates} updates each; medians per "
        "update: "
        + "; ".join(
            f"{name}: Lightning {1e3 * a:.1f} ms, driver {1e3 * b:.1f} ms"
            for name, (a, b) in per_update.items()
        )
        + ". Every run also checks that both trained the same parameters (torch.equal)."
    )


def rows(got: dict) -> list[Row]:
    """Each case's median ratio of Lightning's time to the driver's."""
    out = []
    for name, (_, extras) in CASES.items():
        ratios = [a / b for a, b in got[name]]
        r = statistics.median(ratios)
        label = f"{name}: Lightning time per update / driver alone"
        target = "" if extras else f"<= {TARGET}x"
        out.append(
            Row(
                label,
                r,
                "x",
                target,
                None if extras else r <= TARGET,
                f"per-repetition range {min(ratios):.3f}-{max(ratios):.3f}",
            )  # fmt: skip
        )
    return out


def run(quick: bool, reps: int | None, threads: int) -> Group:
    group = Group("tbptt.lightning: time per update against the driver alone", load_before=load())
    why = missing()
    if why is not None:
        group.skipped = why
        group.load_after = load()
        return group
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    reps = reps or (3 if quick else 7)
    chunks = 8 if quick else 16
    streams = make_streams(chunks)
    got = measure(classes(streams), streams, chunks, reps)
    group.notes.append(describe(got, chunks, reps))
    group.rows += rows(got)
    group.load_after = load()
    return group
