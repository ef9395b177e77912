"""Truncation made visible in RL: a BPTT length L < D cannot learn a memory of D steps; L >= D does.

    python examples/ppo_truncation.py                          the table and plot of docs/rl.md
    python examples/ppo_truncation.py --lags 16 --lengths 8 16 --seeds 1

The task is examples/ppo_recurrent.py's recall of lag D: a cue at an episode's first step, asked
for at its last, step D - 1 (+1 for naming it, -1 otherwise; a memoryless policy scores 0). The
agent is that file's PPO, unchanged, trained through rl.Segments of length L: each episode is cut
into segments of L steps counted from its first step, each segment starts from the state the
collector stored, and no gradient crosses a segment's start. With L >= D the cue and the question
share a segment, and the gradient from the answer reaches the step that saw the cue. With L < D
they never do: the state that would carry the cue gets no gradient asking it to. Every run has
the same budget and stopping rule as the example (--total-steps, 10 greedy episodes every 2
updates reaching 0.9 stops it, then 100 fresh episodes). L >= D all give the same segments (an
episode is exactly D steps), so only L = D is run for them. --refresh-states adds, for the
largest D and the largest L < D, the runs whose segments start from states recomputed with the
current parameters (rl.states): exact values, the same cut gradient.

Prints one line per run as it ends, then a Markdown table; writes the plot (--plot).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ppo_recurrent  # noqa: E402  (the example beside this file)

FIGURE = os.path.join(HERE, "..", "docs", "figures", "ppo_truncation.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--lags", type=int, nargs="+", default=[8, 16], help="the memories D")
    p.add_argument(
        "--lengths", type=int, nargs="+", default=[4, 7, 8, 15, 16], help="the BPTT lengths L"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of each cell")
    p.add_argument("--total-steps", type=int, default=50_000, help="budget of each run")
    p.add_argument(
        "--refresh-states",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the refreshed-states runs for max(lags) and its largest L < D",
    )
    p.add_argument("--plot", default=FIGURE, help="the PNG written; '' for none")
    p.add_argument("--json", default="", help="also write every run's history there")
    args = p.parse_args(argv)

    cells = []  # (D, L, refresh)
    for D in args.lags:
        below = [L for L in sorted(args.lengths) if L < D]
        cells += [(D, L, False) for L in below]
        if any(L >= D for L in args.lengths):
            cells.append((D, D, False))
    if args.refresh_states:
        D = max(args.lags)
        below = [L for L in args.lengths if L < D]
        if below:
            cells.append((D, max(below), True))
    runs = {}
    for D, L, refresh in cells:
        for seed in args.seeds:
            flags = ["--env", "recall", "--lag", str(D), "--segment-length", str(L)]
            flags += ["--seed", str(seed), "--total-steps", str(args.total_steps), "--plot", ""]
            flags += ["--refresh-states"] if refresh else []
            start = time.perf_counter()
            res = ppo_recurrent.train(ppo_recurrent.parse_args(flags), log=lambda _: None)
            runs[D, L, refresh, seed] = res
            print(
                f"D {D:2d}  L {L:2d}{' refreshed' if refresh else ''}  seed {seed}  "
                f"{'solved' if res['ok'] else 'failed'}  env steps {res['steps']:6d}  "
                f"eval return {res['final'].mean():+.2f}  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    print()
    print("| D | L | states | solved | env steps, by seed | eval return (100 episodes), by seed |")
    print("|---|---|---|---|---|---|")
    for D, L, refresh in cells:
        rs = [runs[D, L, refresh, s] for s in args.seeds]
        returns = ", ".join(f"{r['final'].mean():+.2f}" for r in rs)
        label = f"{L}" if L < D else f"{L} (and any L >= {D})"
        print(
            f"| {D} | {label} | {'refreshed' if refresh else 'stored'} | "
            f"{sum(r['ok'] for r in rs)} of {len(rs)} | "
            f"{', '.join(str(r['steps']) for r in rs)} | "
            f"{returns} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            out = []
            for (D, L, refresh, seed), res in runs.items():
                out.append({"D": D, "L": L, "refresh": refresh, "seed": seed})
                out[-1] |= {k: res[k] for k in ("hist", "steps", "ok", "s")}
                out[-1]["final"] = res["final"].tolist()
            json.dump(out, fh)
    if args.plot:
        plot(runs, cells, args)
    return 0


def plot(runs: dict, cells: list, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.lags), figsize=(5 * len(args.lags), 3.6), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(args.lengths) + 1))
    for ax, D in zip(axes[0], args.lags, strict=True):
        for D_, L, refresh in cells:
            if D_ != D:
                continue
            color = colors[sorted(args.lengths).index(L)] if L in args.lengths else colors[-1]
            label = f"L = {L}" + (" (refreshed states)" if refresh else "")
            for i, s in enumerate(args.seeds):
                h = runs[D, L, refresh, s]["hist"]
                ax.plot(
                    h["eval_steps"],
                    h["eval"],
                    color=color,
                    ls="--" if refresh else "-",
                    marker="o",
                    ms=2,
                    lw=1.2,
                    alpha=0.8,
                    label=label if i == 0 else None,
                )
        ax.set_title(f"recall of lag D = {D}")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("greedy return (10 episodes)")
        ax.set_ylim(-1.05, 1.05)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("recurrent PPO, BPTT length L (rl.Segments' length), 3 seeds each", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
