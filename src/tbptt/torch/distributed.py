"""Data-parallel TBPTT(k1, k2) over processes and machines, torch.distributed (SEMANTICS.md 4-6).

Each process (rank r of W) owns a disjoint set S_r of the batch's streams and runs the driver on
them; every rank feeds chunks of the same lengths, so the schedule (4.1)-(4.3) has the same phase
everywhere. The loss is the contract's sum over steps and streams, taken over all streams of all
ranks, and each update applies its gradient:

    (D.1)  L_W = sum_r sum_{j in S_r} sum_{t in I} l_t^j          the window's loss, all streams
    (D.2)  g   = dL_W/dtheta = sum_r g_r                           g_r: rank r's own streams (5.3)

so the ranks' gradients are SUMMED, not averaged: W processes with B/W streams each take the same
steps as one process with all B streams (DistributedDataParallel averages, which is right for a
mean loss; the driver's loss is a sum; with reduction="mean" the summed gradient is divided by the
summed count). Per update there is ONE collective (an all-reduce; one per dtype and device when
the parameters have several), after the whole window was backpropagated (all its segments, on
either path of tbptt.py) and before unscaling, clipping and optimizer.step, so clipping sees the
global norm and every rank takes the same step. Its buffer holds the flattened gradient, a flag
per parameter (whether it has a gradient), the loss total and count of the chunk (the mean the
driver reports), the mean reduction's count, and one slot per rank for its step t and for the
finiteness of its losses: the checks that keep the ranks in step travel with the gradient. A
model wrapped in DistributedDataParallel is accepted: the driver runs its `.module` and uses its
process group, so DDP's own reducer never fires (as if every backward ran under `no_sync()`),
and the driver's all-reduce is the only one.

When the driver is made, one small all-reduce checks that every rank has the same schedule and
parameter shapes; then the parameters and buffers are broadcast from rank 0, as DDP does. A chunk
that ends between updates is checked by a collective of the same buffer (gradient zero), so ranks
at different steps t meet in the same call and all raise; a non-finite loss on any rank stops all
of them at the same update. A collective that fails (a process died, or stopped answering within
the process group's timeout) raises DistributedError.

Checkpoints (TBPTT.state_dict's format): rank 0 gathers the per-stream parts (the carried state,
the kept segments' inputs, targets, masks, resets and entering states) along the stream axis,
writes the file atomically, and a barrier tells every rank it is complete. The file is a
single-process checkpoint over all B streams, plus each rank's RNG states under "ranks": a
single process loads it as it is, and W' processes load it when W' divides B, rank r taking
streams r B/W' .. (r+1) B/W' - 1. This module gets values from the driver (its state dict, the
stream axis, the state's stream axes), never the driver itself.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from . import state as st

Tensor = torch.Tensor
PER_STREAM = ("x", "y", "mask", "reset")  # segment records with a stream axis, besides state_in
DEFAULT_TIMEOUT = 600.0  # seconds a collective may wait for the other ranks (TBPTT_TIMEOUT)


class DistributedError(RuntimeError):
    """A collective failed: another process died, or did not answer within the timeout."""


def _dist():
    import torch.distributed as dist

    return dist


def resolve(model: nn.Module, process_group: object) -> tuple[nn.Module, Any]:
    """The module the driver runs and its process group (None: a single process).

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
            raise InputError(
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
        raise InputError(
            "process_group must be None (automatic), False (a single process) or a "
            f"torch.distributed.ProcessGroup, got {type(process_group).__name__}"
        )
    if dist.get_world_size(group) == 1:
        return inner, None
    return inner, group


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

    def call(self, what: str, fn: Callable, *args: Any, **kw: Any) -> Any:
        """fn(*args, **kw), a collective; its failure as a DistributedError naming `what`."""
        try:
            return fn(*args, **kw)
        except RuntimeError as exc:  # gloo, NCCL: a peer died, timed out, or called otherwise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(
                f"process {self.rank} of {self.world}: {what} failed: another process died, did "
                "not answer within the process group's timeout, or is elsewhere in the run "
                f"({first})"
            ) from exc

    def all_reduce(self, tensor: Tensor, what: str) -> None:
        """tensor <- its sum over the ranks, in place."""
        self.call(f"summing {what}", _dist().all_reduce, tensor, group=self.group)

    def spread(self, values: list[int], what: str) -> list[tuple[int, int]]:
        """(min, max) over the ranks of each value: one MAX all-reduce of (v, -v)."""
        v = torch.tensor(values, dtype=torch.int64, device=self.device)
        both = torch.cat([v, -v])
        self.call(what, _dist().all_reduce, both, op=_dist().ReduceOp.MAX, group=self.group)
        n = len(values)
        hi, lo = both[:n].tolist(), (-both[n:]).tolist()
        return list(zip(lo, hi, strict=True))

    def setup(self, settings: dict[str, int], tensors: list[Tensor]) -> None:
        """Check that every rank has the same settings; give all rank 0's tensor values."""
        spread = self.spread(list(settings.values()), "the check of the driver's settings")
        for name, (lo, hi) in zip(settings, spread, strict=True):
            if lo != hi:
                raise InputError(
                    f"the processes disagree on {name} (from {lo} to {hi}): every rank must make "
                    "the same model and the same tbptt.Truncation"
                )
        with torch.no_grad():
            for ts in _by_kind(tensors).values():
                flat = torch.cat([t.detach().reshape(-1) for t in ts])
                self.call(
                    "the broadcast of the initial parameters",
                    _dist().broadcast,
                    flat,
                    src=self.src,
                    group=self.group,
                )
                for t, part in zip(ts, flat.split([t.numel() for t in ts]), strict=True):
                    t.copy_(part.view_as(t))

    def reduce(
        self,
        params: list[Tensor],
        *,
        t: int,
        finite: bool,
        values: list[float],
        what: str,
        grads: bool = True,
    ) -> Reduced:
        """The update's one collective (module docstring): p.grad <- the sum over the ranks
        (grads=False: a check between updates, the gradient slots zero), the values summed, and
        every rank's step t and finiteness. Raises InputError on all ranks when their t differ.
        """
        W, r = self.world, self.rank
        kinds = list(_by_kind(params).values()) or [[]]
        control = None
        for k, ps in enumerate(kinds):
            for p in ps:
                if grads and p.grad is not None and p.grad.is_sparse:
                    raise InputError("sparse gradients cannot be summed over processes here")
            like = ps[0] if ps else torch.zeros((), dtype=torch.float64)
            have = [grads and p.grad is not None for p in ps]
            parts = [  # (h implies a grad: its test again only tells the type checker so)
                p.grad.reshape(-1) if h and p.grad is not None else p.new_zeros(p.numel())
                for p, h in zip(ps, have, strict=True)
            ]
            extra = [float(h) for h in have]
            if k == 0:  # values, then per rank: t in two exact halves, and a non-finite flag
                slots = [0.0] * (3 * W)
                slots[3 * r : 3 * r + 3] = [float(t >> 20), float(t & 0xFFFFF), float(not finite)]
                extra += [*values, *slots]
            flat = torch.cat([*parts, torch.tensor(extra, dtype=like.dtype).to(like.device)])
            self.call(f"the all-reduce of {what}", _dist().all_reduce, flat, group=self.group)
            n = sum(p.numel() for p in ps)
            tail = flat[n:].double().tolist()
            for p, g, f in zip(ps, flat[:n].split([p.numel() for p in ps]), tail, strict=False):
                if grads:
                    p.grad = g.view_as(p) if f > 0 else None
            if k == 0:
                control = tail[len(ps) :]
        assert control is not None  # kinds is never empty: its first (k == 0) set it
        values_sum, slots = control[: len(values)], control[len(values) :]
        ts = [int(slots[3 * q]) * (1 << 20) + int(slots[3 * q + 1]) for q in range(W)]
        if min(ts) != max(ts):
            raise InputError(
                f"the processes are at different steps of the stream (t from {min(ts)} to "
                f"{max(ts)}) at {what}: every rank must feed chunks of the same lengths, so that "
                "the schedule's update times are the same everywhere"
            )
        bad = any(slots[3 * q + 2] > 0 for q in range(W))
        return Reduced(finite=not bad, values=values_sum)

    def together(self, fn: Callable[[], None], what: str) -> None:
        """Run fn on every rank, then wait for all; every rank raises if one failed."""
        error: BaseException | None = None
        try:
            fn()
        except DistributedError:
            raise
        except Exception as exc:  # tell the others, then raise it here
            error = exc
        ((lo, _),) = self.spread([int(error is None)], f"the barrier after {what}")
        if lo != 1:
            if error is not None:
                raise error
            raise DistributedError(
                f"process {self.rank} of {self.world}: {what} failed in another process (its "
                "error is in its output)"
            )

    # -- checkpoints ----------------------------------------------------------------------------
    def gather_streams(self, sd: dict, axis: int, dims: list[int] | None) -> dict | None:
        """The run's state over all streams on rank 0 (module docstring), None on the others.

        sd: this rank's state dict; axis: the stream axis of x, y, masks and resets; dims: the
        stream axis of each tensor of the carried state (None before the first chunk).
        """
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
        # rank 0's slots, each filled by gather_object with a rank's (local, dims)
        parts: list[Any] | None = [None] * self.world if self.rank == 0 else None
        self.call(
            "gathering the checkpoint",
            _dist().gather_object,
            (local, dims),
            parts,
            dst=self.src,
            group=self.group,
        )
        if self.rank != 0:
            return None
        assert parts is not None  # rank 0 made the list
        dims = next((d for _, d in parts if d is not None), None)
        return merge_streams(sd, [p for p, _ in parts], axis, dims)

    def broadcast(self, obj: Any, what: str) -> Any:
        """Rank 0's object on every rank."""
        box = [obj if self.rank == 0 else None]
        self.call(
            f"broadcasting {what}",
            _dist().broadcast_object_list,
            box,
            src=self.src,
            group=self.group,
        )
        return box[0]


