"""The kept steps: segments of the stream, each with the parameter values it ran with (SEMANTICS 5).

A segment is a run of steps t0..t1 between two boundaries of the schedule: update times u (4.1)
and window starts s - 1 = u - k2 (4.2). Every window, the flush window included (it starts where
the next regular window would), is then a union of whole segments, and both boundaries are
multiples of gcd(k1, k2), so a segment is a union of the gcd-long pieces of the contract. A
segment is one call of the module, and one more call at each step where some stream resets (6.1).

Each segment keeps two things:

    record   what it needs to be run again with the same numbers: its inputs, targets, mask,
             reset flags, the state entering it, the parameter values (None: the live ones, still
             unchanged since it ran) and the RNG state. Small; saved by `TBPTT.save`, and run
             again (once) when a saved run is loaded.
    graph    the autograd graph of its losses l_t (L, batch) and its final state, from the state
             entering it. Kept only while some future window backpropagates through it.

With the graph kept and each segment's parameter values held apart from the live parameters, the
update of window W = (s, u, I) is the exact derivative of the injected losses through the steps as
they were computed (the canonical rule):

    (5.2)  dL_W/dh_t = [t in I] dl_t/dh_t + (dh_{t+1}/dh_t)^T dL_W/dh_{t+1},   s <= t <= u
    (5.3)  g_theta = sum_{t=s..u} (dh_t/dtheta_t)^T dL_W/dh_t + sum_{t in I} dl_t/dtheta_t

where theta_t are the values step t ran with. Across a segment boundary the gradient reaching the
state that entered the later segment is the grad_output of the earlier segment's final state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import state as st

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


def reset_rows(reset: Tensor | None, tdim: int) -> list[int]:
    """Indices (within a segment) of the steps where at least one stream restarts."""
    if reset is None:
        return []
    any_row = reset.any(dim=1 - tdim)  # (L,)
    return torch.nonzero(any_row).flatten().tolist()
