"""The two engines of `tbptt train` and `tbptt sample`, behind one written interface.

`Engine` is everything the training loop (train.py), validation, sampling (sample.py) and the run
directory (rundir.py) ask of an engine; both engines implement all of it, so none of them needs to
know which engine it holds:

    NumpyEngine   tbptt.TBPTT on the seed's ElmanRNN (float32 or float64)
    TorchEngine   tbptt.torch's TBPTT, RTRL, UORO or ARTBP on its ElmanRNN, on torch.nn's RNN,
                  GRU or LSTM with a linear head, or on a ScanLM of minGRU or LRU blocks (token
                  ids into its embedding, or vectors into its input projection); under torchrun
                  each process takes its share of the streams

torch is imported only inside TorchEngine, so this module needs numpy only. `make_engine(cfg,
problem)` builds the one --engine asks for.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import InputError
from ..inputs import OneHot
from ..methods import METHODS, make_trainer
from ..numpy.trainer import TBPTT
from ..schedule import Truncation
from . import config as cf
from .data import Problem

if TYPE_CHECKING:
    from torch import Tensor

    from ..torch import TBPTT as TorchTBPTT

Array = np.ndarray


class Engine(Protocol):
    """What the application calls on an engine (both engines implement every method)."""

    suffix: str  # the state file's extension: "npz" or "pt"
    rank: int  # this process's rank under torchrun; 0 for a single process
    np_dtype: np.dtype  # the floating type of inputs and parameters

    @property
    def steps(self) -> int:
        """Steps of every stream trained on so far (restored by load)."""
        ...

    @property
    def k2(self) -> int | None:
        """The k2 in force (--adapt-k2 may change it); None for the methods without one."""
        ...

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next updates."""
        ...

    def train(self, x: Array, y: Array, mask: Array | None, reset: Array | None) -> float:
        """Train on the next chunk of every stream; its mean loss over all streams (and
        processes)."""
        ...

    def run(
        self, x: Array | OneHot, h: object = None, reset: Array | None = None
    ) -> tuple[object, object]:
        """Forward only from h (None: zeros), restarting where reset says: outputs z and the
        last state, in the engine's own types."""
        ...

    def losses(self, z: object, y: Array, mask: Array | None) -> Array:
        """Per-step, per-stream losses (T, batch) of outputs z, as float64 numpy."""
        ...

    def logits(self, z: object) -> Array:
        """Outputs z as a float64 numpy array (T, batch, p)."""
        ...

    def agree(self, seconds: float, stop: bool) -> tuple[float, bool]:
        """The slowest process's seconds and whether any process was asked to stop (torchrun);
        as given for a single process."""
        ...

    def save(self, path: Path | None) -> None:
        """Write the engine's full state (under torchrun a collective call; rank 0 writes)."""
        ...

    def load(self, path: Path, config: Path | None = None) -> None:
        """Restore what save wrote; InputError naming the file if it is damaged or from another
        run (and naming the settings of `config`, the file they came from, when it holds
        another model)."""
        ...


class AdaptsK2(Engine, Protocol):
    """An engine that --adapt-k2 can drive (the numpy engine's: config refuses the flag with the
    torch engine, whose lag analysis is numpy's)."""

    def adapt_k2(self, x, y, mask, reset, delta: float, k_max: int) -> int:
        """Go on with the smallest k2 >= k1 whose estimated relative bias on this stretch is at
        most delta; returns it."""
        ...

    def set_k2(self, k2: int) -> None:
        """Go on with another k2 (a resumed run's)."""
        ...


