"""The torch engine on a GPU: five comparisons, ready for the day a CUDA device is at hand
(issue 28, item 6).

    python benchmarks/run.py --group gpu          on CUDA when present; otherwise a skip line

Each comparison reuses its CPU group's cases with the device as a parameter, timed side by side
(common.interleave), every case ending with torch.cuda.synchronize() so that a sample covers the
kernels it launched:

    driver    torch_driver.py: tbptt.torch.TBPTT against the hand-written loops on
              Recurrent(nn.LSTM(32, 128), nn.Linear(128, 32)), batch 32: the detach-every-k1
              loop (k1 = k2) and the PyTorch forum's snippet (k2 = 4 k1 > k1, inject=last)
    rollouts  rl.py: rl.unroll and rl.Segments (packed) against the per-step masked loop
    scans     scan.py: tbptt.torch.MinGRU and LRU (one scan per chunk) against nn.GRU (cuDNN's
              fused kernel on a GPU) and against their floors
    uoro      tbptt.torch.UORO (k1 = 32, as torch_methods.py runs it) against a plain per-step
              loop of the same module (torch_driver.py's hand loop with k = 1: forward, loss,
              backward, SGD step, state detached every step), time per step
    engines   exact BPTT through each engine's driver (Truncation(T, T), SGD) at bptt.py's batch-64
              size: the numpy engine (CPU) against the torch engine (on the device)

The targets shown are the CPU groups' (and issue 28's for UORO); the issues set none for a GPU.
With no CUDA device the group reports itself skipped. For the test (tests/test_bench_gpu.py),
the device can be forced and the sizes made tiny, by argument or environment:

    TBPTT_BENCH_DEVICE=cpu    run on this device even without CUDA
    TBPTT_BENCH_TINY=1        tiny sizes (seconds on a CPU; the figures mean nothing)
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace

import bptt
import rl
import scan
import torch_driver as td
from common import Group, Row, Timings, fmt_ms, interleave, load

DEVICE_ENV, TINY_ENV = "TBPTT_BENCH_DEVICE", "TBPTT_BENCH_TINY"
UORO_TARGET = 3.0  # issue 28, item 1: UORO at most 3x the per-step hand loop


@dataclass(frozen=True)
class Sizes:
    """The sizes of the five comparisons (the defaults: the CPU groups', shorter runs)."""

    lstm: dict  # torch_driver.setup's sizes: n, batch, k1, chunk
    stream: int  # steps of the driver's stream
    uoro_steps: int
    rl_settings: tuple  # (cell, N environments, mean episode length)
    rl_steps: int
    rl_hidden: int
    scan: dict  # scan.cases' sizes: steps, batch, width
    engines: bptt.Config


FULL = Sizes(
    lstm={},  # torch_driver's M, N, P, BATCH, K1, CHUNK
    stream=td.STREAM,
    uoro_steps=64,
    rl_settings=(("LSTM", 8, 20), ("LSTM", 64, 20), ("GRU", 64, 20)),
    rl_steps=rl.T,
    rl_hidden=rl.H,
    scan={},  # scan.py's T, BATCH, H
    engines=next(c for c in bptt.CONFIGS if c.batch == 64),
)
TINY = Sizes(
    lstm={"n": 8, "batch": 2, "k1": 4, "chunk": 8, "m": 3, "p": 2},
    stream=16,
    uoro_steps=8,
    rl_settings=(("LSTM", 4, 5),),
    rl_steps=12,
    rl_hidden=8,
    scan={"steps": 8, "batch": 2, "width": 8},
    engines=bptt.Config(4, 8, 4, 4, 12, inner=1),
)


def pick_device(device: str | None = None) -> str | None:
    """The device to run on: the argument, else $TBPTT_BENCH_DEVICE, else "cuda" when present,
    else None (the group is skipped)."""
    device = device or os.environ.get(DEVICE_ENV) or None
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else None


def synced(cases: dict[str, Callable[[], object]], device: str) -> dict[str, Callable[[], object]]:
    """Each case followed by torch.cuda.synchronize() on CUDA (kernels run asynchronously)."""
    import torch

    if not device.startswith("cuda"):
        return dict(cases)

    def wait(f):
        def go() -> None:
            f()
            torch.cuda.synchronize(device)

        return go

    return {name: wait(f) for name, f in cases.items()}


def row(
    t: Timings, name: str, slow: str, fast: str, target: float | None = None, sense: str = ">="
) -> Row:
    """slow / fast, against `target` (None: no target), with its range and medians."""
    note = f"; medians {slow} {fmt_ms(t.median(slow))}, {fast} {fmt_ms(t.median(fast))}"
    if target is None:
        return td.ratio_row(t, name, slow, fast, "", None, note)
    met = (lambda r: r >= target) if sense == ">=" else (lambda r: r <= target)
    return td.ratio_row(t, name, slow, fast, f"{sense} {target:g}x", met, note)


def driver(engine, sizes: Sizes, device: str, reps: int) -> tuple[list[Row], str]:
    """The torch driver against the hand-written loops (k1 = k2, and k2 = 4 k1 > k1)."""
    s = td.setup(engine, sizes.stream, device, **sizes.lstm)
    k1 = s.k1
    t = interleave(
        synced(
            {
                "hand k1=k2": td.hand_case(s),
                "driver k1=k2": td.driver_case(s, k1),
                "driver last k2=4k1": td.driver_case(s, 4 * k1, "last"),
                "forum last k2=4k1": td.forum_case(s, 4 * k1),
            },
            device,
        ),
        reps=reps,
    )
    hand = f"driver, k1=k2={k1}: driver / hand-written detach loop"
    forum = f"driver, k1={k1}, k2={4 * k1} (inject=last): forum snippet / driver"
    rows = [
        row(t, hand, "driver k1=k2", "hand k1=k2", td.OVERHEAD_TARGET, "<="),
        row(t, forum, "forum last k2=4k1", "driver last k2=4k1", td.FORUM_TARGET),
    ]
    lstm = f"LSTM({s.xs.shape[-1]}, {s.n}), batch {s.xs.shape[1]}"
    return rows, f"driver: {lstm}, stream of {s.stream} steps in chunks of {s.chunk}"


def rollouts(sizes: Sizes, device: str, reps: int) -> tuple[list[Row], str]:
    """Rollouts packed (rl.unroll, rl.Segments) against the per-step masked loop."""
    rows = []
    for cell, n, mean in sizes.rl_settings:
        forwards, info = rl.setting(cell, n, mean, device, sizes.rl_steps, sizes.rl_hidden)
        cases = {name: (lambda f=f: f().backward()) for name, f in forwards.items()}
        t = interleave(synced(cases, device), reps=reps)
        label = f"rollouts, {cell} N={n} mean episode {mean} ({info})"
        for layout in ("unroll", "segs"):
            rows.append(row(t, f"{label}: loop / {layout}", "loop", layout, rl.LOOP_TARGET.get(n)))
            rows.append(
                row(t, f"{label}: {layout} / limit", layout, "limit", rl.LIMIT_TARGET, "<=")
            )
    return rows, f"rollouts: T={sizes.rl_steps}, {sizes.rl_hidden} units"


def scans(sizes: Sizes, device: str, reps: int) -> tuple[list[Row], str]:
    """tbptt.torch.MinGRU and LRU against nn.GRU and their floors, forward + backward."""
    import torch
    import torch.nn.functional as F

    from tbptt.torch import LRU, MinGRU

    fns = scan.cases(torch, F, (MinGRU, LRU), device, **sizes.scan)
    keep = ("mingru", "mingru floor", "lru", "lru floor", "nn.GRU")
    t = interleave(synced({k: fns[k] for k in keep}, device), reps=reps)
    rows = [
        row(t, "scans: nn.GRU / MinGRU scan", "nn.GRU", "mingru", scan.GRU_TARGET),
        row(t, "scans: nn.GRU / LRU scan", "nn.GRU", "lru"),
        row(t, "scans: MinGRU scan / its floor", "mingru", "mingru floor", scan.FLOOR_TARGET, "<="),
        row(t, "scans: LRU scan / its floor", "lru", "lru floor", scan.FLOOR_TARGET, "<="),
    ]
    size = {"steps": scan.T, "batch": scan.BATCH, "width": scan.H, **sizes.scan}
    return rows, "scans: T={steps}, batch {batch}, H={width}, forward + backward".format(**size)


def uoro(engine, sizes: Sizes, device: str, reps: int) -> tuple[list[Row], str]:
    """tbptt.torch.UORO against the plain per-step loop, both over the same steps."""
    import torch

    from tbptt.torch.methods import make_trainer

    s = td.setup(engine, sizes.uoro_steps, device, **sizes.lstm)

    def uoro_case():
        net = td.module(s)
        d = make_trainer("uoro", net, torch.optim.SGD(net.parameters(), lr=1e-4), k1=s.k1, rng=0)
        for i in range(0, s.stream, s.chunk):
            d.feed(s.xs[i : i + s.chunk], s.ys[i : i + s.chunk])
        d.finish()

    cases = {"plain step": td.hand_case(s, 1), "uoro": uoro_case}
    t = interleave(synced(cases, device), reps=reps)
    name = f"uoro (k1={s.k1}) / plain per-step loop, time per step"
    return [row(t, name, "uoro", "plain step", UORO_TARGET, "<=")], (
        f"uoro: the driver's LSTM, {s.stream} steps"
    )


def engines(sizes: Sizes, device: str, reps: int) -> tuple[list[Row], str]:
    """Exact BPTT through each engine's driver: numpy (CPU) against torch (device)."""
    import numpy as np
    import torch

    import tbptt
    from tbptt.torch import TBPTT, ElmanRNN, l2_loss

    cfg = sizes.engines
    model, x, y = bptt.data(cfg)
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    trunc = tbptt.Truncation(cfg.T, cfg.T)
    trained = {}

    def numpy_engine():
        d = tbptt.TBPTT(model.copy(), trunc, tbptt.SGD(lr=1e-4), loss="l2")
        d.feed(x, y)
        trained["numpy"] = d.model.params

    def torch_engine():
        net = ElmanRNN.from_numpy(model).to(device)
        d = TBPTT(net, trunc, torch.optim.SGD(net.parameters(), lr=1e-4), loss_fn=l2_loss)
        d.feed(xt, yt)
        trained["torch"] = {k: v.detach().cpu().numpy() for k, v in net.named_parameters()}

    t = interleave(synced({"numpy": numpy_engine, "torch": torch_engine}, device), reps=reps)
    diff = max(
        float(np.abs(trained["torch"][k] - v).max() / max(np.abs(v).max(), 1e-30))
        for k, v in trained["numpy"].items()
    )
    name = f"engines, exact BPTT, {cfg.label()}: numpy engine / torch engine"
    note = f"engines: {cfg.label()}; parameters after the update agree to {diff:.1e} (relative)"
    return [row(t, name, "numpy", "torch")], note


def device_note(device: str) -> str:
    import torch

    if not device.startswith("cuda"):
        return f"device {device} (forced; not a GPU: the figures are not GPU figures)"
    props = torch.cuda.get_device_properties(device)
    return (
        f"device {torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB), "
        f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    )


def run(
    quick: bool, reps: int | None, threads: int, device: str | None = None, tiny: bool = False
) -> Group:
    group = Group("GPU: the torch engine on CUDA (issue 28)", load_before=load())
    engine, why = td.import_engine()
    device = pick_device(device) if engine is not None else None
    if device is None:
        group.skipped = why or (
            f"no CUDA device here (torch.cuda.is_available() is False); {DEVICE_ENV}=cpu runs "
            "the group on the CPU anyway"
        )
        group.load_after = load()
        return group
    import torch

    torch.set_num_threads(threads)
    sizes = TINY if tiny or os.environ.get(TINY_ENV) == "1" else FULL
    if quick and sizes is FULL:
        sizes = replace(FULL, stream=td.STREAM // 2)  # as the torch group's --quick
    reps = reps or (3 if quick else 9)
    group.notes.append(
        f"{device_note(device)}; {reps} interleaved repetitions, {threads} CPU threads."
    )
    for name, part in (
        ("driver", lambda: driver(engine, sizes, device, reps)),
        ("rollouts", lambda: rollouts(sizes, device, reps)),
        ("scans", lambda: scans(sizes, device, reps)),
        ("uoro", lambda: uoro(engine, sizes, device, reps)),
        ("engines", lambda: engines(sizes, device, reps)),
    ):
        try:
            rows, note = part()
        except Exception as exc:  # report it and measure the other comparisons
            traceback.print_exc()
            rows, note = [], f"{name} failed: {type(exc).__name__}: {exc}"
        group.rows += rows
        group.notes.append(note + ".")
    group.load_after = load()
    return group
