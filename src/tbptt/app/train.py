"""`tbptt train`: train a recurrent network with TBPTT(k1, k2) on text, numbers or a task.

One readable loop. Every k1 steps of the `batch` streams the engine (engines.py: numpy or torch)
backpropagates over the last k2 steps and updates the parameters (SEMANTICS.md 4-5); the carried
state is never reset except where a stream starts over. Validation runs every --eval-every
updates, a checkpoint is written every --checkpoint-every updates and at the end (rundir.py), and
Ctrl-C stops after the current update with a checkpoint. A text run ends with a sample drawn as
`tbptt sample` draws it (sample.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from ..errors import InputError, NonFiniteError
from ..files import atomic_write
from . import config as cf
from . import plots, rundir
from .data import Problem, load_problem
from .engines import AdaptsK2, Engine, make_engine, memory_needed
from .rundir import Loop
from .sample import generate

VALID_LIMIT = 1 << 16  # targets of the intermediate validations; the final one reads all of it
PLOT_EVERY = 30.0  # seconds between redrawings of loss.png (and one at the end)


@dataclass
class Run:
    """A run being trained: its settings, data, engine, directory and progress."""

    cfg: cf.Config
    problem: Problem
    engine: Engine
    path: Path
    loop: Loop
    rows: list[dict]  # metrics.csv's rows
    lock: rundir.Lock | None  # held by rank 0
    new: bool  # created by this process: removed again if it fails before its first checkpoint
    saved: bool = False  # a checkpoint was written by this process
    plotted: float = field(default_factory=time.perf_counter)

    @property
    def writer(self) -> bool:
        """Under torchrun rank 0 alone writes and reports."""
        return self.engine.rank == 0


# -- the loop --------------------------------------------------------------------------------------
def run_train(args: argparse.Namespace) -> int:
    run = open_run(args)
    try:
        return train(run, show_progress(args) and run.writer)
    except NonFiniteError as exc:  # the last checkpoint stays as it was
        failed(run)
        raise InputError(f"training diverged: {exc}; try a smaller --lr or a --clip") from None
    except BaseException:
        failed(run)
        raise
    finally:
        if run.lock is not None:
            run.lock.release()


def failed(run: Run) -> None:
    """A run that fails before its first checkpoint leaves no directory behind."""
    if run.lock is not None and run.new and not run.saved:
        rundir.discard(run.path)


def train(run: Run, progress: bool) -> int:
    cfg, engine, problem, loop = run.cfg, run.engine, run.problem, run.loop
    losses: list[float] = []  # training losses since the last record
    lr = cfg.lr
    assert lr is not None  # config.check resolved it
    if done(cfg, loop):  # a resumed run that has used its budget
        if run.writer:
            print(
                f"{run.path} has already trained {loop.updates:,} updates in {loop.seconds:.0f} s, "
                "its whole budget: nothing to do (raise --max-updates or --time-budget to go on)",
                file=sys.stderr,
            )
        return 0
    if run.writer:
        assert cfg.threads is not None  # config.check resolved it
        many = "s" if cfg.threads != 1 else ""
        print(
            f"training with {cfg.threads} CPU thread{many} for the {cfg.engine} engine's matrix "
            "products (--threads N to choose; --resume keeps the run's)",
            flush=True,
        )
    if run.writer and run.problem.note:
        print(run.problem.note, flush=True)
    if run.writer and not plots.available():
        print("loss.png is not drawn: matplotlib is missing (pip install 'tbptt[plot]')")
    with Interrupt() as interrupt, Progress(cfg, progress) as bar:
        while not done(cfg, loop) and not interrupt.asked:
            start = time.perf_counter()
            lr = lr_at(cfg, loop.updates, loop.seconds)
            engine.set_lr(lr)
            losses.append(engine.train(*problem.train(loop.updates * cfg.k1, cfg.k1)))  # 1 update
            loop.updates += 1
            if cfg.adapt_k2 is not None and loop.updates % cfg.adapt_every == 0:
                adapt_k2(cast(AdaptsK2, engine), problem, cfg, loop)  # config: numpy only
            loop.seconds += time.perf_counter() - start
            loop.seconds, stop = engine.agree(loop.seconds, interrupt.asked)
            interrupt.asked = interrupt.asked or stop  # torchrun: all stop together
            if loop.updates % 100 == 0 or loop.updates % cfg.eval_every == 0 or done(cfg, loop):
                valid = validate(engine, problem, VALID_LIMIT) if due_eval(cfg, loop) else None
                record(run, float(np.mean(losses)), valid, lr)
                losses = []
                bar.show(cfg, loop, run.rows[-1])
            if loop.updates % cfg.checkpoint_every == 0:
                checkpoint(run)
    if interrupt.asked:
        if losses:
            record(run, float(np.mean(losses)), None, lr)
        checkpoint(run, final=True)
        if run.writer:
            print(
                f"interrupted after {loop.updates} updates; checkpoint saved. Continue with: "
                f"tbptt train --resume {run.path}",
                file=sys.stderr,
            )
        return 130
    finish(run, lr)
    return 0


def done(cfg: cf.Config, loop: Loop) -> bool:
    over = cfg.max_updates is not None and loop.updates >= cfg.max_updates
    return over or (cfg.time_budget is not None and loop.seconds >= cfg.time_budget)


def due_eval(cfg: cf.Config, loop: Loop) -> bool:
    return loop.updates % cfg.eval_every == 0


def lr_at(cfg: cf.Config, updates: int, seconds: float) -> float:
    """Cosine decay from --lr to 0 over --max-updates when given (exactly repeatable), else over
    --time-budget; constant with --lr-decay none."""
    assert cfg.lr is not None  # config.check resolved it
    if cfg.lr_decay == "none":
        return cfg.lr
    budget = cfg.time_budget or math.inf  # check() sets one of max_updates, time_budget
    frac = updates / cfg.max_updates if cfg.max_updates else seconds / budget
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def adapt_k2(engine: AdaptsK2, problem: Problem, cfg: cf.Config, loop: Loop) -> None:
    """--adapt-k2: re-estimate k2 on the last 2 x adapt_max steps of (at most 8 of) the streams."""
    steps = 2 * cfg.adapt_max
    if loop.updates * cfg.k1 < steps:
        return  # not enough of the stream seen yet
    x, y, mask, reset = problem.train(loop.updates * cfg.k1 - steps, steps)
    few = slice(0, 8)  # the lag profile is a mean over t and streams: a few streams suffice
    pick = lambda a: None if a is None else a[:, few]  # noqa: E731
    x, y, mask, reset = (pick(a) for a in (x, y, mask, reset))
    assert cfg.adapt_k2 is not None  # the caller's condition
    loop.k2 = engine.adapt_k2(x, y, mask, reset, cfg.adapt_k2, cfg.adapt_max)


def validate(engine: Engine, problem: Problem, limit: int | None = None) -> float:
    """Mean validation loss per target, the streams read from the zero state."""
    total = count = 0.0
    h = None
    for x, y, mask, reset in problem.valid(limit):
        z, h = engine.run(x, h, reset)
        total += float(engine.losses(z, y, mask).sum())
        count += y.shape[0] * y.shape[1] if mask is None else float(mask.sum())
    return total / max(count, 1.0)


def record(run: Run, train_loss: float | None, valid_loss: float | None, lr: float) -> None:
    """One row of metrics.csv."""
    cfg, loop = run.cfg, run.loop
    assert cfg.batch is not None  # config.check resolved it
    run.rows.append(
        {
            "updates": loop.updates,
            "steps": loop.updates * cfg.k1,
            "chars": loop.updates * cfg.k1 * cfg.batch,
            "seconds": round(loop.seconds, 3),
            "lr": f"{lr:.6g}",
            "train_loss": "" if train_loss is None else f"{train_loss:.5f}",
            "valid_loss": "" if valid_loss is None else f"{valid_loss:.5f}",
            "k2": "" if run.engine.k2 is None else run.engine.k2,
        }
    )


def checkpoint(run: Run, final: bool = False) -> None:
    """rundir.save_checkpoint, and loss.png at the end or every PLOT_EVERY seconds."""
    run.loop.k2 = run.engine.k2
    rundir.save_checkpoint(run.path, run.engine, run.loop, run.rows, cf.recorded(run.cfg))
    run.saved = True
    due = final or time.perf_counter() - run.plotted >= PLOT_EVERY
    if run.writer and due and plots.available():
        cfg = run.cfg
        title = f"{cfg.task}: {cfg.engine} {cfg.cell} {cfg.hidden}, k1={cfg.k1} k2={cfg.k2}"
        xlabel = "characters seen" if cfg.text else "steps seen (steps x streams)"
        png = plots.loss_curve(run.rows, title, xlabel, run.problem.unit)
        atomic_write(run.path / "loss.png", png)
        run.plotted = time.perf_counter()


def finish(run: Run, lr: float) -> None:
    """The final validation on all of the validation data, a checkpoint, the report, a sample."""
    cfg, loop = run.cfg, run.loop
    valid = validate(run.engine, run.problem)
    if run.rows and run.rows[-1]["updates"] == loop.updates:
        run.rows[-1]["valid_loss"] = f"{valid:.5f}"
    else:
        record(run, None, valid, lr)
    checkpoint(run, final=True)
    if not run.writer:
        return
    assert cfg.batch is not None  # config.check resolved it
    count = loop.updates * cfg.k1 * cfg.batch
    what = "characters" if cfg.text else "steps"
    secs = f"{loop.seconds:.{0 if loop.seconds >= 10 else 1}f}"
    rate = count / max(loop.seconds, 1e-9)
    print(
        f"trained {loop.updates:,} updates, {count:,} {what} in {secs} s ({rate:,.0f} {what}/s); "
        f"run directory {run.path}"
    )
    if cfg.text:
        print(f"validation: {valid:.2f} nats/char ({valid / math.log(2):.2f} bits/char)")
        vocab = run.problem.vocab or ""
        print("sample:\n" + generate(run.engine, vocab, "", 400, 0.8, cfg.seed))
    else:
        beside = f"; {run.problem.baseline}" if run.problem.baseline else ""
        if run.problem.note:
            beside += " (large because of the data's scale: see the note above)"
        print(f"validation: {valid:.4f} {run.problem.unit}{beside}")
    print(next_steps(run))


def next_steps(run: Run) -> str:
    """The last lines: where the loss curve is, and the exact commands to sample and to go on
    (twice the budget: the budgets count the whole run)."""
    cfg, here = run.cfg, shlex.quote(str(run.path))
    lines = []
    if plots.available():
        lines.append(f"loss curve: {run.path / 'loss.png'}")
    if cfg.text:
        lines.append(f"sample more: tbptt sample {here} --length 500")
    if cfg.max_updates is not None:
        budget = f"--max-updates {2 * cfg.max_updates}"
    else:
        assert cfg.time_budget is not None  # config.check sets one of the two
        budget = f"--time-budget {2 * cfg.time_budget:g}"
    lines.append(f"train on: tbptt train --resume {here} {budget}")
    return "\n".join(lines)


# -- interrupts and progress -----------------------------------------------------------------------
class Interrupt:
    """Ctrl-C asks the loop to stop after the current update (and checkpoint); a second one
    stops at once."""

    def __init__(self) -> None:
        self.asked = False

    def _handle(self, *_: object) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def __enter__(self) -> Interrupt:
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self.previous)


def show_progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress


class Progress:
    """A progress bar on stderr (tqdm) over the budget: updates or seconds, whichever is nearer."""

    def __init__(self, cfg: cf.Config, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            from tqdm import tqdm

            fmt = "{percentage:3.0f}%|{bar:20}| {elapsed}<{remaining}{postfix}"
            self.bar = tqdm(total=100, bar_format=fmt, leave=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.close()

    def show(self, cfg: cf.Config, loop: Loop, row: dict) -> None:
        if not self.enabled:
            return
        by_updates = loop.updates / cfg.max_updates if cfg.max_updates else 0.0
        by_time = loop.seconds / cfg.time_budget if cfg.time_budget else 0.0
        self.bar.n = round(100 * min(max(by_updates, by_time), 1.0), 1)
        steps = loop.updates * cfg.k1 / max(loop.seconds, 1e-9)
        assert cfg.batch is not None  # config.check resolved it
        what = "chars" if cfg.text else "steps x streams"
        self.bar.set_postfix_str(
            f"loss {row['train_loss']}, {steps:.0f} steps/s, {steps * cfg.batch:,.0f} {what}/s"
        )


# -- opening a run ---------------------------------------------------------------------------------
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
    parser.add_argument(
        "--resume",
        metavar="RUNDIR",
        help="continue the run in RUNDIR exactly where it stopped; only the budget and "
        "reporting flags may change",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    cf.add_config_arguments(parser)


def open_run(args: argparse.Namespace) -> Run:
    """Configuration, data, engine and run directory, all checked before anything is written."""
    if args.resume:
        return _resume(args)
    cfg = cf.from_args(args)
    path = Path(cfg.run_dir) if cfg.run_dir else cf.default_run_dir(cfg)
    if cfg.run_dir:  # a default name taken already gets -2, -3, ... (rundir.create)
        rundir.check_new(path)
    check_memory(cfg)
    problem = load_problem(cfg)
    check_memory(cfg, problem)
    engine = make_engine(cfg, problem)
    if engine.rank != 0:  # torchrun: rank 0 alone writes the run directory
        return Run(cfg, problem, engine, path, Loop(k2=cfg.k2), [], None, new=True)

    def files(target: Path) -> dict[str, str]:
        out = {"config.toml": cf.write_toml(cfg, run_dir=target)}
        if problem.vocab is not None:
            out["vocab.json"] = json.dumps(list(problem.vocab)) + "\n"
        return out

    path = rundir.create(path, files, unique=cfg.run_dir is None)
    lock = rundir.Lock(path)
    return Run(cfg, problem, engine, path, Loop(k2=cfg.k2), [], lock, new=True)


def _resume(args: argparse.Namespace) -> Run:
    if args.config:
        raise InputError("--config and --resume exclude each other: a run keeps its config")
    path = Path(args.resume)
    if not os.path.lexists(path / "config.toml"):
        raise InputError(f"--resume {path}: not a tbptt run directory (no config.toml)")
    given = getattr(args, "run_dir", None)
    if given is not None and Path(given).absolute() != path.absolute():
        raise InputError(f"--run-dir {given} and --resume {path}: a resumed run stays in {path}")
    saved = cf.read_toml(path / "config.toml", where="", machine=True)
    cfg = cf.from_args(args, saved={**saved, "run_dir": str(path)})
    settings = rundir.recorded_settings(path)
    cf.check_recorded(cfg, settings, path / "config.toml", path / "checkpoint.json")
    vocab = rundir.read_vocab(path) if cfg.text else None
    check_memory(cfg)
    problem = load_problem(cfg, vocab)
    check_memory(cfg, problem)
    engine = make_engine(cfg, problem)
    lock = rundir.Lock(path) if engine.rank == 0 else None
    try:
        if engine.rank == 0:
            rundir.clean(path)
        if os.path.lexists(path / "checkpoint.json"):  # (read only if a regular file)
            loop = rundir.load_checkpoint(path, engine, cfg.k1, adapt=cfg.adapt_k2 is not None)
        else:  # stopped before its first checkpoint (killed, out of memory): nothing to continue
            loop = Loop(k2=cfg.k2)
            if engine.rank == 0:
                print(
                    f"{path} has no checkpoint yet{rundir.leftovers(path)}: its run starts from "
                    "the beginning"
                )
        rows = rundir.read_metrics(path, loop.updates)
        if engine.rank == 0:  # a budget may have changed
            atomic_write(path / "config.toml", cf.write_toml(cfg, run_dir=path))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Run(cfg, problem, engine, path, loop, rows, lock, new=False)


def check_memory(cfg: cf.Config, problem: Problem | None = None) -> None:
    """Refuse sizes that cannot fit before anything is allocated: a one-line error with the
    estimate instead of a MemoryError traceback or a kill by the kernel. Called before the data
    is read (with one input and output, a lower bound) and again with the data's sizes."""
    need, what = memory_needed(cfg, *((problem.m, problem.p) if problem else ()))
    have = available_memory()
    if have is not None and need > have:
        raise InputError(
            f"this run needs at least {need / 2**30:.1f} GiB ({what}), more than the "
            f"{have / 2**30:.1f} GiB of memory available; lower --batch, --hidden, --k1, --k2 "
            "or --length"
        )


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