def blas_threads(n: int) -> bool:
    """Limit numpy's OpenBLAS to n threads (what threadpoolctl does); False if none is loaded.

    The per-step products of a recurrent network are small: a second OpenBLAS thread gains a few
    percent on an idle machine and, waiting for a descheduled thread at every product, loses many
    times over on a busy one (docs/cli.md, --threads).
    """
    import ctypes
    import re

    try:
        # (the paths of mapped files, --data's among them, may be any bytes)
        maps = Path("/proc/self/maps").read_text(errors="surrogateescape")
    except OSError:
        return False
    names = (
        "scipy_openblas_set_num_threads64_",
        "openblas_set_num_threads64_",
        "scipy_openblas_set_num_threads",
        "openblas_set_num_threads",
    )
    done = False
    for lib in sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps))):
        handle = ctypes.CDLL(lib)
        setter = next((getattr(handle, k) for k in names if hasattr(handle, k)), None)
        if setter is not None:
            setter(int(n))
            done = True
    return done


class Trains(Protocol):
    """What _Driven reads of a trainer (tbptt.TBPTT or tbptt.torch.TBPTT, with any rule)."""

    t: int

    @property
    def truncation(self) -> Truncation | None: ...
    def save(self, path: Path | None) -> None: ...
    def load(self, path: Path) -> None: ...


class _Driven:
    """What both engines do the same way: through their trainer (tbptt.TBPTT or tbptt.torch.TBPTT,
    holding the rule of --method)."""

    driver: Trains
    method: str

    @property
    def steps(self) -> int:
        return self.driver.t

    @property
    def k2(self) -> int | None:
        tr = self.driver.truncation
        return tr.k2 if tr is not None and "k2" in METHODS[self.method].option_names() else None

    def save(self, path: Path | None) -> None:
        self.driver.save(path)

    def load(self, path: Path, config: Path | None = None) -> None:
        self.driver.load(path)


class NumpyEngine(_Driven):
    """tbptt.TBPTT on the seed's ElmanRNN (float32 or float64)."""

    suffix = "npz"
    rank = 0  # one process (TorchEngine splits the streams under torchrun)

    def __init__(self, cfg: cf.Config, problem: Problem) -> None:
        import tbptt

        self.np_dtype = np.dtype(cfg.dtype)
        g = "softmax" if problem.loss == "cross_entropy" else "identity"
        model = tbptt.ElmanRNN.init(
            n=cfg.hidden,
            m=problem.m,
            p=problem.p,
            bias=cfg.bias,
            f=cfg.activation,
            g=g,
            dtype=self.np_dtype.type,
            seed=cfg.seed,
            spectral_radius=cfg.spectral_radius,
        )
        assert cfg.lr is not None and cfg.threads is not None  # config.check resolved them
        opt = tbptt.Adam(lr=cfg.lr) if cfg.optimizer == "adam" else tbptt.SGD(lr=cfg.lr)
        self.method = cfg.method
        self.driver: TBPTT = make_trainer(
            cfg.method, model, opt, loss=problem.loss, clip=cfg.clip, **cf.method_options(cfg)
        )
        blas_threads(cfg.threads)

    def set_lr(self, lr: float) -> None:
        self.driver.optimizer = replace(self.driver.optimizer, lr=lr)

    def train(self, x, y, mask, reset) -> float:
        return self.driver.feed(x, y, mask, reset)

    def adapt_k2(self, x, y, mask, reset, delta: float, k_max: int) -> int:
        """Aicher, Foti and Fox's K for the current parameters on a recent stretch (x of 2 k_max
        steps): go on with the smallest k2 >= k1 whose estimated relative bias is at most delta.
        The next window reaches back as far as the steps still kept."""
        from ..analysis.bias import suggest_k

        K = suggest_k(
            self.driver.model,
            x,
            y,
            delta,
            loss=self.driver.loss,
            max_lag=k_max,
            k_max=k_max,
            mask=mask,
            reset=reset,
        )
        k2 = max(K, self._truncation().k1)
        self.set_k2(k2)
        return k2

    def set_k2(self, k2: int) -> None:
        """The next window reaches back as far as the steps still kept."""
        self.driver.truncation = replace(self._truncation(), k2=k2)

    def _truncation(self) -> Truncation:
        tr = self.driver.truncation
        assert tr is not None  # config refuses --adapt-k2 for methods without a schedule
        return tr

    def run(self, x, h=None, reset=None):
        from ..numpy.elman import forward

        h = np.zeros((x.shape[1], self.driver.model.n), self.np_dtype) if h is None else h
        traj = forward(self.driver.model, x, h, reset, np.zeros_like(h))
        return traj.z, traj.h[-1]

    def losses(self, z, y, mask) -> Array:
        from ..numpy.functions import loss_and_error

        return loss_and_error(self.driver.model.g, self.driver.loss, z, y, mask)[0]

    def logits(self, z) -> Array:
        return np.asarray(z, np.float64)

    def agree(self, seconds: float, stop: bool) -> tuple[float, bool]:
        return seconds, stop


