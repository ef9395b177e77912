"""Truncation made visible in RL: recurrent PPO on a memory of D steps, BPTT lengths L <, = D.

    python examples/ppo_truncation.py --json runs.json           the table and figure of docs/rl.md
    python examples/ppo_truncation.py --lags 16 --lengths 8 16 --seeds 1
    python examples/ppo_truncation.py --replot runs.json [figure.png]   the figure again

The task is examples/ppo_recurrent.py's recall of lag D: a cue at an episode's first step, asked
for at its last, step D - 1 (+1 for naming it, -1 otherwise; a memoryless policy scores 0). The
agent is that file's PPO, unchanged, trained through rl.Segments of length L: each episode is cut
into segments of L steps counted from its first step, each segment starts from the state the
collector stored, and no gradient crosses a segment's start. With L >= D the cue and the question
share a segment, and the gradient from the answer reaches the step that saw the cue. With L < D
it never does: the cue can be used only as far as the network keeps it without being taught to.
Every run has the example's budget and stopping rule (--total-steps; 10 greedy episodes every 2
updates reaching 0.9 stop it; then 100 fresh episodes must reach 0.9 too). L >= D all give the
same segments (an episode is exactly D steps), so only L = D is run for them.
--refresh-states adds, for the largest D and the largest L < D, the runs whose segments start from
states recomputed with the current parameters (rl.states): exact values, the same cut gradient.

Prints one line per run as it ends, then a Markdown table; the figure (--plot) shows, for each
D and L, how many runs have solved the task by each number of environment steps.
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
    records = []
    for (D, L, refresh, seed), res in runs.items():
        records.append({"D": D, "L": L, "refresh": refresh, "seed": seed})
        records[-1] |= {k: res[k] for k in ("hist", "steps", "ok", "s")}
        records[-1]["final"] = res["final"].tolist()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh)
    if args.plot:
        plot(records, args.plot, args.total_steps)
    return 0


def plot(records: list[dict], path: str, budget: int) -> None:
    """For each D, the runs of each L that have solved the task by each number of env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lags = sorted({r["D"] for r in records})
    fig, axes = plt.subplots(1, len(lags), figsize=(5 * len(lags), 4.6), squeeze=False)
    for ax, D in zip(axes[0], lags, strict=True):
        cells = sorted({(r["L"], r["refresh"]) for r in records if r["D"] == D})
        colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(cells)))
        for (L, refresh), color in zip(cells, colors, strict=True):
            rs = [r for r in records if (r["D"], r["L"], r["refresh"]) == (D, L, refresh)]
            done = sorted(r["steps"] for r in rs if r["ok"])
            x = [0, *[v for v in done for _ in (0, 1)], budget]
            y = [0, *[n + d for n in range(len(done)) for d in (0, 1)], len(done)]
            label = f"L = {L}" + (" (and any L >= D)" if L >= D else "")
            label += ", refreshed states" if refresh else ""
            ax.plot(x, y, color=color, ls="--" if refresh else "-", lw=1.8, label=label)
        ax.set_title(f"recall of lag D = {D}: {len(rs)} seeds per L", fontsize=10)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("runs solved (100 greedy episodes >= 0.9)")
        ax.set_yticks(range(len(rs) + 1))
        ax.set_xlim(0, budget)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.suptitle("recurrent PPO with a GRU, BPTT length L (rl.Segments' length)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(argv: list[str]) -> int:
    """python examples/ppo_truncation.py --replot RUNS.json [PLOT.png]: the figure again."""
    with open(argv[0]) as fh:
        records = json.load(fh)
    plot(records, argv[1] if len(argv) > 1 else FIGURE, max(r["steps"] for r in records))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--replot"]:
        raise SystemExit(replot(sys.argv[2:]))
    raise SystemExit(main())
