"""The `tbptt bias` and `tbptt suggest-k` commands and their input and output.

Reading a model (an .npz file or a `tbptt train` run directory) and data (a file, a run's
validation data, or random data), the CSV files and terminal tables, and the argument parsers and
runners the `tbptt` command line calls. The mathematics, equations (B.1)-(B.6), is in
tbptt.analysis.bias; the figures are plots.py's.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from pathlib import Path

import numpy as np

from ..analysis.bias import (
    BiasRow,
    KChoice,
    LagProfile,
    choose_k,
    lag_profile,
    schedules,
    truncation_bias,
)
from ..analysis.estimators import FIELDS, Method, compare, table
from ..errors import InputError
from ..files import atomic_write
from ..inputs import OneHot
from ..methods import METHODS
from ..numpy.elman import ElmanRNN
from ..numpy.functions import ACTIVATIONS, LOSSES, OUTPUTS
from ..schedule import INJECT_MODES
from . import plots, rundir
from .flags import named_by_flags

Array = np.ndarray


# -- reading a model and data for the commands -----------------------------------------------------
def load_model(path: str | os.PathLike) -> ElmanRNN:
    """An ElmanRNN in float64 from an .npz file or a `tbptt train` run directory (numpy engine).

    The file holds A, B, C and optionally b, c (or the same keys prefixed "model.", as
    `TBPTT.save` writes them) and optionally f and g as strings. A run directory's latest state
    (checkpoint.json) is read; f is its config's activation and g is softmax for the
    cross-entropy tasks (text and copy), identity otherwise.
    """
    path = Path(path)
    meta: dict = {}
    if not path.exists():
        raise InputError(f"model: no such file or run directory {str(path)!r}")
    if path.is_dir():
        meta = _run_config(path)
        pointer = path / "checkpoint.json"
        if pointer.exists():
            state = rundir.read_json(pointer)
            if not isinstance(state, dict) or not isinstance(state.get("state"), str):
                raise InputError(f"model: {pointer} is damaged")
            path = path / Path(state["state"]).name
        else:
            files = sorted(path.glob("*.npz"), key=lambda p: p.stat().st_mtime)
            if not files:
                raise InputError(f"model: no checkpoint.json or .npz file in {str(path)!r}")
            path = files[-1]
    if path.suffix != ".npz":
        raise InputError(f"model: {str(path)!r} is not an .npz file (bias needs the numpy engine)")
    if not path.exists():
        raise InputError(f"model: no such file {str(path)!r}")
    arrays = _npz(path, "model")
    params = {}
    for key in ("A", "B", "C", "b", "c"):
        for name in (key, f"model.{key}"):
            if name in arrays:
                params[key] = np.asarray(arrays[name], dtype=np.float64)
    if not {"A", "B", "C"} <= set(params):
        raise InputError(
            f"model: {str(path)!r} holds no A, B, C (or model.A, ...) arrays; keys: "
            f"{sorted(arrays)[:8]}"
        )
    f = str(arrays["f"]) if "f" in arrays else str(meta.get("activation", "tanh"))
    g = str(arrays["g"]) if "g" in arrays else ("softmax" if _cross_entropy(meta) else "identity")
    return ElmanRNN(**params, f=f, g=g)


def _run_config(run: Path) -> dict:
    from . import config as cf

    path = run / "config.toml"
    return cf.read_toml(path, where="model:") if path.exists() else {}


def _npz(path: Path, flag: str) -> dict[str, Array]:
    """The arrays of an .npz file, or a one-line error naming the flag and the file."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise InputError(f"{flag}: {str(path)!r} is not an .npz file (np.savez writes one)")
    if not path.is_file():
        raise InputError(f"{flag}: no such file {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # a truncated zip, an object array, not an npz at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "pickle" in first:
            first = "it holds Python objects, not only arrays"
        raise InputError(
            f"{flag}: {str(path)!r} is damaged or not an .npz file ({first})"
        ) from None


def _cross_entropy(meta: dict) -> bool:
    return meta.get("task") in ("shakespeare", "stdlib", "text", "copy")


def run_data(run: str | os.PathLike, steps: int) -> dict[str, Array]:
    """Up to `steps` steps of a `tbptt train` run's validation data, as x, y, mask, reset."""
    from . import config as cf
    from .data import load_problem

    run = Path(run)
    meta = _run_config(run)
    if not meta:
        raise InputError(f"data: {str(run)!r} has no config.toml; give --data FILE.npz")
    cfg = cf.check(cf.Config(**meta))
    vocab = rundir.read_vocab(run) if (run / "vocab.json").exists() else None
    problem = load_problem(cfg, vocab)
    parts, total = [], 0
    for chunk in problem.valid(None):
        parts.append(chunk)
        total += len(chunk[0])
        if total >= steps:
            break
    out: dict[str, Array] = {}
    for k, name in enumerate(("x", "y", "mask", "reset")):
        if parts[0][k] is not None:
            pieces = [p[k].dense() if isinstance(p[k], OneHot) else p[k] for p in parts]
            arr = np.concatenate(pieces)[:steps]
            out[name] = arr.astype(np.float64) if arr.dtype.kind == "f" else arr
    return out


def load_data(path: str | os.PathLike) -> dict[str, Array]:
    """x, y and optionally mask, reset, h0 from an .npz file (time-major arrays)."""
    arrays = _npz(Path(path), "--data")
    if "x" not in arrays or "y" not in arrays:
        raise InputError(f"data: {str(path)!r} must hold arrays x and y, got {sorted(arrays)}")
    return {k: arrays[k] for k in ("x", "y", "mask", "reset", "h0") if k in arrays}


def synthetic_data(model: ElmanRNN, T: int, batch: int, loss: str, seed: int) -> dict[str, Array]:
    """Random data shaped for the model: x ~ N(0, 1) (one-hot symbols for cross-entropy) and
    random targets. It measures what the network's own dynamics do to the gradient."""
    rng = np.random.default_rng(seed)
    if loss == "cross_entropy":
        x = np.eye(model.m, dtype=model.dtype)[rng.integers(model.m, size=(T, batch))]
        y = rng.integers(model.p, size=(T, batch))
    else:
        x = rng.normal(size=(T, batch, model.m)).astype(model.dtype)
        y = rng.normal(size=(T, batch, model.p)).astype(model.dtype)
    return {"x": x, "y": y}


# -- output files ----------------------------------------------------------------------------------
def bias_csv(rows: list[BiasRow], estimate: dict[int, float] | None = None) -> str:
    """One line per schedule and parameter ("all" is every parameter as one vector)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(
        [
            "k1",
            "k2",
            "inject",
            "flush",
            "param",
            "cosine",
            "rel_error",
            "backward_steps",
            "estimated_rel_bias",
        ]
    )
    for r in rows:
        tr = r.truncation
        est = ""
        if estimate is not None and tr.k1 == 1 and tr.inject == "new" and tr.k2 in estimate:
            est = f"{estimate[tr.k2]:.6g}"
        for name, (cos, rel) in [("all", (r.cosine, r.rel_error)), *r.per_param.items()]:
            w.writerow(
                [
                    tr.k1,
                    tr.k2,
                    tr.inject,
                    tr.flush,
                    name,
                    f"{cos:.10g}",
                    f"{rel:.10g}",
                    r.backward_steps,
                    est if name == "all" else "",
                ]
            )
    return out.getvalue()


def lags_csv(profile: LagProfile) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["lag", "mean_norm", "fitted", "cum_norm"])
    for tau, (phi, fit, cum) in enumerate(
        zip(profile.norms, profile.fitted(), profile.cum_norms, strict=True)
    ):
        w.writerow([tau, f"{phi:.10g}", f"{fit:.10g}", f"{cum:.10g}"])
    return out.getvalue()


# -- terminal tables -------------------------------------------------------------------------------
def _num(v: float) -> str:
    if not math.isfinite(v):
        return "inf" if v == math.inf else "nan"
    return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.2e}"


def bias_table(rows: list[BiasRow], estimate: dict[int, float] | None = None) -> str:
    names = list(rows[0].per_param) if rows else []
    head = f"{'k1':>4} {'k2':>5} {'inject':>7} {'cosine':>9} {'rel err':>9}"
    head += "".join(f" {'err ' + k:>9}" for k in names)
    head += f" {'est. bias':>9}" if estimate else ""
    lines = [head]
    for r in rows:
        tr = r.truncation
        line = f"{tr.k1:>4} {tr.k2:>5} {tr.inject:>7} {r.cosine:>9.6f} {_num(r.rel_error):>9}"
        line += "".join(f" {_num(r.per_param[k][1]):>9}" for k in names)
        if estimate:
            e = estimate.get(tr.k2) if tr.k1 == 1 and tr.inject == "new" else None
            line += f" {_num(e) if e is not None else '':>9}"
        lines.append(line)
    return "\n".join(lines)


def lag_table(profile: LagProfile, every: int | None = None) -> str:
    lags = profile.lags
    if every is None:
        every = max(1, len(lags) // 16)
    shown = [t for t in lags if t % every == 0 or t == lags[-1]]
    lines = [f"{'lag':>5} {'mean norm':>11} {'fitted':>11}"]
    fit = profile.fitted()
    for t in shown:
        lines.append(f"{t:>5} {profile.norms[t]:>11.4e} {fit[t]:>11.4e}")
    return "\n".join(lines)


# -- the commands ----------------------------------------------------------------------------------
def _add_model_and_data(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (a saved one, or a fresh random one)")
    g.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="an .npz with A, B, C[, b, c] or a run directory",
    )
    g.add_argument("--hidden", type=int, default=32, help="fresh model: units n")
    g.add_argument("--inputs", type=int, default=4, help="fresh model: inputs m")
    g.add_argument("--outputs", type=int, default=2, help="fresh model: outputs p")
    g.add_argument("--f", default="tanh", choices=tuple(ACTIVATIONS), help="fresh model: f")
    g.add_argument("--g", default="identity", choices=OUTPUTS, help="fresh model: g")
    g.add_argument(
        "--spectral-radius",
        type=float,
        default=1.0,
        metavar="RHO",
        help="fresh model: rescale A to this largest |eigenvalue|",
    )
    g.add_argument("--seed", type=int, default=0, help="fresh model: seed of the parameters")
    d = parser.add_argument_group(
        "data (a file; a run directory's validation data; or random data shaped for the model)"
    )
    d.add_argument("--data", metavar="FILE.npz", help="arrays x, y[, mask, reset, h0], time-major")
    d.add_argument("--steps", type=int, default=256, help="random or run data: steps T")
    d.add_argument("--batch", type=int, default=8, help="random data: streams")
    d.add_argument("--data-seed", type=int, default=1, help="random data: seed")
    d.add_argument(
        "--loss",
        default=None,
        choices=LOSSES,
        help="the per-step loss; none means cross_entropy when g is softmax, else l2",
    )
    a = parser.add_argument_group("per-lag profile")
    a.add_argument(
        "--max-lag", type=int, default=None, help="longest lag measured; none means min(64, T/2)"
    )
    a.add_argument("--fit-from", type=int, default=1, help="first lag of the geometric fit")


def _hide_none_defaults(parser: argparse.ArgumentParser) -> None:
    """No "(default: None)" in --help: options whose default is None are simply left out."""
    for action in parser._actions:
        if action.default is None:
            action.default = argparse.SUPPRESS


def _get(args: argparse.Namespace, name: str):
    return getattr(args, name, None)


def _model_and_data(args: argparse.Namespace) -> tuple[ElmanRNN, dict[str, Array], str]:
    for name in ("seed", "data_seed"):  # numpy's generators take seeds >= 0
        if getattr(args, name) < 0:
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} must be an integer >= 0, got {getattr(args, name)}")
    rho = args.spectral_radius
    if not (rho > 0 and math.isfinite(rho)):
        raise InputError(f"--spectral-radius must be a positive number, got {rho}")
    if _get(args, "model"):
        model = load_model(args.model)
    else:
        model = ElmanRNN.init(
            n=args.hidden,
            m=args.inputs,
            p=args.outputs,
            f=args.f,
            g=args.g,
            seed=args.seed,
            spectral_radius=args.spectral_radius,
        )
    loss = _get(args, "loss") or ("cross_entropy" if model.g == "softmax" else "l2")
    if _get(args, "data"):
        data = load_data(args.data)
    elif _get(args, "model") and Path(args.model).is_dir():
        data = run_data(args.model, args.steps)
        if len(data["x"]) < args.steps:
            print(
                f"note: {args.model}'s validation data holds {len(data['x'])} steps per stream, "
                f"fewer than --steps {args.steps}: all of them are used",
                file=sys.stderr,
            )
    else:
        for name in ("steps", "batch"):
            if getattr(args, name) < 1:
                raise InputError(f"--{name} must be an integer >= 1, got {getattr(args, name)}")
        data = synthetic_data(model, args.steps, args.batch, loss, args.data_seed)
    return model, data, loss


def _describe(model: ElmanRNN, data: dict[str, Array], loss: str) -> str:
    x = np.asarray(data["x"])
    T, batch = x.shape[0], (x.shape[1] if x.ndim == 3 else 1)
    rho = float(np.abs(np.linalg.eigvals(model.A.astype(np.float64))).max())
    return f"{model!r}, spectral radius of A {rho:.3f}; {T} steps x {batch} streams, loss={loss}"


def _profile_from(args, model, data, loss) -> LagProfile:
    kw = {k: data[k] for k in ("mask", "reset") if k in data}
    return lag_profile(
        model,
        data["x"],
        data["y"],
        _get(args, "max_lag"),
        data.get("h0"),
        loss,
        fit_from=args.fit_from,
        **kw,
    )


def add_bias_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_and_data(parser)
    _hide_none_defaults(parser)
    s = parser.add_argument_group("schedules compared with exact BPTT")
    s.add_argument(
        "--k2",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 16, 32, 64],
        metavar="K2",
        help="truncation lengths",
    )
    s.add_argument(
        "--k1",
        type=int,
        nargs="+",
        default=[1],
        help="steps between updates (one or more); 0 means k1 = k2 (disjoint chunks)",
    )
    s.add_argument(
        "--inject", nargs="+", default=["new"], choices=INJECT_MODES, help="inject modes to compare"
    )
    s.add_argument(
        "--delta", type=float, default=0.1, help="relative bias for the suggested K (Aicher et al.)"
    )
    u = parser.add_argument_group(
        "methods compared with exact BPTT (SEMANTICS.md 8): with --method, the bias, variance and "
        "cost of each method's gradient instead of the truncation sweep"
    )
    u.add_argument(
        "--method",
        nargs="+",
        choices=METHODS,
        default=None,
        help="methods to compare: tbptt (one row per --k2, k1 the first --k1), rtrl, uoro, artbp "
        "(one row per --cut)",
    )
    u.add_argument(
        "--cut", type=float, nargs="+", default=[0.1], metavar="C", help="artbp: cut probabilities"
    )
    u.add_argument(
        "--cut-every", type=int, default=1, metavar="B", help="artbp: cuts every B steps"
    )
    u.add_argument(
        "--draws", type=int, default=100, help="uoro, artbp: independent estimates per method"
    )
    parser.add_argument(
        "--out-dir",
        default="tbptt-bias",
        metavar="DIR",
        help="where bias.csv, lags.csv, bias.png and lags.png go (with --method: methods.csv and "
        "methods.png)",
    )


def _methods(args: argparse.Namespace) -> list[Method]:
    """The rows of `tbptt bias --method`, from the flags (the library checks every value): per
    method, its options that have a flag here (the first value of a list), and one row per value
    of the option it sweeps (tbptt.methods: tbptt's k2, artbp's c); --k1 0 means k1 = k2."""
    out = []
    for name in dict.fromkeys(args.method):  # in the order given, once each
        method, options = METHODS[name], {}
        for o in method.options:
            value = getattr(args, o.field, None) if o.field and o.name != "rng" else None
            if value is not None and o.frozen:
                options[o.name] = value[0] if isinstance(value, list) else value
        sweep = method.sweep
        field = None if sweep is None else method.option(sweep).field
        values = [None] if field is None else getattr(args, field)
        for v in values:
            row = options if sweep is None else {**options, sweep: v}
            if row.get("k1") == 0:  # --k1 0: k1 = k2
                row["k1"] = row.get("k2")
            out.append(Method(name, row))
    return out


def run_methods(
    args: argparse.Namespace, model: ElmanRNN, data: dict[str, Array], loss: str
) -> int:
    """`tbptt bias --method ...`: (E.1)-(E.4) and each method's cost, a table, a CSV, a plot."""
    methods = _methods(args)
    get = data.get
    rows = compare(
        model,
        data["x"],
        data["y"],
        methods,
        draws=args.draws,
        loss=loss,
        mask=get("mask"),
        reset=get("reset"),
        h0=get("h0"),
    )
    title = _describe(model, data, loss)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(r.as_dict() for r in rows)
    out = _write(
        args.out_dir,
        {"methods.csv": buf.getvalue(), "methods.png": plots.methods_figure(rows, title)},
    )
    print(title)
    T = np.asarray(data["x"]).shape[0]
    print(f"Frozen gradient estimates against exact BPTT on the same trajectory (T = {T}); bias")
    print("and variance relative to ||exact|| (SEMANTICS.md 8), time for the whole batch:")
    print(table(rows))
    print(f"Wrote {out / 'methods.csv'}, {out / 'methods.png'}")
    return 0


def _write(out_dir: str, files: dict[str, str | bytes]) -> Path:
    """Every file into --out-dir, each whole (once everything is computed)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out-dir {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            atomic_write(out / name, content)
    except OSError as exc:
        raise InputError(f"--out-dir {out}: cannot write there ({exc.strerror})") from None
    return out


@named_by_flags
def run_bias(args: argparse.Namespace) -> int:
    plots.require("tbptt bias (it draws its figures)")
    model, data, loss = _model_and_data(args)
    if _get(args, "method"):
        return run_methods(args, model, data, loss)
    T = np.asarray(data["x"]).shape[0]
    k1s = [None if k == 0 else k for k in args.k1]
    trs = schedules(args.k2, k1s, args.inject, flush=True)
    kw = {k: data[k] for k in ("mask", "reset") if k in data}
    rows = truncation_bias(model, data["x"], data["y"], trs, data.get("h0"), loss, **kw)
    profile = _profile_from(args, model, data, loss)
    choice = choose_k(profile, args.delta, k_max=max(256, max(args.k2)))
    estimate = {k: float(choice.rel_bias[k - 1]) for k in args.k2 if k <= len(choice.rel_bias)}
    title = _describe(model, data, loss)
    files = {  # everything ready before the first file is written: no partial output
        "bias.csv": bias_csv(rows, estimate),
        "lags.csv": lags_csv(profile),
        "bias.png": plots.bias_figure(rows, estimate, title),
        "lags.png": plots.lags_figure(profile),
    }
    out = _write(args.out_dir, files)
    print(title)
    print(f"Frozen TBPTT estimate against exact BPTT on the same trajectory (T = {T}):")
    print(bias_table(rows, estimate))
    print("(est. bias: Aicher et al.'s estimated relative bias bound, for k1 = 1, inject=new)")
    print()
    print(f"Per-lag gradient, mean over {profile.count} loss terms (Pascanu et al. eq. 4):")
    print(lag_table(profile))
    print(
        f"Fitted geometric decay: beta = {profile.rate:.4f} per step (half-life "
        f"{profile.half_life:.3g} steps), fitted from lag {profile.fit_from}."
    )
    print(_k_sentence(choice, profile))
    print(f"Wrote {out / 'bias.csv'}, {out / 'lags.csv'}, {out / 'bias.png'}, {out / 'lags.png'}")
    return 0


def percent(r: float) -> str:
    """A relative bias as a percentage: 79.6 -> '7,960%', 0.0905 -> '9.05%'."""
    if not math.isfinite(r):
        return "inf"
    v = 100 * r
    return f"{v:,.0f}%" if v >= 100 else f"{v:.3g}%" if v >= 0.01 else f"{v:.1e}%"


def in_words(r: float) -> str:
    """What an estimated relative bias (a bound on |bias| / |gradient|) means for a user."""
    if not math.isfinite(r):
        return "no bound: the gradient's norm has no lower bound here"
    if r >= 1:
        return "may miss all of the gradient: the bound exceeds the gradient itself"
    if r >= 0.5:
        return "may miss most of the gradient"
    if r >= 0.1:
        return "may miss a large part of the gradient"
    if r >= 0.01:
        return "may miss a small part of the gradient (under 10%)"
    return "negligible (under 1%)"


def _k_sentence(choice: KChoice, profile: LagProfile) -> str:
    if choice.bounded:
        r = float(choice.rel_bias[choice.k - 1])
        return (
            f"Suggested k2 (Aicher et al., delta = {choice.delta:g}): K = {choice.k}, whose "
            f"truncation's bias is estimated at most {percent(r)} of the gradient's norm."
        )
    if not 0 <= profile.rate < 1:
        why = f"the gradient shows no geometric decay (beta = {profile.rate:.4g})"
    elif choice.lower_bound <= 0:
        why = (
            f"the measured gradient is no larger than its fitted tail, so no lower bound on its "
            f"norm and no relative bias can be estimated; more steps (now lags up to "
            f"{profile.max_lag}) or a faster decay than beta = {profile.rate:.4g} would give one"
        )
    else:
        why = f"too little decay (beta = {profile.rate:.4g} per step)"
    return (
        f"No K up to {len(choice.rel_bias)} has an estimated relative bias <= "
        f"{percent(choice.delta)} (--delta {choice.delta:g}): "
        f"{why}; K = {choice.k}."
    )


def add_suggest_k_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_and_data(parser)
    _hide_none_defaults(parser)
    parser.add_argument(
        "--delta",
        type=float,
        default=0.1,
        help="largest acceptable relative bias of the truncated gradient",
    )
    parser.add_argument("--k-max", type=int, default=256, help="the largest K considered")


@named_by_flags
def run_suggest_k(args: argparse.Namespace) -> int:
    model, data, loss = _model_and_data(args)
    profile = _profile_from(args, model, data, loss)
    choice = choose_k(profile, args.delta, args.k_max)
    print(_describe(model, data, loss))
    print(
        f"Fitted geometric decay of mean ||dl_t/dh_(t-tau)||: beta = {profile.rate:.4f} per "
        f"step (from lag {profile.fit_from} to {profile.max_lag})."
    )
    shown = sorted({1, 2, 4, 8, 16, 32, 64, 128, choice.k} & set(range(1, args.k_max + 1)))
    print("   K  estimated bias, at most (relative to the gradient's norm)")
    for k in shown:
        r = float(choice.rel_bias[k - 1])
        print(f"{k:>4}  {percent(r):>8}  {in_words(r)}")
    print(_k_sentence(choice, profile))
    print(choice.k)
    return 0
