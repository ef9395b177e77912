"""Bias, variance and cost of TBPTT, RTRL, UORO and ARTBP on a fresh tanh network.

    python examples/estimators_table.py [--hidden 32] [--steps 200] [--batch 8] [--draws 100]

A fresh tanh network (spectral radius 1) and random data, the parameters fixed; each method's
frozen estimate is compared with exact BPTT (tbptt.analysis.estimators, SEMANTICS.md 8): bias
||E g - g*|| / ||g*|| (with the noise floor sqrt(V / N) an unbiased method shows from N draws),
variance (summed over the entries, relative to ||g*||^2), the error of one estimate, the time per
step of the whole batch, and the memory per stream of the online trainer. Writes
docs/figures/estimators.csv and docs/figures/estimators.png. About a minute.
"""

from __future__ import annotations

import argparse
import csv
import os

import numpy as np

import tbptt
from tbptt.analysis.estimators import FIELDS, Method, compare, table

HERE = os.path.dirname(os.path.abspath(__file__))
FIGURES = os.path.join(HERE, "..", "docs", "figures")

METHODS = [
    Method("tbptt", {"k1": 10, "k2": 10}),
    Method("tbptt", {"k1": 1, "k2": 20}),
    Method("rtrl"),
    Method("uoro"),
    Method("artbp", {"c": 0.1}),
    Method("artbp", {"c": 0.05}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=32, help="units n")
    parser.add_argument("--steps", type=int, default=200, help="steps T of each stream")
    parser.add_argument("--batch", type=int, default=8, help="streams")
    parser.add_argument("--draws", type=int, default=100, help="estimates of UORO and ARTBP")
    parser.add_argument("--out-dir", default=FIGURES, help="where the CSV and the figure go")
    args = parser.parse_args()

    rng = np.random.default_rng(1)
    model = tbptt.ElmanRNN.init(n=args.hidden, m=4, p=2, seed=0, spectral_radius=1.0)
    x = rng.normal(size=(args.steps, args.batch, 4))
    y = rng.normal(size=(args.steps, args.batch, 2))
    rows = compare(model, x, y, METHODS, draws=args.draws, seed=0)
    print(f"tanh network n = {args.hidden}, {args.batch} streams of {args.steps} steps")
    print(table(rows))
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "estimators.csv")
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow(r.as_dict())
    print(f"Wrote {os.path.relpath(path)}")
    plot(rows, os.path.join(args.out_dir, "estimators.png"))
    print(f"Wrote {os.path.relpath(os.path.join(args.out_dir, 'estimators.png'))}")


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tbptt.files import atomic_write

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    label = {"fontsize": 7, "xytext": (4, 2), "textcoords": "offset points"}
    for r in rows:
        cost, bias, var = 1e6 * r.seconds_per_step, max(r.bias, 1e-16), max(r.variance, 1e-16)
        a1.scatter(cost, bias, s=40)
        a1.annotate(r.method, (cost, bias), **label)
        a2.scatter(var, bias, s=40)
        a2.annotate(r.method, (var, bias), **label)
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel("bias ||E g - g*|| / ||g*||")
    a1.set_xlabel("time per step (us, frozen, whole batch)")
    a2.set_xlabel("variance (sum over entries) / ||g*||^2 (0 drawn at 1e-16)")
    a1.set_title("Bias against cost", fontsize=10)
    a2.set_title("Bias against variance", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


if __name__ == "__main__":
    main()
