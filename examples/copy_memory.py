"""Copy memory: a truncation shorter than the lag cannot learn the copy; a longer one does.

    python examples/copy_memory.py [--lag 5] [--k1 5] [--k2 10 15 20 25] [--updates 3000]

The task of Arjovsky, Shah and Bengio 2016 (tbptt/tasks.py): 10 symbols from 8, then lag - 1
blanks and a delimiter, then the 10 symbols must be output in order; each symbol is recalled
lag + 10 steps after it was shown (15 with lag 5), in sequences of lag + 20 steps. The numpy engine
trains the seed's Elman network (tanh, softmax output, cross-entropy) with Adam; each batch of 32
fresh sequences gives one update, the frozen TBPTT(k1, k2) estimate of SEMANTICS.md 5 (every k1
steps, backpropagate k2 steps; each sequence starts from h0 = 0). With k1 = 5 every recall loss
travels back between k2 - 4 and k2 steps, so k2 <= 15 never connects a recall to its symbol and
accuracy stays at chance (1/8); k2 >= 20 does, and k2 >= lag + 20 is exact BPTT.
Writes docs/figures/copy_memory.png. A few minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import tbptt
from tbptt.app.tasks import COPY_LENGTH, COPY_SYMBOLS, copy_memory
from tbptt.numpy.elman import forward

HERE = os.path.dirname(os.path.abspath(__file__))
FIGURE = os.path.join(HERE, "..", "docs", "figures", "copy_memory.png")


def accuracy(model: tbptt.ElmanRNN, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fraction of sequences whose recalled symbol is right, per recall position: (10,)."""
    traj = forward(model, x, np.zeros((x.shape[1], model.n)))
    guess = traj.z[-COPY_LENGTH:].argmax(-1)  # (10, batch): the recall steps
    return (guess == y[-COPY_LENGTH:]).mean(axis=1)


def train(k1, k2, args) -> tuple[list[int], list[float], np.ndarray, float]:
    rng = np.random.default_rng(args.seed)
    model = tbptt.ElmanRNN.init(n=args.hidden, m=10, p=10, g="softmax", seed=args.seed)
    opt = tbptt.Adam(lr=args.lr)
    state = opt.init(model.params)
    trunc = tbptt.Truncation(k1, k2, inject="new", flush=True)
    xe, ye, _ = copy_memory(args.lag, 512, np.random.default_rng(12345))  # held-out sequences
    steps, accs, start = [], [], time.perf_counter()
    for it in range(1, args.updates + 1):
        x, y, _ = copy_memory(args.lag, args.batch, rng)  # (T, batch, 10), (T, batch)
        grads = tbptt.gradients(model, x, y, trunc, loss="cross_entropy")
        grads.pop("h0")
        grads = {k: g / args.batch for k, g in grads.items()}  # mean over the sequences
        grads, _ = tbptt.clip_grad_norm(grads, 1.0)
        params, state = opt.step(model.params, grads, state)
        model = model.replace(**params)
        if it % args.every == 0 or it == args.updates:
            steps.append(it)
            accs.append(float(accuracy(model, xe, ye).mean()))
    return steps, accs, accuracy(model, xe, ye), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lag", type=int, default=5, help="Arjovsky's T: blanks + delimiter")
    parser.add_argument("--k1", type=int, default=5, help="steps between updates of a window")
    parser.add_argument("--k2", type=int, nargs="+", default=[10, 15, 20, 25], help="truncations")
    parser.add_argument("--updates", type=int, default=3000, help="Adam updates (batches)")
    parser.add_argument("--hidden", type=int, default=128, help="units n")
    parser.add_argument("--batch", type=int, default=32, help="sequences per update")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    parser.add_argument("--every", type=int, default=250, help="updates between evaluations")
    parser.add_argument("--out", default=FIGURE, help="where the figure goes")
    args = parser.parse_args()

    gap = args.lag + COPY_LENGTH
    T = args.lag + 2 * COPY_LENGTH
    print(
        f"copy memory: sequences of {T} steps, each symbol recalled {gap} steps after it; "
        f"chance accuracy 1/{COPY_SYMBOLS} = {1 / COPY_SYMBOLS:.3f}"
    )
    results = {}
    for k2 in args.k2:
        tr = tbptt.Truncation(args.k1, k2, flush=True)
        depths = [d for n, lo, hi in tr.loss_uses(T)[-COPY_LENGTH:] for d in (lo, hi)]
        steps, accs, per_pos, secs = train(args.k1, k2, args)
        results[k2] = (steps, accs)
        print(
            f"{tr.describe():34s} recall depths {min(depths)}-{max(depths)}: accuracy "
            f"{' '.join(f'{a:.2f}' for a in accs[:: max(1, len(accs) // 6)])} -> {accs[-1]:.3f}"
            f"  ({secs:.0f} s)"
        )
        print(f"{'':34s} per recalled symbol: {' '.join(f'{a:.2f}' for a in per_pos)}")
    plot(results, args, gap)
    print(f"Wrote {os.path.relpath(args.out)}")


def plot(results, args, gap) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tbptt.files import atomic_write

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k2, (steps, accs) in results.items():
        exact = k2 >= args.lag + 2 * COPY_LENGTH
        label = f"k2 = {k2}" + (" (exact BPTT)" if exact else "")
        ax.plot(steps, accs, marker=".", ls="-" if k2 > gap else "--", label=label)
    ax.axhline(1 / COPY_SYMBOLS, color="black", lw=0.8, ls=":", label="chance (1/8)")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("updates (batches of 32 sequences)")
    ax.set_ylabel("recall accuracy (held-out)")
    ax.set_title(
        f"Copy memory, recall {gap} steps after the symbol; TBPTT(k1={args.k1}, k2)", fontsize=10
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write(args.out, lambda fh: fig.savefig(fh, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


if __name__ == "__main__":
    main()
