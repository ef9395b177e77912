"""Data-parallel TBPTT(k1, k2) over processes and machines with torch.distributed (SEMANTICS.md 4-6).

Each process (rank r of W) owns a disjoint set S_r of the batch's streams and runs the driver on
them; every rank feeds chunks of the same lengths, so the schedule (4.1)-(4.3) has the same phase
everywhere. The loss is the contract's sum over steps and streams, taken over all streams of all
ranks, and each update applies its gradient:

    (D.1)  L_W = sum_r sum_{j in S_r} sum_{t in I} l_t^j          the window's loss, all streams
    (D.2)  g   = dL_W/dtheta = sum_r g_r                           g_r: rank r's own streams (5.3)

so the ranks' gradients are SUMMED, not averaged: W processes with B/W streams each take the same
steps as one process with all B streams (DistributedDataParallel averages, which is right for a
mean loss; the driver's loss is a sum). Per update there is one all-reduce of the flattened
gradient (one per dtype and device), after the whole window was backpropagated (all its segments,
on either path of driver.py) and before unscaling, clipping and optimizer.step: clipping sees the
global norm, and every rank takes the same step. A model wrapped in DistributedDataParallel is
accepted: the driver runs its `.module` and uses its process group, so DDP's own reducer never
fires (as if every backward ran under `no_sync()`), and the driver's all-reduce is the only one.

Two small all-reduces (MAX) keep the ranks in step: one when the driver is made (the same
schedule and parameter shapes everywhere; then the parameters and buffers are broadcast from rank
0, as DDP does), one before each update and after each chunk (every rank at the same step t, and
a non-finite loss on any rank stops all of them at the same update). A collective that fails (a
process died, or stopped answering within the process group's timeout) raises DistributedError.

Checkpoints (resume.py's format, unchanged): rank 0 gathers the per-stream parts (the carried
state, the kept segments' inputs, targets, masks, resets and entering states) along the stream
axis, writes the file atomically, and a barrier tells every rank it is complete. The file is a
single-process checkpoint over all B streams, plus each rank's RNG states under "ranks": a
single process loads it as it is, and W' processes load it when W' divides B, rank r taking
streams r B/W' .. (r+1) B/W' - 1.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import state as st
from .resume import FORMAT, driver_state, load, save

if TYPE_CHECKING:
    from .driver import TBPTT

Tensor = torch.Tensor
PER_STREAM = ("x", "y", "mask", "reset")  # segment records with a stream axis, besides state_in
DEFAULT_TIMEOUT = 600.0  # seconds a collective may wait for the other ranks (TBPTT_TIMEOUT)


class DistributedError(RuntimeError):
    """A collective failed: another process died, or did not answer within the timeout."""


def _dist():
    import torch.distributed as dist

    return dist


def resolve(model: nn.Module, process_group: object) -> tuple[nn.Module, Comm | None]:
    """The module the driver runs and how its ranks talk (None: a single process).

    process_group None: a DistributedDataParallel model's group, else the default group when
    torch.distributed is initialized; False: no communication; or a ProcessGroup.
    """
    from torch.nn.parallel import DistributedDataParallel

    ddp = isinstance(model, DistributedDataParallel)
    inner = model.module if ddp else model
    dist = _dist()
    available = dist.is_available()
    if process_group is False:
        if ddp:
            raise ValueError(
                "process_group=False with a DistributedDataParallel model: the model trains with "
                "its process group; pass process_group=None, or the unwrapped model"
            )
        return inner, None
    if process_group is None:
        if ddp:
            group = model.process_group
        elif available and dist.is_initialized():
            group = dist.group.WORLD
        else:
            return inner, None
    elif available and isinstance(process_group, dist.ProcessGroup):
        group = process_group
    else:
        raise TypeError(
            "process_group must be None (automatic), False (a single process) or a "
            f"torch.distributed.ProcessGroup, got {type(process_group).__name__}"
        )
    if dist.get_world_size(group) == 1:
        return inner, None
    return inner, Comm(group)


class Comm:
    """The driver's side of a process group: the few collectives of the module docstring."""

    def __init__(self, group: Any) -> None:
        dist = _dist()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.src = dist.get_global_rank(group, 0)  # the global rank of the group's rank 0
        nccl = dist.get_backend(group) == "nccl"  # where the small tensors of the checks go:
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        )

    def _call(self, what: str, fn: Callable, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except RuntimeError as exc:  # gloo, NCCL: a peer died, timed out, or called otherwise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(
                f"process {self.rank} of {self.world}: {what} failed: another process died, did "
                f"not answer within the process group's timeout, or is elsewhere in the run ({first})"
            ) from exc

    def _spread(self, values: list[int], what: str) -> list[tuple[int, int]]:
        """(min, max) over the ranks of each value: one MAX all-reduce of (v, -v)."""
        v = torch.tensor(values, dtype=torch.int64, device=self.device)
        both = torch.cat([v, -v])
        self._call(what, _dist().all_reduce, both, op=_dist().ReduceOp.MAX, group=self.group)
        n = len(values)
        hi, lo = both[:n].tolist(), (-both[n:]).tolist()
        return list(zip(lo, hi, strict=True))

    def setup(self, d: TBPTT) -> None:
        """Check that every rank runs the same schedule and model; give all rank 0's values."""
        tr = d.truncation
        params = list(d._named.values())
        names = ("k1", "k2", "inject", "flush", "batch_first", "parameters", "parameter elements")
        inject = ("new", "window", "last").index(tr.inject)
        ours = [tr.k1, tr.k2, inject, int(tr.flush), int(d.batch_first), len(params)]
        ours.append(sum(p.numel() for p in params))
        spread = self._spread(ours, "the check of the driver's settings")
        for name, (lo, hi) in zip(names, spread, strict=True):
            if lo != hi:
                raise ValueError(
                    f"the processes disagree on {name} (from {lo} to {hi}): every rank must make "
                    "the same model and the same tbptt.Truncation"
                )
        tensors = [*d.model.parameters(), *d.model.buffers()]
        with torch.no_grad():
            for ts in _by_kind(tensors).values():
                flat = torch.cat([t.detach().reshape(-1) for t in ts])
                self._call(
                    "the broadcast of the initial parameters", _dist().broadcast, flat,
                    src=self.src, group=self.group,
                )  # fmt: skip
                for t, part in zip(ts, flat.split([t.numel() for t in ts]), strict=True):
                    t.copy_(part.view_as(t))

    def check_step(self, t: int, finite: bool, n: int) -> bool:
        """Every rank at step t (raise if not); True when the losses are finite on all ranks."""
        (_, bad), (t_lo, t_hi) = self._spread([int(not finite), t], f"the check before update {n}")
        if t_lo != t_hi:
            raise ValueError(
                f"the processes are at different steps of the stream (t from {t_lo} to {t_hi}) "
                f"before update {n}: every rank must feed chunks of the same lengths, so that "
                "the schedule's update times are the same everywhere"
            )
        return not bad

    def sum_grads(self, params: list[Tensor], n: int) -> None:
        """(D.2): p.grad <- sum over the ranks, one all-reduce per dtype and device.

        A parameter keeps grad None only when it has none on every rank (one flag per parameter
        travels with the gradients).
        """
        for ps in _by_kind(params).values():
            for p in ps:
                if p.grad is not None and p.grad.is_sparse:
                    raise TypeError("sparse gradients cannot be summed over processes here")
            parts = [
                p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in ps
            ]
            flags = torch.tensor([float(p.grad is not None) for p in ps], dtype=ps[0].dtype)
            flat = torch.cat([*parts, flags.to(ps[0].device)])
            self._call(
                f"the gradient all-reduce of update {n}", _dist().all_reduce, flat,
                group=self.group,
            )  # fmt: skip
            present = flat[-len(ps) :].tolist()
            grads = flat[: -len(ps)].split([p.numel() for p in ps])
            for p, g, f in zip(ps, grads, present, strict=True):
                p.grad = g.view_as(p) if f > 0 else None

    def barrier(self, ok: bool, what: str) -> bool:
        """Wait for every rank; True when every rank says ok."""
        (lo, _), = self._spread([int(ok)], what)  # fmt: skip
        return lo == 1

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self, d: TBPTT) -> dict | None:
        """The run's state over all streams on rank 0 (module docstring), None on the others."""
        sd = driver_state(d)
        local = {
            "batch": sd["batch"],
            "state": sd["state"],
            "rng": sd["rng"],
            "device_rng": sd["device_rng"],
            "segments": [
                {k: r[k] for k in (*PER_STREAM, "state_in", "rng", "device_rng")}
                for r in sd["segments"]
            ],
        }
        local = _cpu(local)
        parts = [None] * self.world if self.rank == 0 else None
        self._call(
            "gathering the checkpoint", _dist().gather_object, local, parts, dst=self.src,
            group=self.group,
        )  # fmt: skip
        if self.rank != 0:
            return None
        return _merge(d, sd, parts)

    def local_state(self, d: TBPTT, sd: dict | None) -> dict:
        """Rank 0's global state, broadcast; this rank's streams of it (module docstring)."""
        box = [sd if self.rank == 0 else None]
        self._call(
            "broadcasting the checkpoint", _dist().broadcast_object_list, box, src=self.src,
            group=self.group,
        )  # fmt: skip
        sd = box[0]
        if isinstance(sd, str):  # rank 0 could not read it: the message
            raise ValueError(sd)
        return _split(d, sd, self.rank, self.world)

    def save(self, d: TBPTT, path: str | os.PathLike | None) -> None:
        """Rank 0 writes the gathered state atomically; no rank returns before the file is whole."""
        error: BaseException | None = None
        try:
            sd = self.state_dict(d)
            if self.rank == 0:
                if path is None:
                    raise TypeError("path must be a file name on rank 0, got None")
                save(sd, path)
        except DistributedError:
            raise
        except Exception as exc:  # tell the others, then raise it here
            error = exc
        if not self.barrier(error is None, "the barrier after writing the checkpoint"):
            if error is not None:
                raise error
            raise DistributedError(
                f"process {self.rank} of {self.world}: the checkpoint was not written, another "
                "process failed while gathering or writing it (its error is in its output)"
            )

    def load(self, path: str | os.PathLike | None) -> dict | str | None:
        """Rank 0 reads the file (weights_only); a message instead when it cannot."""
        if self.rank != 0:
            return None
        try:
            return load(path)
        except Exception as exc:
            return f"cannot read checkpoint {os.fspath(path) if path else path}: {exc}"


