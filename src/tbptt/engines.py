"""The two engines of `tbptt train` and `tbptt sample`, behind the calls the training loop makes.

The loop (tbptt/train.py) calls four methods: `set_lr(lr)` and `feed(x, y, mask, reset)` for each
update, which returns the chunk's mean loss, and `run(x, h, reset)` and `losses(z, y, mask)` for
validation (sampling, tbptt/sample.py, uses `run` too). Checkpoints go through `save(path)` and
`load(path)`; --adapt-k2 (numpy engine only) uses `k2`, `set_k2` and `suggest_k2`.

    NumpyEngine   tbptt.TBPTT on the seed's ElmanRNN (float32 or float64)
    TorchEngine   tbptt.torch.TBPTT on its ElmanRNN, or on torch.nn's RNN, GRU or LSTM with a
                  linear head; under torchrun each process takes its share of the streams

torch is imported only inside TorchEngine, so `import tbptt` (and this module) needs numpy only.
`make_engine(cfg, problem)` builds the one --engine asks for; `logits(engine, z)` turns either
engine's outputs into a float numpy array.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import config as cf
from .data import Problem
from .schedule import Truncation


def blas_threads(n: int) -> bool:
    """Limit numpy's OpenBLAS to n threads (what threadpoolctl does); False if none is loaded.

    The per-step products of a recurrent network are small: a second OpenBLAS thread gains a few
    percent on an idle machine and, waiting for a descheduled thread at every product, loses many
    times over on a busy one (docs/cli.md, --threads).
    """
    import ctypes
    import re

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    done = False
    for lib in sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps))):
        handle = ctypes.CDLL(lib)
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                     "scipy_openblas_set_num_threads", "openblas_set_num_threads"):  # fmt: skip
            if hasattr(handle, name):
                getattr(handle, name)(int(n))
                done = True
                break
    return done


# -- the two engines, behind the four calls the loop makes ------------------------------------------
class NumpyEngine:
    """tbptt.TBPTT on the seed's ElmanRNN (float32 or float64)."""

    suffix = "npz"
    rank, launch = 0, None  # torchrun: one process (TorchEngine splits the streams)

    def __init__(self, cfg: cf.Config, problem: Problem) -> None:
        import tbptt

        self.np_dtype = np.dtype(cfg.dtype)
        g = "softmax" if problem.loss == "cross_entropy" else "identity"
        model = tbptt.ElmanRNN.init(n=cfg.hidden, m=problem.m, p=problem.p, bias=cfg.bias,
            f=cfg.activation, g=g, dtype=np.dtype(cfg.dtype).type, seed=cfg.seed,
            spectral_radius=cfg.spectral_radius)  # fmt: skip
        opt = tbptt.Adam(lr=cfg.lr) if cfg.optimizer == "adam" else tbptt.SGD(lr=cfg.lr)
        trunc = tbptt.Truncation(cfg.k1, cfg.k2, inject=cfg.inject, flush=cfg.flush)
        self.driver = tbptt.TBPTT(model, trunc, opt, loss=problem.loss, clip=cfg.clip)
        blas_threads(cfg.threads)

    def set_lr(self, lr: float) -> None:
        from dataclasses import replace

        self.driver.optimizer = replace(self.driver.optimizer, lr=lr)

    def feed(self, x, y, mask, reset) -> float:
        return self.driver.feed(x, y, mask, reset)

    @property
    def k2(self) -> int:
        return self.driver.truncation.k2

    def set_k2(self, k2: int) -> None:
        """Go on with another k2; the next window reaches back as far as the steps still kept."""
        from dataclasses import replace

        self.driver.truncation = replace(self.driver.truncation, k2=k2)

    def suggest_k2(self, x, y, mask, reset, delta: float, k_max: int) -> int:
        """Aicher, Foti and Fox's K for the current parameters on a recent stretch (x of 2 k_max
        steps): the smallest k2 >= k1 whose estimated relative bias is at most delta."""
        from .bias import suggest_k

        K = suggest_k(self.driver.model, x, y, delta, loss=self.driver.loss, max_lag=k_max,
                      k_max=k_max, mask=mask, reset=reset)  # fmt: skip
        return max(K, self.driver.truncation.k1)

    def run(self, x, h=None, reset=None):
        """Forward only from h (None: zeros): outputs z (T, batch, p) and the last state."""
        from .elman import forward

        h = np.zeros((x.shape[1], self.driver.model.n), x.dtype) if h is None else h
        traj = forward(self.driver.model, x, h, reset, np.zeros_like(h))
        return traj.z, traj.h[-1]

    def losses(self, z, y, mask) -> np.ndarray:
        from .functions import loss_and_error

        return loss_and_error(self.driver.model.g, self.driver.loss, z, y, mask)[0]

    def save(self, path: Path) -> None:
        self.driver.save(path)

    def load(self, path: Path) -> None:
        shapes = {k: v.shape for k, v in self.driver.model.params.items()}
        self.driver.load(path)
        got = {k: v.shape for k, v in self.driver.model.params.items()}
        if got != shapes:
            raise ValueError(f"it holds parameters of shapes {got}; this run's are {shapes}")