class TorchEngine(_Driven):
    """tbptt.torch's trainer of --method on its ElmanRNN or on torch.nn's RNN, GRU, LSTM with a
    linear head."""

    suffix = "pt"

    def __init__(self, cfg: cf.Config, problem: Problem) -> None:
        import torch
        from torch import nn

        from ..torch import ElmanRNN, Recurrent, ScanLM, cross_entropy_loss, l2_loss
        from ..torch.distributed import init_from_env
        from ..torch.methods import make_trainer as make_torch_trainer

        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available here")
        self.launch = init_from_env(cfg.device)  # torchrun: join the job (distributed.py)
        assert cfg.lr is not None and cfg.threads is not None  # config.check resolved them
        assert cfg.batch is not None
        self.rank, self.streams = self.launch.rank, self.launch.streams(cfg.batch)
        self.torch, self.device = torch, self.launch.device
        assert cfg.layers is not None  # config.check resolved it
        torch.set_num_threads(cfg.threads)
        self.dtype, self.np_dtype = getattr(torch, cfg.dtype), np.dtype(cfg.dtype)
        torch.manual_seed(cfg.seed)
        m, p, n = problem.m, problem.p, cfg.hidden
        # integer inputs (tbptt.OneHot) as ids: B x_t looked up, or ScanLM's embedding
        self.ids = cfg.cell in ("elman", *cf.SCAN_CELLS)
        if cfg.cell == "elman":
            g = "softmax" if problem.loss == "cross_entropy" else "identity"
            elman = ElmanRNN(n=n, m=m, p=p, bias=cfg.bias, f=cfg.activation, g=g, seed=cfg.seed)
            if cfg.spectral_radius is not None:  # as tbptt.ElmanRNN.init(spectral_radius=) does
                with torch.no_grad():
                    radius = torch.linalg.eigvals(elman.A.double()).abs().max()
                    elman.A.mul_(cfg.spectral_radius / max(float(radius), 1e-12))
            model = elman
        elif cfg.cell in cf.SCAN_CELLS:  # text: ids into the embedding; else an input projection
            model = ScanLM(cfg.cell, m, n, p, num_layers=cfg.layers, tokens=cfg.text)
        else:
            rnn = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cfg.cell]
            model = Recurrent(rnn(m, n, num_layers=cfg.layers), nn.Linear(n, p))
        self.model = model.to(device=self.device, dtype=self.dtype)
        params = self.model.parameters()
        if cfg.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr)
        else:
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr)
        self.loss_fn = cross_entropy_loss if problem.loss == "cross_entropy" else l2_loss
        self.method = cfg.method
        self.settings = {"cell": cfg.cell, "hidden": n, "layers": cfg.layers, "dtype": cfg.dtype}
        self.driver: TorchTBPTT = make_torch_trainer(
            cfg.method,
            self.model,
            self.optimizer,
            loss_fn=self.loss_fn,
            clip=cfg.clip,
            **cf.method_options(cfg),
        )

    def _tensor(self, a: Array | OneHot, dtype=None) -> Tensor:
        if isinstance(a, OneHot):  # the elman cell looks its ids up; torch.nn's cells read x
            return self._tensor(a.ids) if self.ids else self._tensor(a.dense(self.np_dtype.type))
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        kind = dtype or (self.dtype if t.is_floating_point() else None)
        return t.to(device=self.device, dtype=kind)

    def _maybe(self, a: Array | None) -> Tensor | None:
        return None if a is None else self._tensor(a)

    def _targets(self, y: Array) -> Tensor:
        return self._tensor(y, self.torch.long if y.dtype.kind in "iu" else None)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train(self, x, y, mask, reset) -> float:
        mine = self.streams  # this process's streams (torchrun)
        x_, y_ = self._tensor(x[:, mine]), self._targets(y[:, mine])
        mask_ = None if mask is None else self._tensor(mask[:, mine])
        reset_ = None if reset is None else self._tensor(reset[:, mine])
        return float(self.driver.feed(x_, y_, mask_, reset_))

    def run(self, x, h=None, reset=None):
        return self.driver.predict(self._tensor(x), h, self._maybe(reset))

    def losses(self, z, y, mask) -> Array:
        with self.torch.no_grad():
            l = self.loss_fn(z, self._targets(y)).double().cpu().numpy()  # (T, batch)
        return l if mask is None else l * mask

    def logits(self, z) -> Array:
        return z.detach().cpu().double().numpy()

    def agree(self, seconds: float, stop: bool) -> tuple[float, bool]:
        return self.launch.agree(seconds, stop)

    def load(self, path: Path, config: Path | None = None) -> None:
        """Read the file here (one line if torch cannot), check that it holds this run's model
        (one line naming the settings that differ), then restore it; under torchrun the
        collective load of tbptt.torch, where rank 0 reads."""
        if self.launch.world > 1:
            self.driver.load(path)
            return
        sd = read_torch_state(path)
        saved = sd.get("model") if isinstance(sd, dict) else None
        if isinstance(saved, dict):  # else the driver's own check names what is missing
            self._check_model(saved, path, config or Path("config.toml"))
        self.driver.load_state_dict(sd)

    def _check_model(self, saved: dict, path: Path, config: Path) -> None:
        """The saved model's parameters against this one's: names, shapes and dtype."""
        ours = self.model.state_dict()
        same = saved.keys() == ours.keys() and all(
            getattr(saved[k], "shape", None) == v.shape for k, v in ours.items()
        )
        if same and all(getattr(saved[k], "dtype", None) == v.dtype for k, v in ours.items()):
            return
        theirs = model_settings(saved)
        if theirs is not None:
            differ = [k for k in self.settings if theirs[k] != self.settings[k]]
            if differ:
                have = ", ".join(f"{k} = {theirs[k]!r}" for k in differ).replace("'", '"')
                want = ", ".join(f"{k} = {self.settings[k]!r}" for k in differ).replace("'", '"')
                raise InputError(
                    f"{path} holds another model ({have}) than {config} sets ({want}): it is "
                    "not a state of this run"
                )
        raise InputError(
            f"{path} holds another model than {config} sets "
            f"({', '.join(f'{k} = {v!r}' for k, v in self.settings.items())}): its parameters "
            f"are {_shapes(saved)}, this run's {_shapes(ours)}"
        )


