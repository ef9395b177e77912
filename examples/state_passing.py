"""State passing: character models trained on 128-step windows, evaluated up to 4096 steps.

    python examples/state_passing.py [--cells mingru lru lstm] [--steps 1500] [--context 128]

Buitrago Ruiz and Gu 2025 (arXiv 2507.02782): recurrent models trained from a zero initial state
on sequences of length T fail beyond T, because they never see the states that longer contexts
produce; State Passing (start each training sequence from the final state of the previous one)
fixes it. Here each model is trained twice on Shakespeare (the CLI's corpus and validation split,
tbptt.app.data.corpus_split), with the same seed, data, steps and optimizer:

    zero    every window of `context` steps starts from the zero state (fixed windows): the
            driver restarts every stream at the first step of every chunk (a reset there)
    carry   TBPTT(context, context) with tbptt.torch.TBPTT: each window starts from the state
            the previous window of the same stream ended in (State Passing)

Both see the training text as `batch` contiguous streams, one window of `context` steps per
update. Models: ScanLM("mingru") and ScanLM("lru") (token ids, 2 residual layers), and
Recurrent(nn.LSTM) on one-hot characters. Evaluation: `--eval-sequences` held-out passages of
`--eval-length` characters, each read from the zero state in one call, the cross-entropy at every
position averaged over the passages. Writes a CSV (loss per position, every model and mode) and a
PNG of loss against position into docs/figures/, and prints a table of positions ranges.
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIGURES = os.path.join(HERE, "..", "docs", "figures")
RANGES = [(1, 128), (129, 512), (513, 1024), (1025, 2048), (2049, 4096)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", nargs="+", default=["mingru", "lru", "lstm"], help="models to train")
    p.add_argument("--steps", type=int, default=1500, help="updates per model and mode")
    p.add_argument("--context", type=int, default=128, help="training window (k1 = k2)")
    p.add_argument("--batch", type=int, default=32, help="streams per update")
    p.add_argument("--hidden", type=int, default=128, help="width d of every model")
    p.add_argument("--layers", type=int, default=2, help="layers of every model")
    p.add_argument("--expand", type=int, default=1, help="ScanLM's GLU width / hidden")
    p.add_argument("--r-min", type=float, default=0.0, help="LRU ring: smallest |lambda|")
    p.add_argument("--r-max", type=float, default=1.0, help="LRU ring: |lambda| below this")
    p.add_argument("--max-phase", type=float, default=6.28, help="LRU: largest phase")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--eval-length", type=int, default=4096, help="positions evaluated")
    p.add_argument("--eval-sequences", type=int, default=32, help="held-out passages")
    p.add_argument("--valid-fraction", type=float, default=0.05, help="as tbptt train's")
    p.add_argument("--seed", type=int, default=0, help="seed of every model")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)"
    )
    p.add_argument("--csv", default=os.path.join(FIGURES, "state_passing.csv"), help="CSV path")
    p.add_argument("--out", default=os.path.join(FIGURES, "state_passing.png"), help="PNG path")
    return p.parse_args(argv)


def make_model(cell: str, V: int, args):
    import torch

    from tbptt.torch import Recurrent, ScanLM

    torch.manual_seed(args.seed)  # the same initial values for both modes
    if cell == "lstm":
        return Recurrent(
            torch.nn.LSTM(V, args.hidden, args.layers), torch.nn.Linear(args.hidden, V)
        )
    ring = {"r_min": args.r_min, "r_max": args.r_max, "max_phase": args.max_phase}
    options = ring if cell == "lru" else {}
    return ScanLM(
        cell, V, args.hidden, V, num_layers=args.layers, expand=args.expand, cell_options=options
    )


def inputs(cell: str, ids, V: int):
    """Token ids (T, batch) for ScanLM, one-hot rows (T, batch, V) for the LSTM."""
    import torch

    return torch.nn.functional.one_hot(ids, V).float() if cell == "lstm" else ids


def train(cell: str, mode: str, streams: np.ndarray, V: int, args):
    """`args.steps` updates of TBPTT(context, context) on the streams (L, batch)."""
    import torch

    import tbptt
    from tbptt.torch import TBPTT, cross_entropy_loss

    model = make_model(cell, V, args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    trunc = tbptt.Truncation(args.context, args.context)
    driver = TBPTT(model, trunc, opt, cross_entropy_loss, clip=args.clip, reduction="mean")
    k, span = args.context, streams.shape[0] - 1
    windows = span // k  # whole windows per pass over the streams
    losses = []
    for i in range(args.steps):
        a = (i % windows) * k
        x = torch.from_numpy(streams[a : a + k].astype(np.int64))  # (k, batch)
        y = torch.from_numpy(streams[a + 1 : a + k + 1].astype(np.int64))
        reset = torch.zeros(k, args.batch, dtype=torch.bool)
        reset[0] = mode == "zero" or (a == 0 and i > 0)  # zero: every window; carry: each pass
        losses.append(driver.feed(inputs(cell, x, V), y, reset=reset))
    return model, float(np.mean(losses[-100:]))


def evaluate(model, cell: str, passages, V: int) -> np.ndarray:
    """Cross-entropy (nats) at every position, mean over the passages: (eval_length,)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(passages[:-1].astype(np.int64))  # (T, n)
    y = torch.from_numpy(passages[1:].astype(np.int64))
    with torch.no_grad():
        logits, _ = model(inputs(cell, x, V))  # (T, n, V), from the zero state
        l = F.cross_entropy(logits.permute(1, 2, 0), y.T, reduction="none")  # (n, T)
    return l.mean(0).double().numpy()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from tbptt.app.data import corpus_split

    torch.set_num_threads(args.threads)
    train_text, valid_text = corpus_split("shakespeare", args.valid_fraction)
    V = len(train_text.vocab)
    ids = train_text.ids()
    L = len(ids) // args.batch  # stream j is the j-th contiguous part of the text
    streams = ids[: L * args.batch].reshape(args.batch, L).T  # (L, batch) character ids
    valid = valid_text.ids()
    n, T = args.eval_sequences, args.eval_length
    starts = np.linspace(0, len(valid) - T - 1, n).astype(int)
    passages = np.stack([valid[s : s + T + 1] for s in starts], axis=1)  # (T + 1, n)
    print(
        f"Shakespeare: {len(train_text):,} training characters as {args.batch} streams, "
        f"vocabulary {V}; {args.steps} updates of {args.context} steps per model and mode; "
        f"{n} held-out passages of {T} characters"
    )
    curves, rows = {}, []
    for cell in args.cells:
        for mode in ("zero", "carry"):
            t0 = time.perf_counter()
            model, train_loss = train(cell, mode, streams, V, args)
            curves[f"{cell} {mode}"] = c = evaluate(model, cell, passages, V)
            secs = time.perf_counter() - t0
            means = [c[a - 1 : b].mean() for a, b in RANGES if b <= T]
            rows.append((cell, mode, train_loss, means, secs))
            print(
                f"{cell:6s} {mode:5s}  train {train_loss:.3f}  held-out by position: "
                + "  ".join(f"{m:.3f}" for m in means)
                + f"  ({secs:.0f} s)"
            )
    print(table(rows, T))
    write_csv(curves, args.csv)
    plot(curves, args)
    print(f"Wrote {os.path.relpath(args.csv)} and {os.path.relpath(args.out)}")