class TorchEngine:
    """tbptt.torch.TBPTT on its ElmanRNN or on torch.nn's RNN, GRU, LSTM with a linear head."""

    suffix = "pt"

    def __init__(self, cfg: cf.Config, problem: Problem) -> None:
        import torch
        from torch import nn

        from .torch import TBPTT, ElmanRNN, Recurrent, cross_entropy_loss, l2_loss

        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here")
        # torchrun: join the job; this process's device and streams (tbptt/torch/distributed.py)
        from .torch.distributed import init_from_env

        self.launch = init_from_env(cfg.device)
        self.rank, self.streams = self.launch.rank, self.launch.streams(cfg.batch)
        self.torch, self.device = torch, self.launch.device
        torch.set_num_threads(cfg.threads)
        self.dtype, self.np_dtype = getattr(torch, cfg.dtype), np.dtype(cfg.dtype)
        torch.manual_seed(cfg.seed)
        m, p, n = problem.m, problem.p, cfg.hidden
        if cfg.cell == "elman":
            g = "softmax" if problem.loss == "cross_entropy" else "identity"
            model = ElmanRNN(n=n, m=m, p=p, bias=cfg.bias, f=cfg.activation, g=g, seed=cfg.seed)
            if cfg.spectral_radius is not None:  # as tbptt.ElmanRNN.init(spectral_radius=) does
                with torch.no_grad():
                    radius = torch.linalg.eigvals(model.A.double()).abs().max()
                    model.A *= cfg.spectral_radius / max(float(radius), 1e-12)
        else:
            rnn = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cfg.cell]
            model = Recurrent(rnn(m, n, num_layers=cfg.layers), nn.Linear(n, p))
        self.model = model.to(device=self.device, dtype=self.dtype)
        params = self.model.parameters()
        opt = (torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam"
               else torch.optim.SGD(params, lr=cfg.lr))  # fmt: skip
        self.loss_fn = cross_entropy_loss if problem.loss == "cross_entropy" else l2_loss
        trunc = Truncation(cfg.k1, cfg.k2, inject=cfg.inject, flush=cfg.flush)
        self.driver = TBPTT(self.model, trunc, opt, loss_fn=self.loss_fn, clip=cfg.clip)
        self.optimizer = opt

    def tensor(self, a, dtype=None):
        if a is None:
            return None
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        kind = dtype or (self.dtype if t.is_floating_point() else None)
        return t.to(device=self.device, dtype=kind)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def feed(self, x, y, mask, reset) -> float:
        x, y, mask, reset = (None if a is None else a[:, self.streams] for a in (x, y, mask, reset))
        y = self.tensor(y, self.torch.long if y.dtype.kind in "iu" else None)
        loss = float(self.driver.feed(self.tensor(x), y, self.tensor(mask), self.tensor(reset)))
        count = x.shape[0] * x.shape[1] if mask is None else float(mask.sum())
        return self.launch.mean(loss, count)  # torchrun: over all processes' streams

    def run(self, x, h=None, reset=None):
        with self.torch.no_grad():
            out, h = self.model(self.tensor(x), h)  # validation and sampling never reset mid-run
        return out, h

    def losses(self, z, y, mask) -> np.ndarray:
        y = self.tensor(y, self.torch.long if y.dtype.kind in "iu" else None)
        with self.torch.no_grad():
            l = self.loss_fn(z, y).double().cpu().numpy()  # (T, batch)
        return l if mask is None else l * mask

    def save(self, path: Path) -> None:
        self.driver.save(path)

    def load(self, path: Path) -> None:
        self.driver.load(path)


def make_engine(cfg: cf.Config, problem: Problem):
    if cfg.engine == "numpy" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("under torchrun, use --engine torch (the numpy engine runs one process)")
    return NumpyEngine(cfg, problem) if cfg.engine == "numpy" else TorchEngine(cfg, problem)


def logits(engine, z) -> np.ndarray:
    return np.asarray(z.detach().cpu().double().numpy() if hasattr(z, "detach") else z, float)