def read_torch_state(path: Path) -> dict:
    """A saved torch state, read with weights_only=True (no arbitrary unpickling) onto the CPU;
    one line naming the file when torch cannot read it (cut short, not a checkpoint, holding
    objects), never a suggestion to load it unsafely."""
    import pickle
    import zipfile

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
        KeyError,
    ) as exc:
        text = str(exc).strip()
        why = text.splitlines()[0] if text else type(exc).__name__
        if isinstance(exc, OSError):  # a zip archive cut short: torch's seek fails
            why = f"cut short or unreadable: {why}"
        if "weights_only" in text or "Weights only load failed" in text:
            why = "it holds objects other than tensors and plain values"
        raise InputError(f"{path} is damaged or not a tbptt checkpoint ({why})") from None


def model_settings(saved: dict) -> dict | None:
    """cell, hidden, layers and dtype of a saved model of the app's (tbptt.torch's ElmanRNN,
    Recurrent around nn.RNN, GRU or LSTM, or ScanLM), read from its parameters; None for another
    module."""
    first = next(iter(saved.values()), None)
    dtype = str(getattr(first, "dtype", "")).removeprefix("torch.")
    if {"A", "B", "C"} <= saved.keys():
        return {"cell": "elman", "hidden": saved["A"].shape[0], "layers": 1, "dtype": dtype}
    norm = saved.get("blocks.0.norm.weight")  # ScanLM: (d,), its blocks' mix the cell
    if norm is not None and len(norm.shape) == 1:
        cell = "mingru" if "blocks.0.mix.linear_z.weight" in saved else "lru"
        layers = sum(1 for k in saved if k.startswith("blocks.") and k.endswith(".norm.weight"))
        return {"cell": cell, "hidden": norm.shape[0], "layers": layers, "dtype": dtype}
    hh = saved.get("rnn.weight_hh_l0")
    if hh is None or len(hh.shape) != 2 or hh.shape[1] == 0:
        return None
    gates = hh.shape[0] // hh.shape[1]
    cell = {1: "rnn", 3: "gru", 4: "lstm"}.get(gates)
    layers = sum(1 for k in saved if k.startswith("rnn.weight_hh_l"))
    if cell is None:
        return None
    return {"cell": cell, "hidden": hh.shape[1], "layers": layers, "dtype": dtype}


