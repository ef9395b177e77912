"""Influence balancing: UORO and ARTBP converge where TBPTT with k <= 40 diverges.

    python examples/influence_balancing_unbiased.py [--steps 50000] [--lr 1e-5] [--out FIGURE.png]

The system of tbptt/influence.py (Tallec and Ollivier 2017): 23 linear units, 10 fed +theta and 13
fed -theta, the loss on the first unit; theta* = -1/6. Every method trains theta online from 0.5
with plain SGD through the system's own Jacobians (tbptt/analysis/influence_methods.py):
BPTT(k) (every step, the new loss backpropagated k steps), RTRL (exact online gradients), UORO
(every step, three seeds) and ARTBP with constant cut probabilities c = 0.1 and 0.05 (windows of
mean length 10 and 20, three seeds each). Prints theta at a few steps and draws |theta - theta*|.
About half a minute.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from tbptt import Truncation
from tbptt.analysis import influence as ib
from tbptt.analysis import influence_methods as im

HERE = os.path.dirname(os.path.abspath(__file__))
FIGURE = os.path.join(HERE, "..", "docs", "figures", "influence_unbiased.png")


def runs(steps: int, lr: float, seeds: int = 3) -> dict[str, ib.Run]:
    """Every method's run, by name."""
    out = {f"BPTT({k}), k1=1": ib.train(Truncation(1, k), steps, lr=lr) for k in (1, 10, 20, 40)}
    out["RTRL (exact)"] = im.train_rtrl(steps, lr=lr)
    for seed in range(seeds):
        out[f"UORO, seed {seed}"] = im.train_uoro(steps, lr=lr, rng=seed)
    for c in (0.1, 0.05):
        for seed in range(seeds):
            out[f"ARTBP c={c}, seed {seed}"] = im.train_artbp(steps, lr=lr, c=c, rng=seed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50000, help="online steps")
    parser.add_argument("--lr", type=float, default=1e-5, help="SGD learning rate on theta")
    parser.add_argument("--out", default=FIGURE, help="where the figure goes")
    args = parser.parse_args()

    print(f"theta* = {ib.optimum():.6f}; SGD with lr = {args.lr:g} from theta0 = {ib.THETA0}")
    marks = [0, 1000, 5000, 10000, 20000, args.steps]
    print(f"  {'method':22s}" + "".join(f"{'t=' + str(c):>11s}" for c in marks))
    results = runs(args.steps, args.lr)
    for name, run in results.items():
        print(f"  {name:22s}" + "".join(f"{run.theta[c]:11.4g}" for c in marks))
    star = ib.optimum()
    ok = [n for n, r in results.items() if abs(r.final - star) < 1e-3]
    print(f"within 1e-3 of theta* at the end: {', '.join(ok)}")
    plot(results, args.out)
    print(f"Wrote {os.path.relpath(args.out)}")


def plot(results: dict[str, ib.Run], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tbptt.files import atomic_write

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {
        "BPTT": "tab:red",
        "RTRL": "black",
        "UORO": "tab:blue",
        "ARTBP c=0.1": "tab:green",
        "ARTBP c=0.05": "tab:olive",
    }
    star = ib.optimum()
    seen = set()
    for name, run in results.items():
        family = next(k for k in colors if name.startswith(k))
        label = family if family != "BPTT" else name
        if family != "BPTT" and family in seen:
            label = None
        seen.add(family)
        ls = ":" if family == "BPTT" else "-"
        lw = 2.0 if family == "RTRL" else 1.0
        gap = np.maximum(np.abs(run.theta - star), 1e-9)
        ax.semilogy(gap[::50], ls=ls, lw=lw, color=colors[family], alpha=0.8, label=label)
    ax.set_ylim(1e-8, 1e4)
    ax.set_xlabel("step / 50")
    ax.set_ylabel("|theta - theta*|")
    title = (
        "Influence balancing online (theta* = -1/6): BPTT(k <= 40) diverges, UORO and ARTBP "
        "converge"
    )
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


if __name__ == "__main__":
    main()
