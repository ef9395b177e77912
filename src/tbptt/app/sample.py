"""`tbptt sample`: generate text from a character model trained by `tbptt train`.

The run directory's config.toml and vocab.json rebuild the engine (engines.py), its latest
checkpoint restores the parameters (rundir.py), and `generate` reads the priming text, then draws
each next character from softmax(z / temperature) and feeds it back.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import NoReturn

import numpy as np

from ..errors import InputError
from . import config as cf
from . import rundir
from .data import Problem, one_hot
from .engines import Engine, make_engine


def generate(
    engine: Engine, vocab: str, prime: str, length: int, temperature: float, seed: int
) -> str:
    """Text from the model: run the priming text, then draw each next character from
    softmax(z / temperature) and feed it back."""
    index = {c: i for i, c in enumerate(vocab)}
    start = prime or ("\n" if "\n" in index else vocab[0])
    for c in start:
        if c not in index:
            raise InputError(f"--prime holds {c!r}, which is not in the model's vocabulary")
    rng = np.random.default_rng(seed)
    V = len(vocab)
    z, h = engine.run(one_hot(np.array([[index[c]] for c in start]), V))  # (L, 1) ids
    out = []
    for _ in range(length):
        zl = engine.logits(z)[-1, 0] / temperature  # (V,) the last step's logits
        p = np.exp(zl - zl.max())
        i = int(rng.choice(V, p=p / p.sum()))
        out.append(vocab[i])
        z, h = engine.run(one_hot(np.array([[i]]), V), h)  # one step, one stream
    return prime + "".join(out)


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Generate text from a character model trained by `tbptt train`.\n\n"
        "example:\n  tbptt sample runs/RUN --prime 'ROMEO:' --temperature 0.7"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run_dir", metavar="RUNDIR", help="a run directory of `tbptt train`")
    parser.add_argument(
        "--length", type=int, default=500, help="characters to generate (default: 500)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="divides the logits: below 1 more conservative, above 1 more varied (default: 0.8)",
    )
    parser.add_argument(
        "--prime",
        default="",
        help="text the model reads first; the sample continues it (default: a new line)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")


def run_sample(args: argparse.Namespace) -> int:
    run = Path(args.run_dir)
    if not os.path.lexists(run / "config.toml"):
        raise InputError(f"{run} is not a tbptt run directory (no config.toml)")
    if args.length < 0:
        raise InputError(f"--length must be an integer >= 0, got {args.length}")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise InputError(f"--temperature must be a positive number, got {args.temperature}")
    if args.seed < 0:
        raise InputError(f"--seed must be an integer >= 0, got {args.seed}")
    cfg = cf.check(cf.Config(**cf.read_toml(run / "config.toml", where="", machine=True)))
    settings = rundir.recorded_settings(run)
    cf.check_recorded(cfg, settings, run / "config.toml", run / "checkpoint.json")
    if not cfg.text:
        raise InputError(f"{run} was trained on --task {cfg.task}; sample needs a character model")
    vocab = rundir.read_vocab(run)
    problem = Problem(len(vocab), len(vocab), "cross_entropy", no_data, no_data, vocab, "nats/char")
    engine = make_engine(cfg, problem)
    rundir.load_checkpoint(run, engine, cfg.k1, adapt=cfg.adapt_k2 is not None)
    print(generate(engine, vocab, args.prime, args.length, args.temperature, args.seed))
    return 0


def no_data(*args: object) -> NoReturn:
    """The data of a Problem that only samples: there is none."""
    raise RuntimeError("sampling reads no training or validation data")
