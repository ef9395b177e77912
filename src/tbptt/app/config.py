"""The configuration of `tbptt train`: one dataclass, read from defaults, a TOML file and flags.

Each field is a command-line flag (`hidden` is `--hidden`) and a key of the TOML file given with
`--config run.toml`; flags override the file, the file overrides the defaults below. The run
directory keeps the resolved configuration as config.toml, which `--config` reads back.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..methods import METHODS, build_rule
from .flags import as_flags

TEXT_TASKS = ("shakespeare", "stdlib", "text")
SCAN_CELLS = ("mingru", "lru")  # tbptt.torch.ScanLM's cells: linear recurrences, one scan a call
TASKS = (*TEXT_TASKS, "numbers", "adding", "copy")
# fields a resumed run may change: how long it goes on and how it reports, not what it computes
RESUMABLE = ("time_budget", "max_updates", "eval_every", "checkpoint_every", "threads")
DEMO_SECONDS = 120.0


def _f(default, help: str, choices: tuple | None = None, metavar: str | None = None):
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


@dataclass
class Config:
    """Everything a training run depends on; the defaults are the two-minute Shakespeare demo."""

    # what to learn
    task: str | None = _f(
        None,
        "what to learn: a built-in corpus (shakespeare, the Python standard library's source: "
        "stdlib), a text file (text), a numeric sequence for L2 regression (numbers), or a "
        "synthetic task: adding problem, copy memory. Default: shakespeare, or text/numbers from "
        "the extension of --data",
        TASKS,
    )
    data: str | None = _f(
        None,
        "a UTF-8 text file (character-level), or a .npy/.csv file of "
        "numbers (T rows, one column per feature) to predict each row from the ones before",
        metavar="PATH",
    )
    valid_fraction: float = _f(
        0.05,
        "the fraction held out for validation: the end of a --data file, or the end of "
        "every document (each play, each module) of a built-in corpus; synthetic tasks draw "
        "their own validation sequences",
        metavar="F",
    )
    length: int = _f(
        100, "adding problem: the minimal sequence length T; copy memory: the lag T", metavar="T"
    )
    # the model
    engine: str = _f(
        "numpy", "numpy: the reference engine (elman only); torch: PyTorch", ("numpy", "torch")
    )
    cell: str = _f(
        "elman",
        "elman: the seed's h = f(A h + B x + b), y = g(C h + c), on both "
        "engines; rnn, gru, lstm: torch.nn's cells, on --engine torch; mingru, lru: "
        "tbptt.torch.ScanLM, residual blocks of minGRU or LRU scans (docs/scan.md), on --engine "
        "torch",
        ("elman", "rnn", "gru", "lstm", *SCAN_CELLS),
    )
    hidden: int = _f(
        256, "units per layer (n); mingru, lru: the width of the residual stream", metavar="N"
    )
    layers: int | None = _f(
        None,
        "stacked recurrent layers (torch cells only); mingru, lru: residual blocks, each a scan "
        "and a GLU. Default: 1 for rnn, gru and lstm, 2 for mingru and lru (one block of "
        "element-wise recurrences mixes its units only through the GLU after its scan; a second "
        "scan reads the mixed units, as ScanLM's own default)",
        metavar="N",
    )
    activation: str = _f("tanh", "f of the elman cell", ("tanh", "sigmoid", "relu", "identity"))
    bias: bool = _f(True, "the optional biases b and c of the elman cell")
    spectral_radius: float | None = _f(
        None,
        "rescale the elman cell's random initial A to this "
        "largest |eigenvalue| (default: none, A uniform in +-1/sqrt(n) as torch.nn.RNN)",
        metavar="R",
    )
    dtype: str = _f("float32", "floating-point type of parameters and data", ("float32", "float64"))
    device: str = _f("cpu", "where the torch engine runs", ("cpu", "cuda"))
    # the gradient: truncation (SEMANTICS.md 4), or an unbiased alternative (SEMANTICS.md 8)
    method: str = _f(
        "tbptt",
        "how each update's gradient is computed: "
        + "; ".join(f"{m.name}, {m.summary}" for m in METHODS.values())
        + ". All run on both engines, with every --cell but lru, whose complex state rtrl and "
        "uoro do not carry",
        tuple(METHODS),
    )
    k1: int = _f(
        32, "steps between updates (tbptt, rtrl, uoro); with artbp the steps per chunk fed"
    )
    k2: int = _f(32, "steps each update backpropagates through (tbptt)")
    cut: float | None = _f(
        None,
        "artbp: the probability c that a possible cut falls (every --cut-every steps); 0 is "
        "exact BPTT over the whole stream, 1 with --cut-every 1 is TBPTT(1, 1)",
        metavar="C",
    )
    cut_every: int = _f(1, "artbp: cuts may fall after every B steps", metavar="B")
    max_segment: int | None = _f(
        None,
        "artbp: force a cut once a segment would exceed L steps; bounds memory but makes the "
        "gradient BIASED (default: no limit)",
        metavar="L",
    )
    inject: str = _f(
        "new",
        "losses an update injects: new (each once; needs k2 >= k1), window "
        "(all in the window), last (the update step's only)",
        ("new", "window", "last"),
    )
    adapt_k2: float | None = _f(
        None,
        "re-estimate k2 every --adapt-every updates: the smallest K "
        "whose estimated relative gradient bias is at most DELTA, from the geometric decay of "
        "||dl_t/dh_{t-k}|| on the last 2 x --adapt-max steps (Aicher, Foti and Fox 2019; numpy "
        "engine). Default: off, k2 fixed",
        metavar="DELTA",
    )
    adapt_every: int = _f(500, "updates between re-estimates of k2 with --adapt-k2", metavar="N")
    adapt_max: int = _f(128, "the largest k2 --adapt-k2 may choose", metavar="K")
    # the optimizer
    optimizer: str = _f("adam", "the optimizer", ("adam", "sgd"))
    lr: float | None = _f(
        None,
        "learning rate. Default: 6e-3 for the elman cell, 4e-3 for rnn, gru, lstm, mingru and lru",
        metavar="LR",
    )
    lr_decay: str = _f(
        "cosine",
        "cosine: lr falls to 0 over --max-updates, else over --time-budget; none: constant",
        ("cosine", "none"),
    )
    clip: float | None = _f(5.0, "largest global gradient norm per update (0: no clipping)")
    batch: int | None = _f(
        None,
        "independent streams trained side by side. Default: 64 for the elman cell (measured: "
        "1.45 nats/char after 27M characters of the demo, 1.47 with 32 streams), 32 for rnn, gru "
        "and lstm",
        metavar="B",
    )
    seed: int = _f(0, "seed of the initial parameters and of the synthetic tasks", metavar="S")
    # how long, and where the results go
    time_budget: float | None = _f(
        None,
        "seconds of training (evaluation and checkpoints not "
        f"counted); {DEMO_SECONDS:g} when neither this nor --max-updates is given",
        metavar="SECONDS",
    )
    max_updates: int | None = _f(None, "stop after this many parameter updates", metavar="N")
    eval_every: int = _f(
        1000,
        "updates between validations, each on at most 64K targets of the validation data (the "
        "last on all of it)",
        metavar="N",
    )
    checkpoint_every: int = _f(
        1000, "updates between checkpoints (one at the end too)", metavar="N"
    )
    threads: int | None = _f(
        None,
        "CPU threads for the matrix products (numpy's OpenBLAS, or torch). Default: "
        "$OMP_NUM_THREADS when set; else, for the numpy engine, 2 when two CPUs are idle at the "
        "start by the 1-minute load average (cpus - int(load) >= 2), else 1, and for torch half "
        "the CPUs idle at the start, at least 1 "
        "and at most 4, shared among the processes of a torchrun job: a thread more than the idle "
        "CPUs makes every product wait for a descheduled thread (measured on a busy 2-core "
        "machine: an LSTM 12 times slower with 2 threads than with 1). --resume keeps the run's "
        "count",
        metavar="N",
    )
    run_dir: str | None = _f(
        None,
        "where config, vocabulary, metrics, plot and checkpoints go; default: "
        "runs/<time>-<task>-<engine>-<cell> (with -2, -3, ... if that is taken)",
        metavar="DIR",
    )

    @property
    def text(self) -> bool:
        return self.task in TEXT_TASKS


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
TYPES = typing.get_type_hints(Config)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; absent flags stay out of the namespace so the file can set them."""
    for name, f in FIELDS.items():
        kind = TYPES[name]
        default = "none" if f.default is None else f.default
        if isinstance(f.default, bool):
            default = "on" if f.default else "off"
        help = f.metadata["help"]
        help += "" if "default:" in help.lower() else f" (default: {default})"
        kw: dict[str, object] = dict(
            default=argparse.SUPPRESS, help=help, metavar=f.metadata["metavar"]
        )
        if kind is bool:
            parser.add_argument(
                flag(name),
                action=argparse.BooleanOptionalAction,
                help=help,
                default=argparse.SUPPRESS,
            )
            continue
        base = typing.get_args(kind)[0] if typing.get_args(kind) else kind
        if f.metadata["choices"]:
            kw.update(choices=f.metadata["choices"], metavar=None)
        parser.add_argument(flag(name), type=base, **kw)  # type: ignore[arg-type]