def _by_kind(tensors: list[Tensor]) -> dict[tuple, list[Tensor]]:
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def _cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _stream_axis(d: TBPTT) -> int:
    """The stream axis of x, y, masks and resets: 1 time-major, 0 batch-first."""
    return 1 - d._tdim


def _state_dims(d: TBPTT, state: st.State, batch: int) -> list[int]:
    dims = d._batch_dims(state)
    return dims if dims is not None else [st.batch_dim(t, batch) for t in st.leaves(state)]


def _cat(values: list[Tensor | None], ax: int, counts: list[int], fill: int) -> Tensor | None:
    """The ranks' records side by side on the stream axis ax; a rank's None (no mask: weights
    1, no reset: False) becomes `fill` where another rank has a tensor."""
    like = next((v for v in values if v is not None), None)
    if like is None:
        return None
    full = lambda n: torch.full(  # noqa: E731
        [n if a == ax else s for a, s in enumerate(like.shape)], fill, dtype=like.dtype
    )
    return torch.cat([full(n) if v is None else v for v, n in zip(values, counts, strict=True)], ax)


def _merge(d: TBPTT, sd: dict, parts: list[dict]) -> dict:
    """Rank 0's state_dict with the ranks' streams side by side, in rank order."""
    out = dict(sd)
    out["segments"] = [dict(r) for r in sd["segments"]]
    counts = [p["batch"] for p in parts]
    if any(c is None for c in counts):  # saved before the first chunk: nothing per stream yet
        out["batch"] = None if all(c is None for c in counts) else sum(c or 0 for c in counts)
    else:
        out["batch"] = sum(counts)
    ax = _stream_axis(d)

    def cat_state(states: list) -> Any:
        if states[0] is None:
            return None
        dims = _state_dims(d, states[0], counts[0])
        cols = [st.leaves(s) for s in states]
        it = iter([torch.cat([c[i] for c in cols], dim) for i, dim in enumerate(dims)])
        return st.tree_map(lambda _: next(it), states[0])

    out["state"] = cat_state([p["state"] for p in parts])
    for i, r in enumerate(out["segments"]):
        recs = [p["segments"][i] for p in parts]
        for k in PER_STREAM:
            r[k] = _cat([x[k] for x in recs], ax, counts, 1 if k == "mask" else 0)
        r["state_in"] = cat_state([x["state_in"] for x in recs])
    out["ranks"] = [
        {
            "batch": p["batch"],
            "rng": p["rng"],
            "device_rng": p["device_rng"],
            "segments": [[s["rng"], s["device_rng"]] for s in p["segments"]],
        }
        for p in parts
    ]
    return out


