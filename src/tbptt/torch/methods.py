"""The four ways to train a PyTorch recurrent module, by name: one call builds each (the numpy
engine's twin is tbptt.methods).

    method   options (defaults)                                        online trainer
    tbptt    k1, k2 (= k1), inject ("new"), flush (True), amp, checkpoint   tbptt.torch.TBPTT
    rtrl     k1 (1), max_bytes (1 GiB)                                  tbptt.torch.RTRL
    uoro     k1 (1), rng, eps (1e-7)                                    tbptt.torch.UORO
    artbp    c, b (1), rng, biased_max_length, amp, checkpoint          tbptt.torch.ARTBP

make_trainer(method, model, optimizer, loss_fn=, clip=, scheduler=, batch_first=, state0=,
process_group=, reduction=, **options) is what `tbptt train --engine torch --method` needs;
frozen_gradients(method, model, x, y, ...) the estimate with the parameters fixed over the whole
stream, for checking against exact BPTT. An option the method does not take is a one-line
InputError naming the options it does take; nothing is built.
"""

from __future__ import annotations

import torch
from torch import nn

from ..methods import check_options, truncation
from .artbp import ARTBP
from .driver import TBPTT, LossFn
from .modules import l2_loss
from .rtrl import RTRL
from .uoro import UORO

Tensor = torch.Tensor

OPTIONS: dict[str, tuple[str, ...]] = {
    "tbptt": ("k1", "k2", "inject", "flush", "amp", "checkpoint"),
    "rtrl": ("k1", "max_bytes"),
    "uoro": ("k1", "rng", "eps"),
    "artbp": ("c", "b", "rng", "biased_max_length", "amp", "checkpoint"),
}
METHODS = tuple(OPTIONS)


def make_trainer(
    method: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: LossFn = l2_loss,
    clip: float | None = None,
    scheduler: object | None = None,
    batch_first: bool = False,
    state0: object | None = None,
    process_group: object | None = None,
    reduction: str = "sum",
    **options,
) -> TBPTT:
    """The online trainer of `method` with its options. All four are tbptt.torch.TBPTT drivers:
    feed(x, y, mask, reset), finish(), predict, save(path), load(path), state_dict(),
    load_state_dict(sd), model, state, t, updates."""
    check_options(method, options, "torch")
    common = {
        "loss_fn": loss_fn,
        "clip": clip,
        "scheduler": scheduler,
        "batch_first": batch_first,
        "state0": state0,
        "process_group": process_group,
        "reduction": reduction,
    }
    if method == "tbptt":
        extra = {k: options[k] for k in ("amp", "checkpoint") if k in options}
        return TBPTT(model, truncation(options), optimizer, **common, **extra)
    return {"rtrl": RTRL, "uoro": UORO, "artbp": ARTBP}[method](
        model, optimizer, **common, **options
    )


class Summed(torch.optim.Optimizer):
    """An optimizer that adds each update's gradient to a sum and leaves the parameters as they
    are: training with it is the frozen estimate (SEMANTICS.md 5)."""

    def __init__(self, params) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None) -> None:  # noqa: D102
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    s = self.state[p]
                    s["sum"] = p.grad.clone() if "sum" not in s else s["sum"].add_(p.grad)


def frozen_gradients(
    method: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn = l2_loss,
    mask: Tensor | None = None,
    reset: Tensor | None = None,
    state0: object | None = None,
    batch_first: bool = False,
    **options,
) -> dict[str, Tensor]:
    """The gradient estimate of `method` with the parameters fixed over the whole stream x: the
    sum of every update's gradient, keyed by the parameters' names (zeros where none arrived).
    tbptt with flush (its default) and k1 = k2 = T, rtrl, and artbp with c = 0 give exact BPTT;
    uoro and artbp an unbiased estimate (each call draws anew unless rng is a seed)."""
    check_options(method, options, "torch")
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    opt = Summed(named.values())
    trainer = make_trainer(
        method,
        model,
        opt,
        loss_fn=loss_fn,
        batch_first=batch_first,
        state0=state0,
        process_group=False,
        **options,
    )
    trainer.feed(x, y, mask, reset)
    trainer.finish()
    out = {}
    for k, p in named.items():
        s = opt.state[p].get("sum")
        out[k] = torch.zeros_like(p) if s is None else s
        p.grad = None
    return out
