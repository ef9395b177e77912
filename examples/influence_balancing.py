"""Influence balancing (Tallec and Ollivier 2017): truncation gets the sign of the gradient wrong.

    python examples/influence_balancing.py [--steps 5000] [--lr 1e-4] [--out FIGURE.png]

23 linear units, 10 fed +theta and 13 fed -theta, the loss on the first unit (tbptt/influence.py).
Prints the truncated sensitivity sigma_k of the first unit to theta, then trains theta online from
0.5 with BPTT(k) (every step, the new loss backpropagated k steps: Truncation(1, k)), with
disjoint chunks (Truncation(k, k)) and with exact BPTT, and draws both. Runs in seconds.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from tbptt import Truncation
from tbptt.analysis import influence as ib

HERE = os.path.dirname(os.path.abspath(__file__))
FIGURE = os.path.join(HERE, "..", "docs", "figures", "influence_balancing.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000, help="online steps (one update each)")
    parser.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate on theta")
    parser.add_argument("--out", default=FIGURE, help="where the figure goes")
    args = parser.parse_args()

    sigma = ib.sensitivities(200)
    flip = int(np.flatnonzero(sigma[1:] < 0)[0]) + 1
    print(f"theta* = {ib.optimum():.6f}; exact sensitivity sigma_inf = {ib.exact_sensitivity():g}")
    print("truncated sensitivity sigma_k of the first unit (the sign of the TBPTT gradient):")
    for k in (1, 5, 10, 20, 30, 39, 40, 41, 45, 50, 60, 100):
        print(
            f"  k = {k:3d}  sigma_k = {sigma[k]:+9.4f}  "
            f"{'wrong sign' if sigma[k] > 0 else 'right sign'}"
        )
    print(f"sigma_k > 0 (wrong sign) for every k <= {flip - 1}; negative from k = {flip} on")

    chunk = np.cumsum(sigma[1:]) / np.arange(1, len(sigma))  # mean depth-sensitivity of a chunk
    chunk_flip = int(np.flatnonzero(chunk < 0)[0]) + 1
    print(
        f"disjoint chunks of k steps (k1 = k2 = k) average sigma over depths 1..k: wrong sign "
        f"for every k <= {chunk_flip - 1}"
    )

    checkpoints = [0, 1000, 2000, 3000, 4000, args.steps]
    runs = {}
    print(f"\ntheta during online training from theta0 = 0.5 (SGD, lr = {args.lr:g}):")
    print(f"  {'schedule':24s}" + "".join(f"{'t=' + str(c):>11s}" for c in checkpoints))
    schedules = [(f"BPTT({k}), k1=1", Truncation(1, k)) for k in (1, 10, 20, 40, 41, 45, 60)]
    schedules += [(f"chunks k1=k2={k}", Truncation(k, k)) for k in (50, 150)]
    schedules += [("exact BPTT", Truncation(1, args.steps))]
    for name, tr in schedules:
        run = ib.train(tr, args.steps, lr=args.lr)
        runs[name] = run
        print(f"  {name:24s}" + "".join(f"{run.theta[c]:11.4g}" for c in checkpoints))
    plot(sigma, runs, args.out)
    print(f"\nWrote {os.path.relpath(args.out)}")


def plot(sigma, runs, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tbptt.files import atomic_write

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    k = np.arange(1, len(sigma))
    a1.plot(k, sigma[1:], color="tab:blue", label="truncated sensitivity sigma_k")
    a1.axhline(0, color="black", lw=0.8)
    a1.axhline(ib.exact_sensitivity(), color="tab:green", ls="--", label="exact: sigma_inf = -6")
    a1.axvspan(0.5, 40.5, color="tab:red", alpha=0.08, label="wrong sign: k <= 40")
    a1.set_xlabel("truncation k (steps backpropagated)")
    a1.set_ylabel("d s_1 / d theta, truncated")
    a1.set_title("Influence of theta on the first unit within k steps", fontsize=10)
    a1.legend(fontsize=8)
    star = ib.optimum()
    for name, run in runs.items():
        gap = np.abs(run.theta - star)
        ls = "--" if name.startswith("chunks") else "-"
        lw = 2.5 if name == "exact BPTT" else 1.2
        a2.semilogy(np.maximum(gap, 1e-12), ls=ls, lw=lw, label=name)
    a2.set_ylim(1e-6, 1e4)
    a2.set_xlabel("step (one SGD update per update of the schedule)")
    a2.set_ylabel("|theta - theta*|")
    a2.set_title("Online training from theta0 = 0.5; theta* = -1/6", fontsize=10)
    a2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


if __name__ == "__main__":
    main()
