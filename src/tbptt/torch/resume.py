"""Save and resume a torch TBPTT driver exactly: one file, written atomically, read without pickles.

What a run needs to continue as if never interrupted (SEMANTICS.md 5 and 6):

    model, optimizer, scheduler, grad scaler    their state_dict()s
    the stream                                  t (position), u_prev (schedule phase), updates,
                                                the batch size and the carried state h_t
    the kept steps                              each segment's record: inputs, targets, mask,
                                                reset flags, entering state, the parameter values
                                                it ran with (shared per update) and RNG state
    the RNG                                     torch's CPU generator (and the CUDA device's)

The kept graphs themselves are not saved: on load every segment that had a graph is run again from
its record, with the same inputs, state, parameter values and generator state, in the same module
calls, so the rebuilt graph and the carried state are the ones the uninterrupted run holds (bit for
bit on a deterministic backend, as the float64 CPU tests check). No step is computed with
different parameter values than the first time.

The file is a torch.save of tensors, numbers, strings, lists and dicts only, so torch.load with
weights_only=True reads it.

With several processes (distributed.py) rank 0 writes the same format over all streams of all
ranks (each per-stream tensor concatenated along the stream axis), plus "ranks": each rank's
batch share and RNG states; any number of processes that divides the streams reads it.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

import torch

from . import state as st
from .segments import Graph, Segment, fork_rng

if TYPE_CHECKING:
    from .driver import TBPTT

FORMAT = "tbptt.torch.TBPTT/1"


def driver_state(d: TBPTT) -> dict:
    """The driver as a dict of tensors and plain values (see the module docstring)."""
    sets: list[dict[str, torch.Tensor]] = []
    index: dict[int, int] = {}

    def set_id(P: dict | None) -> int:
        if P is None:
            return -1
        if id(P) not in index:
            index[id(P)] = len(sets)
            sets.append({k: v.detach() for k, v in P.items()})
        return index[id(P)]

    own = lambda v: None if v is None else v.clone()  # noqa: E731  (a slice would save its chunk)
    segments = [
        {
            "t0": seg.t0,
            "L": seg.L,
            "x": own(seg.x),
            "y": own(seg.y),
            "mask": own(seg.mask),
            "reset": own(seg.reset),
            "state_in": seg.state_in,
            "params": set_id(seg.params),
            "rng": seg.rng,
            "device_rng": seg.device_rng,
            "graph": seg.graph is not None,
            "leaf": seg.graph is not None and seg.graph.leaf,
            "link": seg.link,
        }  # fmt: skip
        for seg in d._segments
    ]
    tr = d.truncation
    sched = d.scheduler
    cuda = d.device.type == "cuda"
    return {
        "format": FORMAT,
        "truncation": [tr.k1, tr.k2, tr.inject, tr.flush],
        "batch_first": d.batch_first,
        "t": d.t,
        "u_prev": d.u_prev,
        "updates": d.updates,
        "batch": d.batch,
        "finished": d.finished,
        "model": d.model.state_dict(),
        "optimizer": d.optimizer.state_dict(),
        "scheduler": None if sched is None else sched.state_dict(),
        "scaler": None if d.scaler is None else d.scaler.state_dict(),
        "state": d.state,
        "copies": set_id(d._copies),
        "param_sets": sets,
        "segments": segments,
        "rng": torch.get_rng_state(),
        "device_rng": torch.cuda.get_rng_state(d.device) if cuda else None,
    }


def load_driver_state(d: TBPTT, sd: dict) -> None:
    """Restore driver_state(); rebuild the kept graphs from the records (module docstring)."""
    if not isinstance(sd, dict) or sd.get("format") != FORMAT:
        got = sd.get("format") if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"state must be a {FORMAT!r} dict from TBPTT.state_dict(), got {got!r}")
    tr = d.truncation
    mine = [tr.k1, tr.k2, tr.inject, tr.flush]
    if list(sd["truncation"]) != mine:
        raise ValueError(
            f"the saved run used Truncation{tuple(sd['truncation'])} (k1, k2, inject, flush), "
            f"this driver has Truncation{tuple(mine)}; resume with the same schedule"
        )
    if sd["batch_first"] != d.batch_first:
        raise ValueError(f"the saved run had batch_first={sd['batch_first']}, this driver not")
    for name, obj in (("scheduler", d.scheduler), ("scaler", d.scaler)):
        if (sd[name] is None) != (obj is None):
            raise ValueError(
                f"the saved run {'had' if sd[name] is not None else 'had no'} {name}, "
                f"this driver {'has none' if obj is None else 'has one'}"
            )
    d.model.load_state_dict(sd["model"])
    d.optimizer.load_state_dict(sd["optimizer"])
    if d.scheduler is not None:
        d.scheduler.load_state_dict(sd["scheduler"])
    if d.scaler is not None:
        d.scaler.load_state_dict(sd["scaler"])
    d.t, d.u_prev, d.updates = int(sd["t"]), int(sd["u_prev"]), int(sd["updates"])
    d.batch, d.finished = sd["batch"], bool(sd["finished"])
    dev = lambda v: None if v is None else v.to(d.device)  # noqa: E731
    sets = [
        {k: v.to(d.device).detach().requires_grad_() for k, v in P.items()}
        for P in sd["param_sets"]
    ]
    d._copies = sets[sd["copies"]] if sd["copies"] >= 0 else None
    d._segments.clear()
    d._pending, d._pending_from = [], d.t + 1
    prev: Segment | None = None
    for r in sd["segments"]:
        state_in = None if r["state_in"] is None else st.tree_map(dev, r["state_in"])
        seg = Segment(
            int(r["t0"]), int(r["L"]), dev(r["x"]), dev(r["y"]), dev(r["mask"]), dev(r["reset"]),
            state_in, sets[r["params"]] if r["params"] >= 0 else None, r["rng"],
            r["device_rng"], None, bool(r["link"]),
        )  # fmt: skip
        if r["graph"]:  # run it again: the same module calls on the same values
            if r["leaf"]:
                entering = st.as_leaf(state_in)
            elif seg.link and prev is not None and prev.graph is not None:
                entering = prev.graph.state_out
            else:
                entering = st.detach(state_in)
            with fork_rng(seg, d.device):
                losses, out = d._run(seg, entering, 0, seg.params, d.checkpoint)
            seg.graph = Graph(entering, losses, out, bool(r["leaf"]))
        d._segments.append(seg)
        prev = seg
    state = None if sd["state"] is None else st.tree_map(dev, sd["state"])
    if prev is not None and prev.graph is not None and prev.t1 == d.t:
        state = prev.graph.state_out  # attached, as in the uninterrupted run
    d._state = state
    d._sig = None if state is None else st.signature(state)
    torch.set_rng_state(sd["rng"])
    if sd["device_rng"] is not None and d.device.type == "cuda":
        torch.cuda.set_rng_state(sd["device_rng"], d.device)


def save(sd: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the target's folder, fsync, then rename over the target."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(sd, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True (tensors and plain containers only), onto the CPU.

    load_driver_state moves each tensor where it belongs (the RNG states stay on the CPU).
    """
    return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
