"""`tbptt train`: train a recurrent network with TBPTT(k1, k2) on text, numbers or a task.

One readable loop. Every k1 steps of the `batch` streams the engine (tbptt/engines.py: numpy or
torch) backpropagates over the last k2 steps and updates the parameters (SEMANTICS.md 4-5); the
carried state is never reset except where a stream starts over. Validation runs every
--eval-every updates, a checkpoint is written every --checkpoint-every updates and at the end, and
Ctrl-C stops after the current update with a checkpoint. A text run ends with a sample drawn as
`tbptt sample` draws it (tbptt/sample.py). The run directory holds:

    config.toml        the resolved configuration (tbptt train --config reads it back)
    vocab.json         the characters of a text task, in id order
    metrics.csv        updates, steps, characters, seconds, lr, training and validation loss
    loss.png           training and validation loss against the characters (steps) seen
    checkpoint.json    which state file is the latest, with the loop's counters
    state-N.npz|.pt    the engine's full state after N updates (parameters, optimizer, carried
                       state, kept steps): `--resume` continues exactly where the run stopped

Every file is written to a temporary name and renamed, so none is ever half-written.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import config as cf
from .data import Problem, load_problem
from .engines import NumpyEngine, make_engine
from .schedule import Truncation

VALID_LIMIT = 1 << 16  # targets of the intermediate validations; the final one reads all of it
FORMAT = "tbptt-train-checkpoint"
COLUMNS = ("updates", "steps", "chars", "seconds", "lr", "train_loss", "valid_loss", "k2")


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a file under a temporary name in the same folder, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's files are private; these are ordinary
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# -- validation, checkpoints, metrics, plot -------------------------------------------------------
def evaluate(engine, problem: Problem, limit: int | None = None) -> float:
    """Mean validation loss per target, the streams read from the zero state."""
    total = count = 0.0
    h = None
    for x, y, mask, reset in problem.valid(limit):
        if reset is not None:  # a task's sequences side by side: one chunk, resets inside
            z, h = (
                engine.run(x, None, reset)
                if isinstance(engine, NumpyEngine)
                else _each(engine, x, reset)
            )
        else:
            z, h = engine.run(x, h)
        total += float(engine.losses(z, y, mask).sum())
        count += y.shape[0] * y.shape[1] if mask is None else float(mask.sum())
    return total / max(count, 1.0)


def _each(engine, x, reset):
    """Torch: run the aligned validation sequences from the zero state where each one starts."""
    first = reset.argmax(axis=0)  # (count,) first real step per column
    outs = [engine.run(x[first[j] :, j : j + 1])[0] for j in range(x.shape[1])]
    T, p = x.shape[0], outs[0].shape[-1]
    z = engine.torch.zeros(T, x.shape[1], p, dtype=outs[0].dtype, device=outs[0].device)
    for j, o in enumerate(outs):
        z[first[j] :, j] = o[:, 0]
    return z, None


def write_metrics(run: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run / "metrics.csv", buf.getvalue())


def plot(run: Path, rows: list[dict], cfg: cf.Config, unit: str) -> None:
    """loss.png: training and validation loss against the characters (steps x streams) seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for key, label in (("train_loss", "training"), ("valid_loss", "validation")):
        pts = [(float(r["chars"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if pts:
            ax.plot(
                *zip(*pts, strict=True), marker="o" if key == "valid_loss" else None, label=label
            )
    ax.set_xlabel("characters seen" if cfg.text else "steps seen (steps x streams)")
    ax.set_ylabel(unit)
    ax.set_title(f"{cfg.task}: {cfg.engine} {cfg.cell} {cfg.hidden}, k1={cfg.k1} k2={cfg.k2}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to label before the first record
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write(run / "loss.png", buf.getvalue())


def save_checkpoint(run: Path, engine, loop: dict) -> None:
    """The engine's state under a new name, then checkpoint.json pointing at it, then cleanup."""
    if engine.rank != 0:  # torchrun: the others send their streams' state to rank 0, who writes
        engine.save(None)
        return
    name = f"state-{loop['updates']:08d}.{engine.suffix}"
    fd, tmp = tempfile.mkstemp(dir=run, prefix=".tmp-", suffix="." + engine.suffix)
    os.close(fd)
    try:
        engine.save(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, run / name)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    atomic_write(run / "checkpoint.json", json.dumps({"format": FORMAT, "version": 1,
        "engine": engine.suffix, "state": name, **loop}, indent=1) + "\n")  # fmt: skip
    for old in run.glob("state-*"):
        if old.name != name:
            old.unlink()


def load_checkpoint(run: Path, engine, adapt: bool = False) -> dict:
    """Restore the engine from the run's latest checkpoint; one-line errors when it is unusable."""
    path = run / "checkpoint.json"
    if not path.is_file():
        raise ValueError(f"{run} is not a tbptt run directory (it has no checkpoint.json)")
    try:
        loop = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is corrupted ({exc})") from None
    if not isinstance(loop, dict) or loop.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tbptt train checkpoint")
    if loop.get("engine") != engine.suffix:
        raise ValueError(f"{path} is from the {loop.get('engine')} engine, not {engine.suffix}")
    try:
        state = run / Path(loop["state"]).name
        int(loop["updates"]), float(loop["seconds"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is corrupted ({type(exc).__name__}: {exc})") from None
    if adapt and "k2" in loop:  # --adapt-k2: the k2 in force at the save
        engine.set_k2(int(loop["k2"]))
    try:
        engine.load(state)
    except Exception as exc:  # a truncated zip, a foreign pickle, missing or mis-shaped arrays
        raise ValueError(f"checkpoint {state} is corrupted or not from this run: {exc}") from None
    return loop


# -- training -------------------------------------------------------------------------------------
TRAIN_HELP = """\
Train a recurrent network with TBPTT(k1, k2): every k1 steps, backpropagate over the last k2 steps.

With no arguments this is the demo: the seed's Elman network (numpy engine, tanh, softmax output)
learns Shakespeare's plays character by character for two minutes, then prints the validation loss
in nats and bits per character and a generated sample. The run directory (--run-dir) gets the
configuration, the vocabulary, metrics.csv, loss.png and checkpoints.

examples:
  tbptt train                                             # the two-minute demo
  tbptt train --engine torch --cell lstm                  # an LSTM on the same data
  tbptt train --data input.txt --k1 16 --k2 64 --max-updates 5000
  tbptt train --data series.npy --hidden 64               # regression, L2 loss
  tbptt train --task copy --length 50 --engine torch --cell lstm
  tbptt train --config run.toml --lr 1e-3                 # flags override the file
  tbptt train --resume runs/RUN --time-budget 600         # go on for 10 minutes in all
  tbptt sample runs/RUN --prime 'ROMEO:'

Every setting below is also a key of the TOML file given with --config (the flag's name without
the dashes, e.g. time_budget = 300); each run directory's config.toml is such a file.
"""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = TRAIN_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", metavar="TOML", help="read settings from this TOML file")
    parser.add_argument("--resume", metavar="RUNDIR", help="continue the run in RUNDIR exactly "
                        "where it stopped; only the budget and reporting flags may change")  # fmt: skip
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: when stderr is a terminal)")  # fmt: skip
    cf.add_config_arguments(parser)


def _open_run(args: argparse.Namespace, cfg: cf.Config | None):
    """Configuration, data, engine and run directory, all checked before anything is written."""
    if args.resume:
        if args.config:
            raise ValueError("--config and --resume exclude each other: a run keeps its config")
        run = Path(args.resume)
        if not (run / "config.toml").is_file():
            raise ValueError(f"--resume {run}: not a tbptt run directory (no config.toml)")
        saved = cf.read_toml(run / "config.toml")
        cfg = cf.from_args(args, saved={**saved, "run_dir": str(run)})
        vocab = json.loads((run / "vocab.json").read_text()) if cfg.text else None
        problem = load_problem(cfg, "".join(vocab) if vocab else None)
        engine = make_engine(cfg, problem)
        if (run / "checkpoint.json").is_file() or any(run.glob("state-*")):
            loop = load_checkpoint(run, engine, adapt=cfg.adapt_k2 is not None)
        else:  # stopped before its first checkpoint (killed, out of memory): nothing to continue
            loop = {"updates": 0, "seconds": 0.0}
            if engine.rank == 0:
                print(f"{run} has no checkpoint yet: its run starts from the beginning")
        rows = []
        if (run / "metrics.csv").is_file():
            with open(run / "metrics.csv", newline="") as fh:
                rows = [{**r, "updates": int(r["updates"])} for r in csv.DictReader(fh)]
            rows = [r for r in rows if r["updates"] <= loop["updates"]]
        if engine.rank == 0:  # torchrun: rank 0 alone writes
            atomic_write(run / "config.toml", cf.write_toml(cfg))  # a budget may have changed
        return cfg, problem, engine, run, loop, rows
    run = Path(cfg.run_dir)
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise ValueError(f"--run-dir {run} already holds files; continue that run with --resume "
                         f"{run}, or choose another --run-dir")  # fmt: skip
    problem = load_problem(cfg)
    engine = make_engine(cfg, problem)
    if engine.rank != 0:  # torchrun: rank 0 alone writes the run directory
        return cfg, problem, engine, run, {"updates": 0, "seconds": 0.0}, []
    run.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run.parent, prefix=f".tmp-{run.name}-"))
    try:
        (tmp / "config.toml").write_text(cf.write_toml(cfg))
        if problem.vocab is not None:
            (tmp / "vocab.json").write_text(json.dumps(list(problem.vocab)) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, run)  # the run directory appears whole (an empty one is replaced)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg, problem, engine, run, {"updates": 0, "seconds": 0.0}, []


def lr_at(cfg: cf.Config, updates: int, seconds: float) -> float:
    """Cosine decay from --lr to 0 over --max-updates when given (exactly repeatable), else over
    --time-budget; constant with --lr-decay none."""
    if cfg.lr_decay == "none":
        return cfg.lr
    frac = updates / cfg.max_updates if cfg.max_updates else seconds / cfg.time_budget
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def run_influence(cfg: cf.Config) -> int:
    """Influence balancing (Tallec and Ollivier 2017, tbptt/influence.py): one parameter theta,
    trained online with SGD; a truncation shorter than 41 steps pushes it the wrong way."""
    from . import influence

    run = Path(cfg.run_dir)
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise ValueError(f"--run-dir {run} already holds files; choose another --run-dir")
    trunc = Truncation(cfg.k1, cfg.k2, inject=cfg.inject, flush=cfg.flush)
    result = influence.train(trunc, cfg.max_updates * cfg.k1, lr=cfg.lr)
    loss = result.loss.reshape(cfg.max_updates, cfg.k1).mean(axis=1)  # (updates,) per update
    buf = io.StringIO()
    buf.write("updates,steps,theta,loss\n")
    for u in range(1, cfg.max_updates + 1):
        buf.write(f"{u},{u * cfg.k1},{result.theta[u * cfg.k1]:.8g},{loss[u - 1]:.6g}\n")
    run.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run.parent, prefix=f".tmp-{run.name}-"))
    try:
        (tmp / "config.toml").write_text(cf.write_toml(cfg))
        (tmp / "metrics.csv").write_text(buf.getvalue())
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, run)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    best, sigma = influence.optimum(), influence.sensitivities(cfg.k2)[cfg.k2]
    print(f"influence balancing: theta {result.theta[0]:g} -> {result.final:.6g} after "
          f"{cfg.max_updates * cfg.k1} steps; the optimum is {best:.6g}; run directory {run}")  # fmt: skip
    wrong = np.sign(sigma) != np.sign(1 / best)
    print(f"the truncated sensitivity sigma_k2 = {sigma:.4g} has the "
          f"{'wrong' if wrong else 'right'} sign (k2 = {cfg.k2}; 41 steps or more are needed)")  # fmt: skip
    return 0


def run_train(args: argparse.Namespace) -> int:
    cfg = None if args.resume else cf.from_args(args)
    if cfg is not None and cfg.task == "influence":
        return run_influence(cfg)
    cfg, problem, engine, run, loop, rows = _open_run(args, cfg)
    per_update = cfg.k1 * cfg.batch  # characters (steps x streams) per update
    updates, seconds = loop["updates"], float(loop["seconds"])
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    progress = progress and engine.rank == 0  # torchrun: rank 0 alone reports

    def done() -> bool:
        return (cfg.max_updates is not None and updates >= cfg.max_updates) or (
            cfg.time_budget is not None and seconds >= cfg.time_budget)  # fmt: skip

    def record(train_loss: float | None, valid_loss: float | None, lr: float) -> None:
        rows.append({"updates": updates, "steps": updates * cfg.k1, "chars": updates * per_update,
                     "seconds": round(seconds, 3), "lr": f"{lr:.6g}",
                     "train_loss": "" if train_loss is None else f"{train_loss:.5f}",
                     "valid_loss": "" if valid_loss is None else f"{valid_loss:.5f}",
                     "k2": getattr(engine, "k2", cfg.k2)})  # fmt: skip

    def checkpoint() -> None:
        save_checkpoint(run, engine, {"updates": updates, "seconds": seconds,
                                      "k2": getattr(engine, "k2", cfg.k2)})  # fmt: skip
        if engine.rank == 0:  # torchrun: rank 0 alone writes
            write_metrics(run, rows)
            plot(run, rows, cfg, problem.unit)

    stop = []
    previous = signal.signal(signal.SIGINT, lambda *_: stop.append(1) if not stop else _raise())
    from tqdm import tqdm

    bar = tqdm(total=100, disable=not progress, bar_format="{percentage:3.0f}%|{bar:20}| "
               "{elapsed}<{remaining}{postfix}", leave=False)  # fmt: skip
    window, lr = [], cfg.lr
    try:
        while not done() and not stop:
            start = time.perf_counter()
            lr = lr_at(cfg, updates, seconds)
            engine.set_lr(lr)
            window.append(engine.feed(*problem.train(updates * cfg.k1, cfg.k1)))  # one update
            updates += 1
            if cfg.adapt_k2 is not None and updates % cfg.adapt_every == 0:
                adapt_k2(engine, problem, cfg, updates)
            seconds += time.perf_counter() - start
            if engine.launch is not None:  # torchrun: the same budget and stop on every process
                seconds, asked = engine.launch.agree(seconds, bool(stop))
                if asked and not stop:
                    stop.append(1)
            if updates % 100 == 0 or updates % cfg.eval_every == 0 or done() or stop:
                train_loss = float(np.mean(window))
                window = []
                valid = (
                    evaluate(engine, problem, VALID_LIMIT)
                    if updates % cfg.eval_every == 0
                    else None
                )
                record(train_loss, valid, lr)
                frac = max(updates / cfg.max_updates if cfg.max_updates else 0,
                           seconds / cfg.time_budget if cfg.time_budget else 0)  # fmt: skip
                bar.n = round(100 * min(frac, 1.0), 1)
                bar.set_postfix_str(f"loss {train_loss:.3f}, {updates * cfg.k1 / seconds:.0f} "
                                    f"steps/s, {updates * per_update / seconds:,.0f} chars/s")  # fmt: skip
            if updates % cfg.checkpoint_every == 0:
                checkpoint()
    except FloatingPointError as exc:  # tbptt.NonFiniteError: the last checkpoint stays as it was
        raise ValueError(f"training diverged: {exc}; try a smaller --lr or a --clip") from None
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
    if stop:
        checkpoint()
        if engine.rank == 0:
            print(f"interrupted after {updates} updates; checkpoint saved. Continue with: "
                  f"tbptt train --resume {run}", file=sys.stderr)  # fmt: skip
        return 130
    valid = evaluate(engine, problem)  # all of the validation data
    if rows and rows[-1]["updates"] == updates:
        rows[-1]["valid_loss"] = f"{valid:.5f}"
    else:
        record(None, valid, lr)
    checkpoint()
    if engine.rank != 0:  # torchrun: rank 0 alone reports
        return 0
    chars = updates * per_update
    what = "characters" if cfg.text else "steps"
    print(f"trained {updates:,} updates, {chars:,} {what} in {seconds:.{0 if seconds >= 10 else 1}f} s "
          f"({chars / max(seconds, 1e-9):,.0f} {what}/s); run directory {run}")  # fmt: skip
    if cfg.text:
        from .sample import generate  # sample.py imports this module

        print(f"validation: {valid:.2f} nats/char ({valid / math.log(2):.2f} bits/char)")
        print("sample:\n" + generate(engine, problem.vocab, "", 400, 0.8, cfg.seed))
    else:
        print(f"validation: {valid:.4f} {problem.unit}")
    return 0


def adapt_k2(engine, problem: Problem, cfg: cf.Config, updates: int) -> None:
    """--adapt-k2: re-estimate k2 on the last 2 x adapt_max steps of (at most 8 of) the streams."""
    steps = 2 * cfg.adapt_max
    if updates * cfg.k1 < steps:
        return  # not enough of the stream seen yet
    x, y, mask, reset = problem.train(updates * cfg.k1 - steps, steps)
    few = slice(0, 8)  # the lag profile is a mean over t and streams: a few streams suffice
    pick = lambda a: None if a is None else a[:, few]  # noqa: E731
    k2 = engine.suggest_k2(pick(x), pick(y), pick(mask), pick(reset), cfg.adapt_k2, cfg.adapt_max)
    engine.set_k2(k2)


def _raise():
    raise KeyboardInterrupt  # a second Ctrl-C: stop at once, no checkpoint
