"""The kept steps of TBPTT and ARTBP: segments of the stream, each with the parameter values it
ran with (SEMANTICS.md 5), and the two ways to backpropagate a window through them. The rules
that own them (tbptt.py, artbp.py) decide where segments end, which window is due and how the
state passes between segments inside a window.

A segment is a run of steps t0..t1 between two boundaries of the rule's schedule (TBPTT: update
times u (4.1) and window starts s - 1 = u - k2 (4.2); ARTBP: its possible cuts), so every window
is a union of whole segments. A segment is one piece: one module call (call.py), and one more at
each step where some stream resets (6.1).

Each segment keeps two things:

    record   what it needs to be run again with the same numbers: its inputs, targets, mask,
             reset flags, the state entering it, the parameter values (None: the live ones, still
             unchanged since it ran) and the RNG state. Small; saved with the trainer, and run
             again (once) when a saved run is loaded.
    graph    the autograd graph of its losses l_t (L, batch) and its final state, from the state
             entering it. Kept only while some future window backpropagates through it.

With the graph kept and each segment's parameter values held apart from the live parameters, the
update of window W = (s, u, I) is the exact derivative of the injected losses through the steps as
they were computed (the canonical rule):

    (5.2)  dL_W/dh_t = [t in I] dl_t/dh_t + (dh_{t+1}/dh_t)^T dL_W/dh_{t+1},   s <= t <= u
    (5.3)  g_theta = sum_{t=s..u} (dh_t/dtheta_t)^T dL_W/dh_t + sum_{t in I} dl_t/dtheta_t

where theta_t are the values step t ran with. Two paths compute it (Segments.backward, .walk):

    chained      windows never overlap (TBPTT k2 <= k1, ARTBP), so every step runs with the live
                 parameters and the segments of a window hang on one graph (the state passed on
                 attached); the update is one backward() of the summed injected losses.
    overlapping  (TBPTT k2 > k1) each segment runs through torch.func.functional_call with leaf
                 copies of the parameters taken after the last update (shared by the segments
                 of an interval) and from a leaf copy of the entering state, so the in-place
                 optimizer step leaves the kept graphs valid. An update walks its segments from
                 u back to s, passing the gradient of each segment's entering state to the
                 segment before as the grad_output of its final state (5.2).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

import torch

from . import distributed as dd
from . import state as st
from .call import narrow

if TYPE_CHECKING:
    from ..schedule import Window
    from .rule import Shell

Tensor = torch.Tensor
Params = dict[str, Tensor]


@dataclass(kw_only=True)
class Graph:
    """One segment's autograd graph, from the state that entered it (or from a later step)."""

    # a leaf requiring grad, a state attached to the previous graph, or cut
    state_in: st.State | None
    losses: Tensor  # (L, batch) or (batch, L): the masked l_t, attached
    state_out: st.State  # the state after the segment's last step, attached
    leaf: bool  # state_in is a leaf of this graph: its gradient can be taken


@dataclass(kw_only=True)
class Segment:
    """Steps t0..t1 computed with one set of parameter values (those in force when they ran)."""

    t0: int  # first step, 1-based
    L: int  # number of steps
    x: Tensor  # the inputs, time on the driver's time axis
    y: Tensor  # the targets
    mask: Tensor | None  # like the losses, or None
    reset: Tensor | None  # bool, like the losses, or None: where a stream restarts from h_0 (6.1)
    state_in: st.State | None  # the state entering step t0 (detached), None: the module's zeros
    params: Params | None  # parameter values the steps ran with; None: the live parameters
    rng: Tensor | None = None  # the generator state before the segment ran (dropout, ...)
    device_rng: Tensor | None = None  # the same for a CUDA device
    graph: Graph | None = None  # kept while a future window backpropagates through these steps
    link: bool = False  # the graph's state_in is the previous segment's state_out (no cut)
    owned: bool = False  # x, y, mask, reset are the driver's own copies, not the caller's

    @property
    def t1(self) -> int:
        """Last step of the segment."""
        return self.t0 + self.L - 1


def capture_rng(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The generator states a segment's run may consume (CPU, and the CUDA device if any)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class fork_rng:
    """Run with a segment's saved generator states, restoring the current ones afterwards."""

    def __init__(self, seg: Segment, device: torch.device) -> None:
        self.seg, self.device = seg, device

    def __enter__(self) -> None:
        self.saved = capture_rng(self.device)
        if self.seg.rng is not None:
            torch.set_rng_state(self.seg.rng)
        if self.seg.device_rng is not None:
            torch.cuda.set_rng_state(self.seg.device_rng, self.device)

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.saved[0])
        if self.saved[1] is not None:
            torch.cuda.set_rng_state(self.saved[1], self.device)


Link = Callable[[int, st.State], st.State]  # link(t0, state): the state passed on into step t0


