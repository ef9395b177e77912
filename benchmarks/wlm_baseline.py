"""A plain PyTorch loop in the style of pytorch/examples' word_language_model, for comparison.

The baseline of docs/results.md: detach every 50 steps, Adam 2e-3, gradient norm clipped at 0.25,
32 streams, one-hot inputs, the same validation split as `tbptt train`.

    python benchmarks/wlm_baseline.py rnn 120       # cell (rnn or lstm), training seconds
    python benchmarks/wlm_baseline.py lstm 120 2    # ... and torch threads (default 1)
"""

import sys
import time

import numpy as np
import torch
from torch import nn

from tbptt.app.data import batchify, corpus_split

cell, budget = sys.argv[1], float(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
torch.manual_seed(0)
train_text, valid_text = corpus_split("shakespeare", 0.05)  # the same split as tbptt train
V = len(train_text.vocab)
train = torch.from_numpy(batchify(train_text.symbols.astype(np.int64), 32).copy())
valid = torch.from_numpy(batchify(valid_text.symbols.astype(np.int64), 16).copy())
rnn, head = (nn.LSTM if cell == "lstm" else nn.RNN)(V, 256), nn.Linear(256, V)
params = [*rnn.parameters(), *head.parameters()]
opt, eye = torch.optim.Adam(params, lr=2e-3), torch.eye(V)
h, i, n, t0 = None, 0, 0, time.time()
while time.time() - t0 < budget:
    if i + 51 > len(train):
        i, h = 0, None
    x, y = train[i : i + 50], train[i + 1 : i + 51]
    i += 50
    out, h = rnn(eye[x], h)
    h = tuple(s.detach() for s in h) if isinstance(h, tuple) else h.detach()
    loss = nn.functional.cross_entropy(head(out).reshape(-1, V), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(params, 0.25)
    opt.step()
    n += 50 * 32
seconds = time.time() - t0
with torch.no_grad():
    h, total = None, 0.0
    for j in range(0, len(valid) - 1, 256):
        x, y = valid[j : j + 256][: len(valid) - 1 - j], valid[j + 1 : j + 257]
        out, h = rnn(eye[x], h)
        total += nn.functional.cross_entropy(
            head(out).reshape(-1, V), y.reshape(-1), reduction="sum"
        ).item()
print(f"valid {total / ((len(valid) - 1) * 16):.3f} nats/char, {n / seconds:,.0f} chars/s")
