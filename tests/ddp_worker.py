"""One process of the data-parallel tests (tests/test_distributed.py), started by torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py MODE OUT

MODE equal: every scenario below on this rank's streams (a contiguous half of the batch), with a
checkpoint mid-run and at the end, and once more resumed from the single-process checkpoint the
test wrote to OUT; then a NaN in rank 1's data, then chunks of different lengths (errors as JSON),
then the script of docs/distributed.md.
MODE die / hang: a run with a checkpoint after CUT chunks, after which rank 1 exits (os._exit)
or stops answering (the driver's group then has a 4 s timeout); the job must end with an error,
and the checkpoint stay whole.

The test process imports this module for the same models, data and chunks (the single-process
reference).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch
from torch import nn

import tbptt
from tbptt.torch import TBPTT, ElmanRNN, Recurrent
from tbptt.torch.state import leaves as st_leaves  # noqa: F401  (the test's comparisons)

DT = torch.float64
M, H, P, BATCH, T = 3, 5, 2, 4, 40
CHUNKS = [(0, 4), (4, 11), (11, 12), (12, 19), (19, 26), (26, 33), (33, 40)]
CUT = 3  # chunks before the mid-run checkpoint

# name: (model kind, k1, k2, inject, flush, optimizer, clip, wrapped in DistributedDataParallel)
# SGD tells a summed gradient from an averaged one (Adam would not), clipping needs the global norm.
SCENARIOS = {
    "lstm-k4-k4": ("lstm", 4, 4, "new", False, "sgd", None, False),
    "lstm-k2-k5-flush": ("lstm", 2, 5, "new", True, "sgd", 2.0, False),
    "lstm-k3-k8-last": ("lstm", 3, 8, "last", False, "adam", 0.5, False),
    "lstm-k5-k2-window-flush": ("lstm", 5, 2, "window", True, "sgd", 2.0, False),
    "elman-batch-first-k3-k7": ("elman", 3, 7, "new", True, "adam", None, False),
    "ddp-lstm-k4-k4": ("lstm", 4, 4, "new", False, "sgd", None, True),
    "ddp-lstm-k2-k5-flush": ("lstm", 2, 5, "new", True, "sgd", 2.0, True),
}


DDP_HOOK_CALLS: list[int] = []


def _ddp_hook(state: object, bucket):  # DDP rejects a return annotation that is a string
    """Count the calls; give the bucket back unreduced (it must never be called)."""
    DDP_HOOK_CALLS.append(1)
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def make(name: str, process_group: object = None) -> TBPTT:
    """The scenario's model (the same initial values everywhere), optimizer and StepLR."""
    kind, k1, k2, inject, flush, optimizer, clip, ddp = SCENARIOS[name]
    torch.manual_seed(1)
    if kind == "lstm":
        model = Recurrent(nn.LSTM(M, H, num_layers=2), nn.Linear(H, P)).to(DT)
    else:
        model = ElmanRNN(n=H, m=M, p=P, batch_first=True, dtype=DT, seed=1)
    if ddp and torch.distributed.is_initialized():  # the reference is the bare model
        model = nn.parallel.DistributedDataParallel(model)
        model.register_comm_hook(None, _ddp_hook)  # counts the reducer's own all-reduces
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    trunc = tbptt.Truncation(k1, k2, inject, flush=flush)
    return TBPTT(
        model,
        trunc,
        opt,
        clip=clip,
        scheduler=sched,
        batch_first=kind == "elman",
        process_group=process_group,
    )


