"""The methods by name: one table that both engines, the command line and the analysis read.

    method  options (defaults)                            frozen estimate         online trainer
    tbptt   k1, k2 (= k1), inject ("new"), flush (True)   tbptt.gradients         tbptt.TBPTT
    rtrl    k1 (1), max_bytes (1 GiB)                     tbptt.rtrl_gradients    tbptt.RTRL
    uoro    k1 (1), rng (None), eps (1e-7)                tbptt.uoro_gradients    tbptt.UORO
    artbp   c, b (1), rng (None), biased_max_length       tbptt.artbp_gradients   tbptt.ARTBP

The torch engine takes the same options (tbptt.torch.methods) and two of its trainer's: amp and
checkpoint, for tbptt and artbp.

A method is a `Method`: its name, its options (defaults and the `tbptt train` flags that set them),
where each engine's rule is (what the method adds to that engine's trainer shell: tbptt.TBPTT,
tbptt.torch.TBPTT; the protocols are tbptt.numpy.trainer.Rule and tbptt.torch.driver.Rule), the
numpy engine's frozen estimate, and its cost model (memory per stream, flops per step).
`register(method)` adds one: the extension point (CONTRIBUTING.md, "A new method").

make_trainer(method, model, optimizer, ...) builds the numpy engine's online trainer and
frozen_gradients(method, model, x, y, ...) its frozen estimate (parameters fixed over the
sequence); tbptt.torch.methods has the torch engine's. An option the method does not take is a
one-line InputError naming the options it does take; nothing is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import InputError
from .schedule import from_options as truncation

if TYPE_CHECKING:
    from numpy import ndarray as Array

    from .inputs import OneHot
    from .numpy.elman import ElmanRNN
    from .numpy.optim import SGD, Adam
    from .numpy.trainer import TBPTT

ENGINES = ("numpy", "torch")
REQUIRED = object()  # an option without a default
Ref = str | Callable  # a callable, or "module:name" imported when first used


@dataclass(frozen=True, kw_only=True)
class Option:
    """One option of a method.

    default: its value when not given (REQUIRED: must be given; a callable: of the other options).
    flag: the `tbptt train` flag that sets it (its Config field is the flag's name with "_").
    frozen: whether the frozen estimate takes it too (when to update, k1, is online only).
    engines: the engines that take it; shell: an option of the engine's trainer shell (the torch
    driver's amp and checkpoint), not of the rule.
    """

    name: str
    default: object = REQUIRED
    flag: str | None = None
    frozen: bool = True
    engines: tuple[str, ...] = ENGINES
    shell: bool = False
    needs: str = ""  # the message when a REQUIRED option is missing: "method X needs <needs>"

    @property
    def field(self) -> str | None:
        """The `tbptt train` configuration field the flag sets (--cut-every: cut_every)."""
        return None if self.flag is None else self.flag[2:].replace("-", "_")


@dataclass(frozen=True, kw_only=True)
class Method:
    """A way to compute each update's gradient, as every part of the project sees it."""

    name: str
    summary: str  # one line: what it computes, for --method's help
    options: tuple[Option, ...]
    rules: Mapping[str, Ref]  # engine -> rule factory: rule(**options) (no shell options)
    frozen: Ref | None = None  # numpy: frozen(model, x, y, h0, loss, *, mask, reset, **options)
    random: bool = False  # draws random numbers (its rng option); estimates differ draw to draw
    memory: Callable[[int, int, int, dict, int], float] | None = None  # floats per stream
    flops: Callable[[int, int, int, dict], float] | None = None  # per step and stream
    shown: Callable[[dict], dict] = field(default=lambda options: options)  # a label's options
    sweep: str | None = None  # the option a comparison varies (tbptt bias --method: a row each)

    def option(self, name: str) -> Option:
        return next(o for o in self.options if o.name == name)

    def option_names(self, engine: str = "numpy") -> tuple[str, ...]:
        return tuple(o.name for o in self.options if engine in o.engines)

    def label(self, options: dict) -> str:
        """e.g. 'artbp(c=0.1)' or 'tbptt(k1=4, k2=8)' (rng left out)."""
        shown = self.shown({k: v for k, v in options.items() if k != "rng"})
        args = ", ".join(f"{k}={getattr(v, '__name__', v)}" for k, v in shown.items())
        return f"{self.name}({args})" if args else self.name


METHODS: dict[str, Method] = {}


class OptionNames(Mapping):
    """The table as {method: the names of its options on one engine}, read live (OPTIONS)."""

    def __init__(self, engine: str) -> None:
        self.engine = engine

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return METHODS[name].option_names(self.engine)

    def __iter__(self):
        return iter(METHODS)

    def __len__(self) -> int:
        return len(METHODS)


OPTIONS = OptionNames("numpy")


def register(method: Method) -> Method:
    """Add a method to the table (or replace one of the same name): make_trainer, the torch
    engine's, frozen_gradients and the analysis then build it by name."""
    if not isinstance(method, Method):
        raise InputError(f"method must be a tbptt.methods.Method, got {type(method).__name__}")
    METHODS[method.name] = method
    return method


def get(name: object) -> Method:
    """The method called `name`, or InputError naming the choices."""
    if not isinstance(name, str) or name not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def resolve(ref: Ref) -> Callable:
    """A callable from a Ref ("package.module:name" is imported now)."""
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def check_options(name: object, options: dict, engine: str = "numpy") -> Method:
    """The method, after an InputError unless every option is one it takes on `engine` and every
    required one is given; the values are checked where they are used."""
    method = get(name)
    takes = method.option_names(engine)
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise InputError(
            f"method {method.name} does not take {', '.join(unknown)}; its options are "
            f"{', '.join(takes)}"
        )
    for o in method.options:
        if engine in o.engines and o.default is REQUIRED and o.name not in options:
            raise InputError(f"method {method.name} needs {o.needs or o.name}")
    if engine not in method.rules:
        raise InputError(f"method {method.name} has no rule for the {engine} engine")
    return method


def with_defaults(method: Method, options: dict, engine: str = "numpy") -> dict:
    """Every option the method takes on `engine`: the given ones, then the defaults."""
    out = dict(options)
    for o in method.options:
        if engine in o.engines and o.name not in out:
            out[o.name] = o.default(out) if callable(o.default) else o.default
    return out


def build_rule(name: str, options: dict, engine: str = "numpy") -> tuple[object, dict]:
    """(the rule of method `name` on `engine` built from its options, the shell's options)."""
    method = check_options(name, options, engine)
    full = with_defaults(method, options, engine)
    shell = {o.name for o in method.options if o.shell}
    rule = resolve(method.rules[engine])(**{k: v for k, v in full.items() if k not in shell})
    return rule, {k: options[k] for k in shell if k in options}


def make_trainer(
    method: str,
    model: ElmanRNN,
    optimizer: SGD | Adam,
    *,
    loss: str = "l2",
    clip: float | None = None,
    h0: Array | None = None,
    reduction: str = "sum",
    **options: object,
) -> TBPTT:
    """The numpy engine's online trainer of `method` with its options: a tbptt.TBPTT holding the
    method's rule, with feed(x, y, mask, reset), finish(), save(path), load(path), state_dict(),
    load_state_dict(state), model, updates."""
    from .numpy.trainer import TBPTT  # the engine reads this table only through its rules

    rule, _ = build_rule(method, options, "numpy")
    return TBPTT(model, rule, optimizer, loss=loss, clip=clip, h0=h0, reduction=reduction)


def frozen_gradients(
    method: str,
    model: ElmanRNN,
    x: Array | OneHot,
    y: Array,
    h0: Array | None = None,
    loss: str = "l2",
    *,
    mask: Array | None = None,
    reset: Array | None = None,
    **options: object,
) -> dict[str, Array]:
    """The frozen gradient estimate of `method` (parameters fixed over the sequence), keyed
    A, B, C[, b, c] (h0's gradient, which only tbptt.gradients gives, is left out)."""
    m = check_options(method, options, "numpy")
    if m.frozen is None:
        raise InputError(f"method {m.name} has no frozen estimate")
    online_only = {o.name for o in m.options if not o.frozen}
    given = {k: v for k, v in options.items() if k not in online_only}
    kw = {"h0": h0, "loss": loss, "mask": mask, "reset": reset}
    return resolve(m.frozen)(model, x, y, **kw, **given)


# -- the four methods ----------------------------------------------------------------------------
def mean_window(options: dict, T: int) -> float:
    """ARTBP's expected window length in steps, at most T: b sum_j prod_{i <= j} (1 - c_{ib})."""
    c, b = options["c"], int(options.get("b", 1))
    p: Callable[[int], float] = c if callable(c) else (lambda L: float(c))  # type: ignore
    cap = options.get("biased_max_length") or T
    total, survive, steps = 0.0, 1.0, 0
    while survive > 1e-12 and steps < min(T, cap):
        total += min(b, T - steps) * survive
        steps += b
        survive *= 1 - p(steps)
    return min(total, float(T))


# Cost models, per step and stream of the online trainer (estimators.py's columns):
#   F  = 2 (n^2 + n m + p n)           the forward step: A h, B x, C h
#   Bk = 2 (2 n^2 + n m + 2 p n)       a backward step: A^T r, C^T e and the products for A, B, C
#   |theta| = n (n + m + 1)            the recurrent parameters (SEMANTICS.md 8)
def _forward(n: int, m: int, p: int) -> float:
    return 2 * (n * n + n * m + p * n)


def _backward(n: int, m: int, p: int) -> float:
    return 2 * (2 * n * n + n * m + 2 * p * n)


def _theta(n: int, m: int) -> int:
    return n * (n + m + 1)


def _tbptt_shown(options: dict) -> dict:
    tr = truncation(options)
    return {"k1": tr.k1, "k2": tr.k2, **({"inject": tr.inject} if tr.inject != "new" else {})}


K1_ONLINE = Option(name="k1", default=1, flag="--k1", frozen=False)  # steps between updates
RNG = Option(name="rng", default=None, flag="--seed")  # a seed, a Generator or None
TORCH_SHELL = (
    Option(name="amp", default=False, engines=("torch",), shell=True),
    Option(name="checkpoint", default=False, engines=("torch",), shell=True),
)

register(
    Method(
        name="tbptt",
        summary="TBPTT(k1, k2): every k1 steps, backpropagate over the last k2",
        options=(
            Option(name="k1", flag="--k1", needs="k1 (and k2, which defaults to k1)"),
            Option(name="k2", default=lambda o: o["k1"], flag="--k2"),
            Option(name="inject", default="new", flag="--inject"),
            Option(name="flush", default=True),
            *TORCH_SHELL,
        ),
        rules={"numpy": "tbptt.numpy.tbptt:rule", "torch": "tbptt.torch.tbptt:rule"},
        frozen="tbptt.numpy.tbptt:frozen",
        memory=lambda n, m, p, o, T: float(truncation(o).k2 * (n + m + p)),  # x, h, e kept
        flops=lambda n, m, p, o: (
            _forward(n, m, p) + truncation(o).k2 / truncation(o).k1 * _backward(n, m, p)
        ),  # each step in k2/k1 windows
        shown=_tbptt_shown,
        sweep="k2",
    )
)
register(
    Method(
        name="rtrl",
        summary="real-time recurrent learning: the exact influence dh/dtheta carried forward, an "
        "update every k1 steps; small models only",
        options=(K1_ONLINE, Option(name="max_bytes", default=2**30)),
        rules={"numpy": "tbptt.numpy.rtrl:RTRLRule", "torch": "tbptt.torch.rtrl:RTRLRule"},
        frozen="tbptt.numpy.rtrl:rtrl_gradients",
        memory=lambda n, m, p, o, T: float(2 * n * _theta(n, m)),  # J and its buffer
        flops=lambda n, m, p, o: (
            _forward(n, m, p)  # A J, M_t, D_t, (C^T e)^T J; C's sums
            + 2 * n * n * _theta(n, m)
            + 4 * n * _theta(n, m)
            + 4 * p * n
        ),
    )
)
register(
    Method(
        name="uoro",
        summary="its unbiased rank-one approximation (an update every k1 steps)",
        options=(K1_ONLINE, RNG, Option(name="eps", default=1e-7)),
        rules={"numpy": "tbptt.numpy.uoro:UORORule", "torch": "tbptt.torch.uoro:UORORule"},
        frozen="tbptt.numpy.uoro:uoro_gradients",
        random=True,
        memory=lambda n, m, p, o, T: float(n + _theta(n, m)),  # s~ and theta~
        flops=lambda n, m, p, o: (
            _forward(n, m, p)  # A s~, Theta u, the rank-one terms, (8.10)
            + _backward(n, m, p)
            + 2 * n * n
            + 6 * _theta(n, m)
        ),
    )
)
register(
    Method(
        name="artbp",
        summary="truncation at random cuts with compensation, unbiased (an update at every cut)",
        options=(
            Option(
                name="c", flag="--cut", needs="c, the probability of a cut (or a callable of L)"
            ),
            Option(name="b", default=1, flag="--cut-every"),
            RNG,
            Option(name="biased_max_length", default=None, flag="--max-segment"),
            *TORCH_SHELL,
        ),
        rules={"numpy": "tbptt.numpy.artbp:ARTBPRule", "torch": "tbptt.torch.artbp:ARTBPRule"},
        frozen="tbptt.numpy.artbp:artbp_gradients",
        random=True,
        memory=lambda n, m, p, o, T: mean_window(o, T) * (n + m + p),  # the window's steps
        flops=lambda n, m, p, o: _forward(n, m, p) + _backward(n, m, p),  # as exact BPTT
        sweep="c",
    )
)