def scan_sizes(cell: str, m: int, p: int, d: int, layers: int, tokens: bool) -> tuple[int, int]:
    """The parameters of tbptt.torch.ScanLM(cell, m, d, p, num_layers=layers, tokens=tokens)
    (expand 2, state size d) and the real numbers of its state per stream (the LRU's complex h
    counts twice), written out from its layers."""
    embed = m * d if tokens else m * d + d  # nn.Embedding(m, d), or nn.Linear(m, d)
    if cell == "mingru":
        mix, state = 2 * (d * d + d), d  # linear_z, linear_h
    else:
        mix, state = 3 * d + 4 * d * d + d, 2 * d  # nu, theta, gamma; B, C (re, im); D
    block = 2 * 2 * d + mix + (d * 4 * d + 4 * d) + (2 * d * d + d)  # norms, mix, ff_in, ff_out
    return embed + layers * block + 2 * d + d * p + p, layers * state


def _shapes(state: dict) -> str:
    return ", ".join(f"{k} {tuple(getattr(v, 'shape', ()))}" for k, v in list(state.items())[:4])


def make_engine(cfg: cf.Config, problem: Problem) -> Engine:
    if cfg.engine == "numpy" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("under torchrun, use --engine torch (the numpy engine runs one process)")
    check_influence(cfg, problem.m, problem.p)
    return NumpyEngine(cfg, problem) if cfg.engine == "numpy" else TorchEngine(cfg, problem)