def _typed(name: str, value: object, where: str) -> object:
    """Check one value from a TOML file against the field's type and choices."""
    kind = TYPES[name]
    optional = type(None) in typing.get_args(kind)
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    if value is None and optional:
        return None
    ok = isinstance(value, base) and not (base is int and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        want = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[base]
        raise InputError(f"{where}: {name} must be {want}, got {value!r} ({type(value).__name__})")
    choices = FIELDS[name].metadata["choices"]
    if choices and value not in choices:
        raise InputError(f"{where}: {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def read_toml(path: str | Path, where: str = "--config", machine: bool = False) -> dict:
    """The fields a TOML file sets, type-checked; unknown keys are errors. Messages name the file
    after `where` (the flag that gave it; "" for a run directory's own config.toml).

    `data_bytes` (a path that is not UTF-8, percent-encoded: see write_toml) sets `data`. The
    [machine] table (what the machine gave a run: its thread count) is read with `machine` (a
    resumed run's own config.toml) and ignored otherwise (a new run picks its own)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib  # pyright: ignore[reportMissingImports]
    from ..files import read_regular

    path = Path(path)
    where = f"{where} {path}".strip()
    try:
        raw = tomllib.loads(read_regular(path, 16 << 20, where).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{where} is not valid TOML: {exc}") from None
    if "data_bytes" in raw:
        encoded = raw.pop("data_bytes")
        raw["data"] = _from_bytes_key(encoded, "data" in raw, where)
    table = raw.pop("machine", {})
    if not isinstance(table, dict) or not set(table) <= {"threads"}:
        raise InputError(f"{where}: [machine] may hold threads only, got {table!r}")
    if machine and "threads" not in raw:
        raw.update(table)
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise InputError(f"{where}: unknown setting {key!r} (known: {', '.join(FIELDS)})")
        out[name] = _typed(name, value, where)
    return out


def _from_bytes_key(value: object, both: bool, where: str) -> str:
    """data_bytes's percent-encoded bytes as the path (undecodable bytes as surrogates, as
    os.fsdecode gives them)."""
    from urllib.parse import unquote_to_bytes

    if both:
        raise InputError(f"{where}: data and data_bytes both name the data; keep one")
    if not isinstance(value, str) or not value.isascii():
        raise InputError(f"{where}: data_bytes must be an ASCII string, got {value!r}")
    return os.fsdecode(unquote_to_bytes(value))


# not settings of the run: where it lives (a comment) and what this machine gave it ([machine])
MACHINE = ("run_dir", "threads")


def write_toml(cfg: Config, run_dir: str | Path | None = None) -> str:
    """The configuration as TOML (unset options as comments). `tbptt train --config` of it starts
    a new run with the same settings: the run directory is a comment, and the thread count this
    machine gave the run is in a [machine] table, which --resume reads and --config ignores.

    Each value is written by tomli-w (any string as valid TOML: a path outside the Basic
    Multilingual Plane as its UTF-8); the comments around them by hand. A --data path that is not
    UTF-8 (bytes a file system allows, decoded by Python as surrogates) has no TOML string: it is
    written as `data_bytes`, its bytes percent-encoded as in a file: URL (%E9 for the byte 0xE9),
    which read_toml decodes back to the same bytes."""
    lines = ["# tbptt train configuration; reuse it with: tbptt train --config config.toml"]
    values = dataclasses.asdict(cfg)
    if run_dir is not None:
        values["run_dir"] = str(run_dir)
    for name, value in values.items():
        if name == "clip" and value is None:
            value = 0.0  # no clipping
        if name == "run_dir":
            shown = f"{name} = (not set)" if value is None else _toml(name, value)[-1]
            lines.append(f"# {shown}  (this run's directory; a new run picks its own)")
        elif name == "threads":
            continue  # [machine], at the end (a table follows the keys)
        elif value is None:
            lines.append(f"# {name} = (not set)")
        else:
            lines.extend(_toml(name, value))
    if cfg.threads is not None:
        lines.append("")
        lines.append(
            "# what this machine gave the run: tbptt train --resume keeps it (unless --threads is "
            "given), --config ignores it (each machine picks its own)"
        )
        lines.append("[machine]")
        lines.extend(_toml("threads", cfg.threads))
    return "\n".join(lines) + "\n"


def _toml(name: str, value: object) -> list[str]:
    """`name = value` as tomli-w writes it (every string on one line, escaped), after a comment
    for a --data path that is not UTF-8, written as `data_bytes`."""
    try:
        import tomli_w
    except ImportError:
        raise InputError(
            "tbptt train writes config.toml with the package tomli-w: pip install 'tbptt[data]'"
        ) from None
    if isinstance(value, str) and not _utf8(value):
        if name not in ("data", "run_dir"):  # the other strings are the flags' choices
            raise InputError(f"{flag(name)} {value!r} is not UTF-8 text")
        from urllib.parse import quote_from_bytes

        encoded = quote_from_bytes(os.fsencode(value), safe="/")
        what = "--data" if name == "data" else "the run directory"
        why = f"# {what} is not UTF-8: its bytes, percent-encoded (%E9 is the byte 0xE9)"
        return [why, tomli_w.dumps({f"{name}_bytes": encoded}).strip()]
    return [tomli_w.dumps({name: value}).strip()]


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def recorded(cfg: Config) -> dict:
    """The settings a run computes with, as checkpoint.json records them: all but the budgets and
    reporting (RESUMABLE), the machine's (MACHINE) and --data's path (the file may move)."""
    skip = (*RESUMABLE, *MACHINE, "data")
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def check_recorded(cfg: Config, settings: object, config: Path, checkpoint: Path) -> None:
    """A run's config.toml (config) against the settings its checkpoint.json recorded: an edit of
    what the run computes with (lr, clip, seed, batch, cell, hidden, dtype, optimizer, ...) is
    one line naming the setting and the file, before any engine is built."""
    if not isinstance(settings, dict):
        return  # a checkpoint of an earlier tbptt, which recorded none
    now = recorded(cfg)
    for name, value in settings.items():
        if name in now and now[name] != value:
            raise InputError(
                f"{config} sets {_shown(name, now[name])} ({flag(name)}), but this run was "
                f"trained with {_shown(name, value)} ({checkpoint}); a resumed run keeps what it "
                f"computes with: set it back, or start a new run with --config {config}"
            )


def _shown(name: str, value: object) -> str:
    """`name = value` as config.toml writes it."""
    if value is None:
        return f"{name} = {0.0 if name == 'clip' else '(not set)'}"
    return _toml(name, value)[-1]


def default_threads(engine: str) -> int:
    """--threads when not given: $OMP_NUM_THREADS, else, for numpy, 2 when at least two of the
    CPUs this process may use are left by the whole jobs the 1-minute load average counts (cpus
    - int(load) >= 2), else 1; for torch, half the CPUs idle by the load average, at least 1 and
    at most 4 (a torchrun job's local processes share them).

    Why so careful: a thread more than the CPUs free makes each of the small per-step products
    wait for a descheduled thread (measured on 2 cores at a load average of 5: the default torch
    Elman model 46K characters/s with 1 thread, 2.9K with 2; an LSTM 16K and 1.3K), and the load
    average lags. On idle CPUs a second thread gains torch at most 1.5 times, so torch wants a
    margin of idle CPUs; it gains the numpy demo about 2 times (issue 28: 227K against 106K
    characters/s on an idle 2-core AVX2 machine), which its two minutes need."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    local = int(local) if local.isdigit() and int(local) >= 1 else 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average here: assume the CPUs idle
        load = 0.0
    if engine == "numpy":  # the CPUs no whole job of the load average takes, at most 2
        return max(1, min(2, cpus - int(load)))
    idle = max(0.0, cpus - load)
    return max(1, min(4, cpus // local, int(idle / (2 * local))))


def check(cfg: Config) -> Config:
    """Resolve the defaults that depend on other fields and reject what cannot run."""
    _resolve_task(cfg)
    _check_engine(cfg)
    _check_counts(cfg)
    _check_method(cfg)
    _check_reals(cfg)
    return cfg


def _resolve_task(cfg: Config) -> None:
    """The task from --data's suffix when not given; --data made absolute; choices checked."""
    if cfg.task is None:
        suffix = Path(cfg.data).suffix.lower() if cfg.data else None
        cfg.task = (
            "shakespeare"
            if cfg.data is None
            else ("numbers" if suffix in (".npy", ".csv") else "text")
        )
    if cfg.data:
        cfg.data = absolute(cfg.data)  # a resumed run finds it from anywhere
    if cfg.task in ("text", "numbers") and not cfg.data:
        raise InputError(f"--task {cfg.task} needs --data PATH")
    if cfg.task not in ("text", "numbers") and cfg.data:
        raise InputError(f"--data is for --task text or numbers, not --task {cfg.task}")
    for name, f in FIELDS.items():  # a TOML file's strings are checked as the flags are
        choices = f.metadata["choices"]
        value = getattr(cfg, name)
        if choices and value is not None and value not in choices:
            raise InputError(f"{flag(name)} must be one of {', '.join(choices)}, got {value!r}")


def _check_engine(cfg: Config) -> None:
    """What only the torch engine has; the defaults of --lr and --threads."""
    if cfg.lr is None:
        cfg.lr = 6e-3 if cfg.cell == "elman" else 4e-3
    if cfg.layers is None:
        cfg.layers = 2 if cfg.cell in SCAN_CELLS else 1
    if cfg.batch is None:
        cfg.batch = 64 if cfg.cell == "elman" else 32
    if cfg.engine == "numpy" and cfg.cell != "elman":
        raise InputError(f"--cell {cfg.cell} needs --engine torch (numpy has the elman cell only)")
    if cfg.engine == "numpy" and cfg.layers != 1:
        raise InputError(f"--layers {cfg.layers} needs --engine torch (numpy has one layer)")
    if cfg.engine == "numpy" and cfg.device != "cpu":
        raise InputError(f"--device {cfg.device} needs --engine torch")
    if cfg.cell != "elman":  # the elman cell's own settings would be ignored
        own = (("--activation", cfg.activation != "tanh"), ("--no-bias", not cfg.bias))
        for name, given in (*own, ("--spectral-radius", cfg.spectral_radius is not None)):
            if given:
                raise InputError(f"{name} applies to --cell elman, not --cell {cfg.cell}")
    elif cfg.layers != 1:
        raise InputError(
            f"--layers {cfg.layers} needs --cell rnn, gru, lstm, mingru or lru (elman has one "
            "layer)"
        )
    if cfg.cell == "lru" and cfg.method in ("rtrl", "uoro"):
        raise InputError(
            f"--method {cfg.method} carries a real state's influence, and --cell lru's state is "
            "complex: choose --method tbptt or artbp, or --cell mingru"
        )
    if cfg.engine == "torch" and importlib.util.find_spec("torch") is None:
        raise InputError("--engine torch needs PyTorch: pip install 'tbptt[torch]'")
    if cfg.threads is None:
        cfg.threads = default_threads(cfg.engine)


def _check_counts(cfg: Config) -> None:
    """Sizes, step counts and the seed: integers with their minimum."""
    names = (
        "hidden",
        "layers",
        "k1",
        "k2",
        "batch",
        "length",
        "eval_every",
        "checkpoint_every",
        "adapt_every",
        "adapt_max",
    )
    for name in (*names, "threads"):
        if getattr(cfg, name) < 1:
            raise InputError(f"{flag(name)} must be an integer >= 1, got {getattr(cfg, name)}")
    least = {"adding": 22, "copy": 1}.get(
        cfg.task or "", 1
    )  # adding: X2 in the first T/2 - 1 pairs
    if cfg.length < least:
        raise InputError(
            f"--length must be an integer >= {least} for --task {cfg.task}, got {cfg.length}"
        )


def _check_method(cfg: Config) -> None:
    """The seed, the method's options (checked by the library, its messages naming the flags) and
    adaptive k2."""
    if cfg.seed < 0:
        raise InputError(f"--seed must be an integer >= 0, got {cfg.seed}")
    try:
        build_rule(cfg.method, method_options(cfg))
    except InputError as exc:
        raise InputError(as_flags(str(exc))) from None
    if cfg.adapt_k2 is None:
        for name in ADAPT:
            if getattr(cfg, name) != FIELDS[name].default:
                raise InputError(f"{flag(name)} applies with --adapt-k2 only")
    else:
        if not (0 < cfg.adapt_k2 < 1):
            raise InputError(
                f"--adapt-k2 must be a relative bias between 0 and 1, got {cfg.adapt_k2}"
            )
        if cfg.engine != "numpy":
            raise InputError("--adapt-k2 needs --engine numpy (the lag analysis is numpy's)")
        if cfg.adapt_max < cfg.k1:
            raise InputError(f"--adapt-max {cfg.adapt_max} must be >= --k1 {cfg.k1}")


def method_options(cfg: Config) -> dict:
    """The options of --method, from the flags the table names (tbptt.methods): the random
    methods draw from a generator seeded with --seed (its state is saved with every checkpoint);
    training never finishes its streams, so there is no flush update; an option left unset is the
    method's default (or missing, when it has none)."""
    method, options = METHODS[cfg.method], {}
    for o in method.options:
        value = None if o.field is None else getattr(cfg, o.field)
        if value is not None and "numpy" in o.engines:
            options[o.name] = value
        elif o.name == "flush":
            options[o.name] = False
    return options


def _check_reals(cfg: Config) -> None:
    """Fractions, rates and budgets: finite where they must be; --clip 0 and the default budget."""
    if not (0 < cfg.valid_fraction < 1):
        raise InputError(
            f"--valid-fraction must be strictly between 0 and 1, got {cfg.valid_fraction}"
        )
    if cfg.spectral_radius is not None and not (0 < cfg.spectral_radius < math.inf):
        raise InputError(f"--spectral-radius must be a positive number, got {cfg.spectral_radius}")
    if cfg.lr is None or not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise InputError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.clip is not None and not (cfg.clip >= 0 and math.isfinite(cfg.clip)):
        raise InputError(f"--clip must be >= 0 (0: no clipping), got {cfg.clip}")
    if cfg.clip == 0:
        cfg.clip = None
    if cfg.max_updates is not None and cfg.max_updates < 1:
        raise InputError(f"--max-updates must be an integer >= 1, got {cfg.max_updates}")
    if cfg.time_budget is not None and not (cfg.time_budget > 0 and math.isfinite(cfg.time_budget)):
        raise InputError(
            f"--time-budget must be a positive number of seconds, got {cfg.time_budget}"
        )
    if cfg.time_budget is None and cfg.max_updates is None:
        cfg.time_budget = DEMO_SECONDS


def default_run_dir(cfg: Config) -> Path:
    """runs/<time>-<task>-<engine>-<cell> (the run directory picks -2, -3, ... if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.task}-{cfg.engine}-{cfg.cell}"


def absolute(path: str) -> str:
    """A path as an absolute one, `..` and `~` resolved (symbolic links kept)."""
    return os.path.abspath(os.path.expanduser(path))


def from_args(args: argparse.Namespace, saved: dict | None = None) -> Config:
    """Defaults <- --config file <- flags; with `saved` (a resumed run) only RESUMABLE changes."""
    given = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    if given.get("data"):  # the same file, however it is written
        given["data"] = absolute(given["data"])
        before = None if saved is None else saved.get("data")
        if isinstance(before, str) and os.path.exists(before) and os.path.exists(given["data"]):
            if os.path.samefile(before, given["data"]):
                given["data"] = before
    if saved is None and getattr(args, "config", None):
        given = {**read_toml(args.config), **given}
    if saved is None:
        check_method_options(given)
    if saved is not None:
        for name, value in given.items():
            if name not in RESUMABLE and name != "run_dir" and value != saved.get(name):
                raise InputError(
                    f"{flag(name)} cannot change when resuming (the run has "
                    f"{saved.get(name)!r}); only {', '.join(map(flag, RESUMABLE))} can"
                )
        given = {**saved, **{k: v for k, v in given.items() if k in RESUMABLE}}
    return check(Config(**given))


ADAPT = ("adapt_k2", "adapt_every", "adapt_max")  # --adapt-k2 re-estimates a method's k2


def method_settings() -> dict[str, tuple[str, ...]]:
    """The settings each --method takes beyond the common ones (--k1 and --seed): its options'
    flags in the table, and --adapt-k2's where it has a k2."""
    out = {}
    for name, method in METHODS.items():
        own = tuple(o.field for o in method.options if o.field not in (None, "k1", "seed"))
        out[name] = own + (ADAPT if "k2" in own else ())
    return out


def check_method_options(given: dict) -> None:
    """A setting of one method given with another (--k2 with --method artbp, --cut with tbptt)
    is an error naming both, not silently ignored; a default value (as every config.toml
    holds) is not a setting given."""
    method, settings = given.get("method", "tbptt"), method_settings()
    if method not in settings:
        return  # check() names the choices
    for other, names in settings.items():
        for name in names:
            default = FIELDS[name].default
            if name not in settings[method] and given.get(name, default) != default:
                raise InputError(f"{flag(name)} applies to --method {other}, not --method {method}")
