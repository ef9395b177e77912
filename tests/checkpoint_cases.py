"""The runs whose checkpoints tests/data/checkpoints holds: one per method and engine, each a small
float64 model on a fixed stream with resets and a mask (shared by the fixture writer and the test).
"""

from __future__ import annotations

import numpy as np

import tbptt
from tbptt.methods import make_trainer

CUT = 3  # chunks before the checkpoint
SIZES = [4, 7, 3, 6, 5, 9, 4]  # chunk lengths: none a multiple of the schedules' k1
M, N, P, BATCH = 3, 5, 2, 3

CASES = (
    "numpy_tbptt",
    "numpy_rtrl",
    "numpy_uoro",
    "numpy_artbp",
    "torch_tbptt_chained",
    "torch_tbptt_overlap",
    "torch_tbptt_lstm",
    "torch_rtrl",
    "torch_uoro",
    "torch_artbp",
)


def stream() -> list[tuple[np.ndarray, ...]]:
    """Chunks (x, y, mask, reset) of BATCH streams, time-major."""
    rng = np.random.default_rng(2026)
    T = sum(SIZES)
    x = rng.normal(size=(T, BATCH, M))
    y = rng.normal(size=(T, BATCH, P))
    mask = (rng.random((T, BATCH)) < 0.8).astype(np.float64)
    reset = rng.random((T, BATCH)) < 0.1
    bounds = np.cumsum([0, *SIZES])
    return [
        (x[a:b], y[a:b], mask[a:b], reset[a:b])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def build(name: str):
    """A fresh trainer for case `name` and its chunks (torch tensors for the torch cases)."""
    chunks = stream()
    if name.startswith("numpy"):
        model = tbptt.ElmanRNN.init(n=N, m=M, p=P, seed=7)
        opt = tbptt.Adam(lr=0.01)
        method = name.split("_")[1]
        options = {
            "tbptt": {"k1": 2, "k2": 5},
            "rtrl": {"k1": 3},
            "uoro": {"k1": 2, "rng": 11},
            "artbp": {"c": 0.3, "b": 2, "rng": 11},
        }[method]
        return make_trainer(method, model, opt, clip=5.0, **options), chunks

    import torch
    from torch import nn

    from tbptt.torch import ARTBP, RTRL, TBPTT, UORO, ElmanRNN, Recurrent

    torch.manual_seed(3)
    if name == "torch_tbptt_lstm":
        model = Recurrent(nn.LSTM(M, N), nn.Linear(N, P)).double()
    else:
        model = ElmanRNN(n=N, m=M, p=P, dtype=torch.float64, seed=7)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    kw = {"clip": 5.0}
    if name == "torch_tbptt_chained":
        trainer = TBPTT(model, tbptt.Truncation(4, 3, inject="window", flush=True), opt, **kw)
    elif name in ("torch_tbptt_overlap", "torch_tbptt_lstm"):
        trainer = TBPTT(model, tbptt.Truncation(2, 5, flush=True), opt, **kw)
    elif name == "torch_rtrl":
        trainer = RTRL(model, opt, k1=3, **kw)
    elif name == "torch_uoro":
        trainer = UORO(model, opt, k1=2, rng=11, **kw)
    else:
        trainer = ARTBP(model, opt, c=0.3, b=2, rng=11, **kw)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return trainer, [tuple(as_t(a) for a in chunk) for chunk in chunks]


def feed(trainer, chunks) -> None:
    for x, y, mask, reset in chunks:
        trainer.feed(x, y, mask, reset)