def check_influence(cfg: cf.Config, m: int, p: int = 1) -> None:
    """--method rtrl: refuse, naming the flags, a model whose influence matrix J = dh/dtheta
    (streams x state entries x |theta|, with the buffers beside it: 2 copies in numpy's RTRL, 3 in
    torch's) would exceed what the library allows by default (tbptt.methods' max_bytes), before
    anything is built; the library would refuse it too, naming its own argument."""
    if cfg.method != "rtrl":
        return
    limit = next(o.default for o in METHODS["rtrl"].options if o.name == "max_bytes")
    assert isinstance(limit, int)
    n, layers = cfg.hidden, cfg.layers
    assert layers is not None  # config.check resolved it
    if cfg.cell == "elman":  # theta = A, B, b
        state, theta = n, n * (n + m + int(cfg.bias))
    elif cfg.cell in cf.SCAN_CELLS:  # every parameter of the ScanLM (its head's included)
        theta, state = scan_sizes(cfg.cell, m, p, n, layers, cfg.text)
    else:  # Recurrent: theta = the rnn's weights and both biases of every layer
        gates = {"rnn": 1, "gru": 3, "lstm": 4}[cfg.cell]
        state = layers * n * (2 if cfg.cell == "lstm" else 1)  # (h, c) of an LSTM
        theta = sum(gates * n * ((m if k == 0 else n) + n + 2) for k in range(layers))
    copies = 2 if cfg.engine == "numpy" else 3
    world = int(os.environ.get("WORLD_SIZE", "1")) if cfg.engine == "torch" else 1
    assert cfg.batch is not None  # config.check resolved it
    entries = cfg.batch // max(world, 1) * state * theta  # each torchrun process: its streams
    need = copies * entries * np.dtype(cfg.dtype).itemsize
    if need > limit:
        raise InputError(
            f"--method rtrl carries the influence matrix dh/dtheta of {cfg.batch // world} "
            f"streams x {state} state entries x {theta:,} parameters = {entries:,} numbers, "
            f"{need / 2**30:,.1f} GiB with its buffers in {cfg.dtype}, more than the "
            f"{limit / 2**30:g} GiB it may take: lower --hidden {n} or --batch {cfg.batch}, or "
            "choose --method uoro or artbp"
        )


def memory_needed(cfg: cf.Config, m: int = 1, p: int = 1) -> tuple[int, str]:
    """A lower bound of the bytes a run allocates, and what dominates it: only arrays the engine
    cannot do without (parameters and the optimizer's moments, the kept steps, one chunk of data,
    a task's validation set), so a run refused by it could not have fit. m and p are the data's
    inputs and outputs (before the data is read: 1, a lower bound)."""
    s = np.dtype(cfg.dtype).itemsize
    n, B = cfg.hidden, cfg.batch
    assert B is not None  # config.check resolved it
    # steps held at once: the next window and the steps since the update (no more than the run's)
    kept = cfg.k1 + min(cfg.k2, cfg.max_updates * cfg.k1 if cfg.max_updates else cfg.k2)
    assert cfg.layers is not None  # config.check resolved it
    if cfg.cell == "elman":
        params = n * n + n * m + p * n + n + p
        per_step = B * (m + 3 * n + 2 * p)  # x_t, h_t, f'(a_t), r_t, e_t, z_t
    elif cfg.cell in cf.SCAN_CELLS:
        params, _ = scan_sizes(cfg.cell, m, p, n, cfg.layers, cfg.text)
        # per block: its two norms' inputs, the scan's gates and states (the LRU's complex b and
        # h), the GLU's input and product (expand 2): what autograd keeps of a step
        mix = 3 * n if cfg.cell == "mingru" else 5 * n
        per_step = B * ((1 if cfg.text else m) + 2 * p + cfg.layers * (4 * n + 6 * n + mix))
    else:
        gates = {"rnn": 1, "gru": 3, "lstm": 4}[cfg.cell]
        params = gates * n * (m + n + 2) * cfg.layers + p * (n + 1)
        per_step = B * (m + 2 * p + (gates + 2) * n * cfg.layers)  # activations autograd keeps
    parts = {
        "parameters and optimizer state": 4 * params * s,
        f"{kept} kept steps x {B} streams": kept * per_step * s,
        f"a chunk of {cfg.k1} steps": cfg.k1 * B * (m + p) * s,
    }
    if cfg.task in ("adding", "copy"):  # 256 validation sequences of about --length steps
        T = int(cfg.length * 1.1) + 20
        parts[f"the validation set of --length {cfg.length}"] = 256 * T * (m + p + 2) * 8
    what = max(parts, key=lambda k: parts[k])
    return int(sum(parts.values())), what