@dataclass
class Reduced:
    """What the update's collective brought back besides the gradient."""

    finite: bool  # every rank's losses were finite
    values: list[float]  # the values, summed over the ranks


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


def merge_streams(sd: dict, parts: list[dict], ax: int, dims: list[int] | None) -> dict:
    """Rank 0's state dict with the ranks' streams side by side on axis ax, in rank order."""
    out = dict(sd)
    out["segments"] = [dict(r) for r in sd["segments"]]
    counts = [p["batch"] for p in parts]
    if any(c is None for c in counts):  # saved before the first chunk: nothing per stream yet
        out["batch"] = None if all(c is None for c in counts) else sum(c or 0 for c in counts)
    else:
        out["batch"] = sum(counts)

    def cat_state(states: list) -> Any:
        if states[0] is None:
            return None
        assert dims is not None  # a state's stream axes (None only where no state was saved)
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


def split_streams(sd: dict, rank: int, world: int, ax: int, dims: list[int] | None) -> dict:
    """This rank's part of a checkpoint over all streams, in the single-process format.

    ax: the stream axis of x, y, masks and resets; dims: that of each tensor of the state.
    """
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
        assert ranks is not None  # same says so
        counts = [r["batch"] for r in ranks]
    elif B % world:
        raise InputError(
            f"the checkpoint holds {B} streams, which {world} processes cannot share equally; "
            f"resume with a number of processes that divides {B}"
        )
    else:
        counts = [B // world] * world
    a, n = sum(counts[:rank]), counts[rank]
    cut = lambda v: None if v is None else v.narrow(ax, a, n).clone()  # noqa: E731

    def cut_state(s: Any) -> Any:
        if s is None:
            return None
        assert dims is not None  # a state's stream axes (None only where no state was saved)
        it = iter(dims)
        return st.tree_map(lambda t: t.narrow(next(it), a, n).clone(), s)

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


# -- torchrun --------------------------------------------------------------------------------------
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
            raise InputError(
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
        raise InputError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if world <= 1:
        return Launch(0, 1, 0, torch.device(device))
    missing = [
        k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise InputError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the processes with "
            "torchrun (it sets RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
        )
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if timeout is None:
        timeout = float(os.environ.get("TBPTT_TIMEOUT", DEFAULT_TIMEOUT))
    if not timeout > 0:
        raise InputError(f"timeout must be a positive number of seconds, got {timeout}")
    dev = torch.device(device)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available here")
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
