"""Copy memory with ARTBP against TBPTT at the same mean truncation length.

    python examples/copy_memory_artbp.py [--lag 5] [--k 10] [--updates 10000] [--out FIGURE.png]

The task of examples/copy_memory.py (Arjovsky, Shah and Bengio 2016; tbptt/tasks.py): 10 symbols
from 8, lag - 1 blanks and a delimiter, then the 10 symbols recalled in order, each lag + 10 steps
after it was shown. The seed's Elman network (tanh, softmax, cross-entropy) is trained with Adam,
one update per batch of 32 fresh sequences (the gradient norm clipped at 1, as in
examples/copy_memory.py), on three frozen gradient estimates:

    TBPTT(k, k)    chunks of k steps (every k steps, backpropagate k steps): mean window k
    ARTBP(c=1/k)   a cut after each step with probability 1/k: windows of mean length k, the
                   gradient that crosses an uncut boundary weighted by 1 / (1 - c)
    exact BPTT     the whole sequence

With k = 10 < lag + 10 = 15 no TBPTT window connects a recall to its symbol, so TBPTT stays at
chance (1/8). ARTBP's windows are as short on average, but about one in five reaches back 15 steps
and is weighted up (by 1/0.9^15, about 5), so its gradient is the exact one in expectation: it
leaves chance, but its variance (and the clipping, which damps exactly those rare weighted
windows) makes it far slower than exact BPTT. Writes
docs/figures/copy_memory_artbp.png. About three minutes with one BLAS thread
(OPENBLAS_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import tbptt
from tbptt.app.tasks import COPY_LENGTH, COPY_SYMBOLS, copy_memory
from tbptt.methods import frozen_gradients
from tbptt.numpy.elman import forward

HERE = os.path.dirname(os.path.abspath(__file__))
FIGURE = os.path.join(HERE, "..", "docs", "figures", "copy_memory_artbp.png")


def accuracy(model: tbptt.ElmanRNN, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of recalled symbols that are right, over held-out sequences."""
    traj = forward(model, x, np.zeros((x.shape[1], model.n)))
    return float((traj.z[-COPY_LENGTH:].argmax(-1) == y[-COPY_LENGTH:]).mean())


def train(
    method: str,
    options: dict,
    lag: int,
    updates: int,
    hidden: int = 128,
    batch: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    every: int = 500,
    clip: float | None = 1.0,
) -> tuple[list[int], list[float]]:
    """Adam on `method`'s frozen estimate, one update per batch of fresh sequences; returns the
    held-out accuracy every `every` updates."""
    rng = np.random.default_rng(seed)
    model = tbptt.ElmanRNN.init(n=hidden, m=10, p=10, g="softmax", seed=seed)
    opt = tbptt.Adam(lr=lr)
    state = opt.init(model.params)
    xe, ye, _ = copy_memory(lag, 512, np.random.default_rng(12345))  # held-out sequences
    cuts = np.random.default_rng(seed + 1)  # ARTBP's cut draws
    steps, accs = [], []
    for it in range(1, updates + 1):
        x, y, _ = copy_memory(lag, batch, rng)  # (T, batch, 10), (T, batch)
        extra = {"rng": cuts} if method == "artbp" else {}
        grads = frozen_gradients(method, model, x, y, loss="cross_entropy", **options, **extra)
        grads = {k: g / batch for k, g in grads.items()}  # mean over the sequences
        if clip:
            grads, _ = tbptt.clip_grad_norm(grads, clip)  # 1.0, as examples/copy_memory.py
        params, state = opt.step(model.params, grads, state)
        model = model.replace(**params)
        if it % every == 0 or it == updates:
            steps.append(it)
            accs.append(accuracy(model, xe, ye))
    return steps, accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lag", type=int, default=5, help="Arjovsky's T: blanks + delimiter")
    parser.add_argument("--k", type=int, default=10, help="mean truncation length of both")
    parser.add_argument("--updates", type=int, default=10000, help="Adam updates (batches)")
    parser.add_argument("--hidden", type=int, default=128, help="units n")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    parser.add_argument("--out", default=FIGURE, help="where the figure goes")
    args = parser.parse_args()

    gap, T = args.lag + COPY_LENGTH, args.lag + 2 * COPY_LENGTH
    chance = f"chance 1/{COPY_SYMBOLS} = {1 / COPY_SYMBOLS:.3f}"
    print(
        f"copy memory: sequences of {T} steps, each symbol recalled {gap} steps after it; {chance}"
    )
    runs = {
        f"TBPTT({args.k}, {args.k})": ("tbptt", {"k1": args.k, "k2": args.k, "flush": True}),
        f"ARTBP(c=1/{args.k})": ("artbp", {"c": 1 / args.k}),
        "exact BPTT": ("tbptt", {"k1": T, "k2": T}),
    }
    results = {}
    for name, (method, options) in runs.items():
        start = time.perf_counter()
        steps, accs = train(method, options, args.lag, args.updates, args.hidden, seed=args.seed)
        results[name] = (steps, accs)
        shown = " ".join(f"{a:.2f}" for a in accs[:: max(1, len(accs) // 6)])
        print(
            f"{name:16s} accuracy {shown} -> {accs[-1]:.3f}  ({time.perf_counter() - start:.0f} s)"
        )
    plot(results, args, gap)
    print(f"Wrote {os.path.relpath(args.out)}")


def plot(results, args, gap) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tbptt.files import atomic_write

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, (steps, accs) in results.items():
        ax.plot(steps, accs, marker=".", ls="--" if name.startswith("TBPTT") else "-", label=name)
    ax.axhline(1 / COPY_SYMBOLS, color="black", lw=0.8, ls=":", label="chance (1/8)")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("updates (batches of 32 sequences)")
    ax.set_ylabel("recall accuracy (held-out)")
    ax.set_title(
        f"Copy memory, recall {gap} steps back; mean window {args.k} for both", fontsize=10
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write(args.out, lambda fh: fig.savefig(fh, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


if __name__ == "__main__":
    main()