def table(rows, T: int) -> str:
    """The Markdown table docs/scan.md shows: nats/char by position range."""
    heads = [f"{a}-{b}" for a, b in RANGES if b <= T]
    out = ["| model | initial state in training | train (last 100) | " + " | ".join(heads) + " |"]
    out.append("|---|---|---|" + "---|" * len(heads))
    for cell, mode, train_loss, means, _ in rows:
        how = "zero (fixed windows)" if mode == "zero" else "carried (TBPTT)"
        vals = " | ".join(f"{m:.3f}" for m in means)
        out.append(f"| {cell} | {how} | {train_loss:.3f} | {vals} |")
    return "\n".join(out)


def write_csv(curves: dict, path: str) -> None:
    names = list(curves)
    lines = ["position," + ",".join(n.replace(" ", "_") for n in names)]
    for t in range(len(curves[names[0]])):
        lines.append(f"{t + 1}," + ",".join(f"{curves[k][t]:.5f}" for k in names))
    write(path, "\n".join(lines) + "\n")


def write(path: str, data: str | bytes) -> None:
    """The whole file or nothing (tbptt.files.atomic_write), its folder created if needed."""
    from tbptt.files import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, data)


def smooth(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means over bins of equal width in log(position): (centres, means)."""
    edges = np.unique(np.round(np.geomspace(1, len(c) + 1, 60)).astype(int))
    centres = np.sqrt(edges[:-1] * (edges[1:] - 1).clip(min=edges[:-1]))
    pairs = zip(edges[:-1], edges[1:], strict=True)
    return centres, np.array([c[a - 1 : b - 1].mean() for a, b in pairs])


def plot(curves: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"mingru": "tab:blue", "lru": "tab:green", "lstm": "tab:red"}
    for name, c in curves.items():
        cell, mode = name.split()
        x, y = smooth(c)
        label = f"{cell}, {'zero state' if mode == 'zero' else 'carried state'}"
        ax.plot(x, y, color=colors.get(cell), ls="--" if mode == "zero" else "-", label=label)
    ax.axvline(
        args.context, color="black", lw=0.8, ls=":", label=f"training context {args.context}"
    )
    ax.set_xscale("log")
    ax.set_xlabel("position in the held-out passage (characters read from the zero state)")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title(
        f"State passing: {args.steps} updates of {args.context}-step windows, evaluated to "
        f"{args.eval_length}",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write(args.out, png.getvalue())


if __name__ == "__main__":
    main()
