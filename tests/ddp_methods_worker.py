"""One process of tests/test_distributed_methods.py (ARTBP, UORO, RTRL on several processes).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_methods_worker.py OUT

Every scenario below on this rank's streams (a contiguous half of the batch; the data and chunks
of tests/ddp_worker.py), with a checkpoint mid-run and at the end, once more resumed from the
single-process checkpoint the test wrote to OUT, and the all-reduces counted; then ARTBP with
fresh entropy (rng=None), whose cuts every rank must share. The test process imports this module
for the same models (the single-process reference).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from ddp_worker import BATCH, CHUNKS, CUT, DT, H, M, P, data, feed
from torch import nn

from tbptt.torch import ElmanRNN, Recurrent
from tbptt.torch.methods import make_trainer

__all__ = ["BATCH", "CHUNKS", "CUT", "SCENARIOS", "data", "feed", "make"]

# name: (method, model kind, options, optimizer, clip, reduction)
SCENARIOS = {
    "artbp-lstm": ("artbp", "lstm", {"c": 0.3, "b": 2, "rng": 3}, "sgd", 2.0, "sum"),
    "artbp-elman-callable-mean": (
        "artbp",
        "elman",
        {"c": lambda L: min(1.0, 0.1 * L), "rng": 4},
        "adam",
        None,
        "mean",
    ),
    "uoro-lstm-mean": ("uoro", "lstm", {"k1": 3, "rng": 5}, "sgd", 2.0, "mean"),
    "rtrl-gru": ("rtrl", "gru", {"k1": 2}, "sgd", None, "sum"),
}


def make(name: str, rng: object = "scenario"):
    """The scenario's model (the same initial values everywhere), optimizer, StepLR, trainer."""
    method, kind, options, optimizer, clip, reduction = SCENARIOS[name]
    if rng != "scenario":
        options = {**options, "rng": rng}
    torch.manual_seed(1)
    if kind == "lstm":
        model = Recurrent(nn.LSTM(M, H, num_layers=2), nn.Linear(H, P)).to(DT)
    elif kind == "gru":
        model = Recurrent(nn.GRU(M, 3), nn.Linear(3, P)).to(DT)
    else:
        model = ElmanRNN(n=H, m=M, p=P, batch_first=True, dtype=DT, seed=1)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return make_trainer(
        method,
        model,
        opt,
        clip=clip,
        scheduler=sched,
        batch_first=kind == "elman",
        reduction=reduction,
        **options,
    )


def main() -> None:
    from tbptt.torch.distributed import init_from_env

    out = sys.argv[1]
    torch.set_num_threads(1)
    launch = init_from_env("cpu")
    cols = launch.streams(BATCH)
    dist, calls, sizes = torch.distributed, {}, []
    all_reduce = dist.all_reduce
    for name in SCENARIOS:
        d = make(name)
        sizes[:] = []
        dist.all_reduce = lambda t, *a, **k: (sizes.append(t.numel()), all_reduce(t, *a, **k))[1]
        between = 0  # chunks that end between two updates: the loss check's collective
        for i, chunk in enumerate(CHUNKS):
            feed(d, [chunk], cols)
            between += d.u_prev != d.t
            if i + 1 == CUT:
                d.save(os.path.join(out, f"{name}-mid.pt"))
        d.finish()
        dist.all_reduce = all_reduce
        # the update's buffer: gradients and their flags, 3 values, 3 slots per rank
        grad_size = sum(p.numel() + 1 for p in d.model.parameters()) + 3 + 3 * launch.world
        calls[name] = [d.updates, sizes.count(grad_size), between]
        d.save(os.path.join(out, f"{name}-end.pt"))
        d = make(name)  # resume what 1 process saved, on 2
        d.load(os.path.join(out, f"{name}-single-mid.pt"))
        feed(d, CHUNKS[CUT:], cols)
        d.finish()
        d.save(os.path.join(out, f"{name}-resumed.pt"))
    d = make("artbp-lstm", rng=None)  # fresh entropy: rank 0's, so the same cuts everywhere
    cuts = []
    x, y, mask, reset = data()
    for a, b in CHUNKS:
        d.feed(x[a:b, cols], y[a:b, cols], mask[a:b, cols], reset[a:b, cols])
        cuts.append(d.u_prev)
    with open(os.path.join(out, f"calls-{launch.rank}.json"), "w") as fh:
        json.dump({"calls": calls, "fresh cuts": cuts}, fh)


if __name__ == "__main__":
    main()