def _split(d: TBPTT, sd: dict, rank: int, world: int) -> dict:
    """This rank's part of a checkpoint over all streams, in the single-process format."""
    if not isinstance(sd, dict) or sd.get("format") != FORMAT:
        return sd  # resume.load_driver_state says what is wrong with it
    ranks = sd.get("ranks")
    same = ranks is not None and len(ranks) == world
    B = sd.get("batch")
    out = {k: v for k, v in sd.items() if k != "ranks"}
    if ranks is not None:  # this rank's generators: its own, or rank r mod W_saved's
        mine = ranks[rank % len(ranks)]
        out["rng"], out["device_rng"] = mine["rng"], mine["device_rng"]
    if B is None:
        return out
    if same:
        counts = [r["batch"] for r in ranks]
    elif B % world:
        raise ValueError(
            f"the checkpoint holds {B} streams, which {world} processes cannot share equally; "
            f"resume with a number of processes that divides {B}"
        )
    else:
        counts = [B // world] * world
    a, n = sum(counts[:rank]), counts[rank]
    ax = _stream_axis(d)
    cut = lambda v: None if v is None else v.narrow(ax, a, n).clone()  # noqa: E731

    def cut_state(s: Any) -> Any:
        if s is None:
            return None
        dims = iter(_state_dims(d, s, B))
        return st.tree_map(lambda t: t.narrow(next(dims), a, n).clone(), s)

    out["batch"] = n
    out["state"] = cut_state(sd["state"])
    segs = []
    for i, r in enumerate(sd["segments"]):
        r = dict(r)
        for k in PER_STREAM:
            r[k] = cut(r[k])
        r["state_in"] = cut_state(r["state_in"])
        if ranks is not None:
            r["rng"], r["device_rng"] = ranks[rank % len(ranks)]["segments"][i]
        segs.append(r)
    out["segments"] = segs
    return out


# -- torchrun ---------------------------------------------------------------------------------------
@dataclass
class Launch:
    """This process's place in a torchrun job (rank 0 of 1 when not under torchrun)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    def streams(self, batch: int) -> slice:
        """This rank's streams of a global batch: a contiguous block of batch / world."""
        if batch % self.world:
            raise ValueError(
                f"--batch {batch} must be divisible by the number of processes ({self.world}): "
                f"each process trains batch / processes streams"
            )
        n = batch // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def mean(self, value: float, count: float) -> float:
        """The mean over all ranks of per-rank means `value` over `count` items each."""
        if self.world == 1:
            return value
        v = torch.tensor([value * count, count], dtype=torch.float64, device=self.comm_device)
        _dist().all_reduce(v)
        return float(v[0] / max(float(v[1]), 1.0))

    def agree(self, seconds: float, stop: bool) -> tuple[float, bool]:
        """The slowest rank's seconds, and whether any rank was asked to stop."""
        if self.world == 1:
            return seconds, stop
        v = torch.tensor([seconds, float(stop)], dtype=torch.float64, device=self.comm_device)
        _dist().all_reduce(v, op=_dist().ReduceOp.MAX)
        return float(v[0]), bool(v[1] > 0)

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def init_from_env(device: str = "cpu", timeout: float | None = None) -> Launch:
    """Join the job torchrun started, from its environment; a single process when there is none.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. With WORLD_SIZE > 1
    this initializes the default process group: gloo on the CPU, NCCL on CUDA with the device
    cuda:LOCAL_RANK. timeout: seconds a collective waits for the others before failing (default
    $TBPTT_TIMEOUT, else 600).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if world <= 1:
        return Launch(0, 1, 0, torch.device(device))
    missing = [
        k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the processes with "
            "torchrun (it sets RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
        )
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if timeout is None:
        timeout = float(os.environ.get("TBPTT_TIMEOUT", DEFAULT_TIMEOUT))
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    dev = torch.device(device)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    dist = _dist()
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout),
        )
        atexit.register(_destroy)
    return Launch(rank, world, local, dev)


def _destroy() -> None:
    dist = _dist()
    if dist.is_initialized():
        dist.destroy_process_group()