def data(batch_first: bool = False) -> tuple[torch.Tensor, ...]:
    """x, y, mask, reset of all BATCH streams, (T, BATCH, ...) or (BATCH, T, ...)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, BATCH, M, generator=g, dtype=DT)
    y = torch.randn(T, BATCH, P, generator=g, dtype=DT)
    mask = torch.rand(T, BATCH, generator=g, dtype=DT)
    reset = torch.rand(T, BATCH, generator=g) < 0.1
    if batch_first:
        return tuple(v.transpose(0, 1).contiguous() for v in (x, y, mask, reset))
    return x, y, mask, reset


def feed(d: TBPTT, chunks: list[tuple[int, int]], cols: slice = slice(None)) -> None:
    """Feed the chunks of the streams `cols` (a rank's share, or all of them)."""
    x, y, mask, reset = data(d.batch_first)
    for a, b in chunks:
        if d.batch_first:
            d.feed(x[cols, a:b], y[cols, a:b], mask[cols, a:b], reset[cols, a:b])
        else:
            d.feed(x[a:b, cols], y[a:b, cols], mask[a:b, cols], reset[a:b, cols])


def equal(out: str, launch) -> None:
    cols = launch.streams(BATCH)
    dist, calls, sizes = torch.distributed, {}, []
    all_reduce = dist.all_reduce
    for name in SCENARIOS:
        sizes[:], DDP_HOOK_CALLS[:] = [], []
        dist.all_reduce = lambda t, *a, **k: (sizes.append(t.numel()), all_reduce(t, *a, **k))[1]
        d = make(name)
        feed(d, CHUNKS[:CUT], cols)
        d.save(os.path.join(out, f"{name}-mid.pt"))
        feed(d, CHUNKS[CUT:], cols)
        d.finish()
        dist.all_reduce = all_reduce
        # the update's buffer: gradients and their flags, 3 values, 3 slots per rank
        grad_size = sum(p.numel() + 1 for p in d.model.parameters()) + 3 + 3 * launch.world
        k1 = d.truncation.k1
        between = sum(1 for _, b in CHUNKS if b % k1)  # chunks ending between two updates
        calls[name] = [d.updates, sizes.count(grad_size), between, len(sizes), len(DDP_HOOK_CALLS)]
        d.save(os.path.join(out, f"{name}-end.pt"))
        for src in ("single-mid", "mid"):  # resume what 1 process saved, and 2, on 2
            d = make(name)
            d.load(os.path.join(out, f"{name}-{src}.pt"))
            feed(d, CHUNKS[CUT:], cols)
            d.finish()
            d.save(os.path.join(out, f"{name}-{src}-resumed.pt"))
    with open(os.path.join(out, f"calls-{launch.rank}.json"), "w") as fh:
        json.dump(calls, fh)
    docs_example(out, launch)
    errors = {}
    d = make("lstm-k2-k5-flush")  # an infinite loss in rank 1's streams only (a finite target
    x, y, mask, reset = data()  # whose square overflows; a NaN input is an InputError): both
    if launch.rank == 1:  # stop at one update
        y[9, cols.start] = 1e200
    try:
        for a, b in CHUNKS:
            d.feed(x[a:b, cols], y[a:b, cols], mask[a:b, cols], reset[a:b, cols])
    except tbptt.NonFiniteError as exc:
        errors["nan"] = [str(exc), exc.update, d.updates]
    d = make("lstm-k4-k4")  # chunks of different lengths: both raise at the first check
    try:
        feed(d, [(0, 4), (4, 8)] if launch.rank == 0 else [(0, 3), (3, 8)], cols)
    except ValueError as exc:
        errors["mismatch"] = [str(exc)]
    with open(os.path.join(out, f"errors-{launch.rank}.json"), "w") as fh:
        json.dump(errors, fh)


def docs_example(out: str, launch) -> None:
    """docs/distributed.md's script, run here; what it prints goes to docs-RANK.txt."""
    import contextlib
    import io
    import re

    doc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "distributed.md")
    with open(doc, encoding="utf-8") as fh:
        code = re.search(r"```python\n(.*?)```", fh.read(), re.S).group(1)
    printed, here = io.StringIO(), os.getcwd()
    os.chdir(out)
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, doc, "exec"), {"__name__": "docs_example"})
    finally:
        os.chdir(here)
    with open(os.path.join(out, f"docs-{launch.rank}.txt"), "w") as fh:
        fh.write(printed.getvalue())


def fail(out: str, launch, how: str) -> None:
    cols = launch.streams(BATCH)
    group = None
    if how == "hang":  # both ranks are running: from here on a collective waits at most 4 s
        dist = torch.distributed
        dist.barrier()
        group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=4))
    d = make("lstm-k2-k5-flush", group)
    feed(d, CHUNKS[:CUT], cols)
    d.save(os.path.join(out, "checkpoint.pt"))
    feed(d, CHUNKS[CUT : CUT + 1], cols)
    if launch.rank == 1:
        if how == "die":
            os._exit(3)
        time.sleep(600)  # stops answering; rank 0's collectives time out
    feed(d, CHUNKS[CUT + 1 :], cols)
    d.save(os.path.join(out, "checkpoint.pt"))  # never reached: the run must fail before


def main() -> None:
    from tbptt.torch.distributed import init_from_env

    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    launch = init_from_env("cpu")
    if mode == "equal":
        equal(out, launch)
    else:
        fail(out, launch, mode)


if __name__ == "__main__":
    main()