class Segments:
    """The kept segments of one stream, oldest first, and what is done with them: a piece run as
    a segment, a window backpropagated (chained or overlapping), the steps no window reaches
    dropped, the records saved and the graphs rebuilt on load."""

    def __init__(self, overlap: bool) -> None:
        self.overlap = overlap  # kept graphs outlive optimizer steps: parameter copies, the walk
        self.kept: deque[Segment] = deque()
        self.copies: Params | None = None  # the parameter copies of this interval (overlap)

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.kept)

    def __len__(self) -> int:
        return len(self.kept)

    # -- a piece --------------------------------------------------------------------------------
    def run(
        self, shell: Shell, x, y, mask, reset, start: int = 1, link: Link | None = None
    ) -> tuple[Tensor, st.State]:
        """Steps t+1..t+L from the carried state as one segment, keeping its graph if a window
        will reach it: every step when overlapping; else the steps from `start` on (the next
        window's first step), the state passed on attached from the previous segment inside a
        window, through link(t0, state) (None: as it is). Returns the loss sum (detached,
        float64) and the state after the segment."""
        L = x.shape[shell.tdim]
        t0, t1 = shell.t + 1, shell.t + L
        state = shell.carried
        if self.overlap:  # every step lies in the next window, and the graph outlives the update
            if self.copies is None:
                self.copies = {
                    n: p.detach().clone().requires_grad_() for n, p in shell.params.items()
                }
            params, grad, linked, leaf = self.copies, True, False, True
            state_in = st.as_leaf(state)
        else:
            prev = self.kept[-1] if self.kept else None
            params, grad, leaf = None, t1 >= start, False
            linked = grad and t0 > start and prev is not None and prev.graph is not None
            if not linked:
                state_in = st.detach(state)
            else:
                state_in = state if link is None else link(t0, state)
        rng, device_rng = capture_rng(shell.device) if grad else (None, None)  # rerun on load
        seg = Segment(
            t0=t0,
            L=L,
            x=x,
            y=y,
            mask=mask,
            reset=reset,
            state_in=st.detach(state),
            params=params,
            rng=rng,
            device_rng=device_rng,
            link=linked,
        )
        with nullcontext() if grad else torch.no_grad():
            ckpt = shell.checkpoint and grad
            losses, state_out = shell.losses(x, y, mask, reset, state_in, params, ckpt)
        if grad:
            seg.graph = Graph(state_in=state_in, losses=losses, state_out=state_out, leaf=leaf)
        self.kept.append(seg)
        return losses.detach().sum(dtype=torch.float64), state_out

    # -- an update ------------------------------------------------------------------------------
    def backward(self, shell: Shell, w: Window) -> None:
        """Chained: one graph from s to u, so one backward() of the summed injected losses
        (shell.backward: the caller's hook or the grad scaler's), as the detach loop does."""
        segs = [seg for seg in self.kept if seg.t1 >= w.s]
        total = None
        for seg in segs:
            assert seg.graph is not None  # a window's segments keep their graphs until it runs
            part = injected(seg.graph.losses, max(w.i, seg.t0) - seg.t0, shell.tdim)
            if part is not None:
                total = part if total is None else total + part
        if total is not None:
            shell.backward(total)
        for seg in segs:
            seg.graph = None

    def walk(self, shell: Shell, w: Window, keep_from: int) -> None:
        """Overlapping: walk the window from u back to s, one segment at a time (5.2), summing
        (5.3) into the parameters' .grad; a graph no later window reaches (it ends before step
        keep_from) is freed."""
        acc: dict[str, Tensor] = {}
        g_state: list[Tensor | None] | None = None  # dL_W / d(state entering the later segment)
        for seg in reversed([seg for seg in self.kept if seg.t1 >= w.s]):
            need_state = seg.t0 > w.s
            graph = seg.graph
            assert graph is not None  # a window's segments keep their graphs until it runs
            outs, gouts = [], []
            part = injected(graph.losses, max(w.i, seg.t0) - seg.t0, shell.tdim)
            if part is not None:
                outs.append(shell.scale(part))
                gouts.append(torch.ones_like(outs[-1]))
            if g_state is not None:
                for o, g in zip(diff_leaves(graph.state_out), g_state, strict=True):
                    if g is not None and o.requires_grad:
                        outs.append(o)
                        gouts.append(g)
            P = seg.params
            assert P is not None  # overlapping segments run with the parameter copies
            names = list(P)
            ins = [P[k] for k in names]
            sin = diff_leaves(graph.state_in) if need_state and graph.state_in is not None else []
            retain = seg.t1 >= keep_from
            res = [None] * (len(ins) + len(sin))
            if outs:
                res = torch.autograd.grad(
                    outs, ins + sin, gouts, retain_graph=retain, allow_unused=True
                )
            for k, g in zip(names, res[: len(ins)], strict=True):
                if g is not None:
                    acc[k] = g if k not in acc else acc[k] + g
            g_state = list(res[len(ins) :]) if need_state else None
            if not retain:
                seg.graph = None
        for name, p in shell.params.items():
            p.grad = acc.get(name)

    def count(self, shell: Shell, w: Window) -> float:
        """(5.4): the number of injected (step, stream) losses of window w, mask weights summed."""
        total = 0.0
        for seg in self.kept:
            a = max(w.i, seg.t0) - seg.t0
            if seg.t1 >= w.s and a < seg.L:
                if seg.mask is None:
                    assert shell.batch is not None  # the first chunk set it
                    total += (seg.L - a) * shell.batch
                else:
                    total += float(narrow(seg.mask, shell.tdim, a, seg.L).sum())
        return total

    # -- what is kept ---------------------------------------------------------------------------
    def prune(self, oldest: int) -> None:
        """Drop the segments that end before step `oldest`, the first any future window reaches."""
        while self.kept and self.kept[0].t1 < oldest:
            self.kept.popleft()

    def release(self, finished: bool) -> None:
        """feed returns (finished False): the records kept beyond it become our own copies of the
        caller's tensors. finish() (True): nothing is kept."""
        if finished:
            self.kept.clear()
            self.copies = None
            return
        for seg in self.kept:
            if not seg.owned:
                seg.x, seg.y = _copy(seg.x), _copy(seg.y)
                seg.mask, seg.reset = _copy(seg.mask), _copy(seg.reset)
                seg.owned = True

    # -- saving ---------------------------------------------------------------------------------
    def state_dict(self, shell: Shell) -> dict:
        """The carried state and each segment's record (inputs, targets, mask, reset flags,
        entering state, the parameter values it ran with, shared per update, and RNG state).
        The graphs are not saved: `read` runs every segment that had one again."""
        sets: list[dict[str, Tensor]] = []
        index: dict[int, int] = {}

        def set_id(P: dict | None) -> int:
            if P is None:
                return -1
            if id(P) not in index:
                index[id(P)] = len(sets)
                sets.append({k: v.detach() for k, v in P.items()})
            return index[id(P)]

        segments = [
            {
                "t0": seg.t0,
                "L": seg.L,
                **{k: getattr(seg, k) for k in dd.PER_STREAM},
                "state_in": seg.state_in,
                "params": set_id(seg.params),
                "rng": seg.rng,
                "device_rng": seg.device_rng,
                "graph": seg.graph is not None,
                "leaf": seg.graph is not None and seg.graph.leaf,
                "link": seg.link,
            }
            for seg in self.kept
        ]
        return {
            "state": shell.state,
            "copies": set_id(self.copies),
            "param_sets": sets,
            "segments": segments,
        }

    def read(self, shell: Shell, sd: dict, link: Link | None = None) -> Callable[[], st.State]:
        """The restore of what state_dict saved: every segment that had a graph is run again
        from its record, in the same module calls (linked again through `link`), so the rebuilt
        graph and the carried state are those of the uninterrupted run. Returns the carried
        state, attached to the last graph when it ends at step t."""

        def restore() -> st.State:
            def dev(v: Any) -> Any:  # a saved value (a state, a tensor or None) on the device
                return st.to(v, shell.device)

            sets = [
                {k: v.to(shell.device).detach().requires_grad_() for k, v in P.items()}
                for P in sd["param_sets"]
            ]
            self.copies = sets[sd["copies"]] if sd["copies"] >= 0 else None
            self.kept.clear()
            prev: Segment | None = None
            for r in sd["segments"]:
                seg = Segment(
                    t0=int(r["t0"]),
                    L=int(r["L"]),
                    **{k: dev(r[k]) for k in dd.PER_STREAM},
                    state_in=dev(r["state_in"]),
                    params=sets[r["params"]] if r["params"] >= 0 else None,
                    rng=r["rng"],
                    device_rng=r["device_rng"],
                    link=bool(r["link"]),
                    owned=True,
                )
                if r["graph"]:  # run it again: the same module calls on the same values
                    if r["leaf"]:
                        entering = st.as_leaf(seg.state_in)
                    elif seg.link and prev is not None and prev.graph is not None:
                        out = prev.graph.state_out
                        entering = out if link is None else link(seg.t0, out)
                    else:
                        entering = st.detach(seg.state_in)
                    with fork_rng(seg, shell.device):
                        losses, out = shell.losses(
                            seg.x,
                            seg.y,
                            seg.mask,
                            seg.reset,
                            entering,
                            seg.params,
                            shell.checkpoint,
                        )
                    seg.graph = Graph(
                        state_in=entering, losses=losses, state_out=out, leaf=bool(r["leaf"])
                    )
                self.kept.append(seg)
                prev = seg
            if prev is not None and prev.graph is not None and prev.t1 == shell.t:
                return prev.graph.state_out  # attached, as in the uninterrupted run
            return dev(sd["state"])

        return restore


@overload
def _copy(a: Tensor) -> Tensor: ...
@overload
def _copy(a: Tensor | None) -> Tensor | None: ...
def _copy(a: Tensor | None) -> Tensor | None:
    """Our own copy of a caller's tensor (None: None)."""
    return None if a is None else a.clone()


def injected(losses: Tensor, a: int, tdim: int) -> Tensor | None:
    """sum_{t in I} l_t over the streams, for the steps from index a of a segment on."""
    L = losses.shape[tdim]
    if a >= L:
        return None
    return losses.sum() if a == 0 else losses.narrow(tdim, a, L - a).sum()


def diff_leaves(state: st.State) -> list[Tensor]:
    """The state's tensors that can carry a gradient."""
    return [t for t in st.leaves(state) if st.differentiable(t)]
