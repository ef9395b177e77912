"""The methods by name in the torch engine: one call builds each, from the table in tbptt.methods
(its methods, their options and defaults, each engine's rule; `register` adds one). OPTIONS is
that table as {method: its options on this engine}, amp and checkpoint included where the method
takes them (options of the shell, tbptt.torch.TBPTT, not of the rule).

make_trainer(method, model, optimizer, loss_fn=, clip=, scheduler=, batch_first=, state0=,
process_group=, reduction=, **options) is what `tbptt train --engine torch --method` needs: a
tbptt.torch.TBPTT holding the method's rule; frozen_gradients(method, model, x, y, ...) the
estimate with the parameters fixed over the whole stream, for checking against exact BPTT. An
option the method does not take is a one-line InputError naming the options it does take;
nothing is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
from torch import nn

from ..methods import OptionNames, build_rule, check_options
from ..schedule import Truncation
from .driver import TBPTT, LossFn, Scheduler, shell_options
from .modules import l2_loss
from .rule import Rule

Tensor = torch.Tensor

OPTIONS: Mapping[str, tuple[str, ...]] = OptionNames("torch")  # {method: its options}, live


def __getattr__(name: str) -> object:
    if name == "METHODS":  # the methods' names, read from the table when asked
        return tuple(OPTIONS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_trainer(
    method: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: LossFn = l2_loss,
    clip: float | None = None,
    scheduler: Scheduler | None = None,
    batch_first: bool = False,
    state0: object | None = None,
    process_group: object | None = None,
    reduction: str = "sum",
    **options,
) -> TBPTT:
    """The online trainer of `method` with its options: a tbptt.torch.TBPTT holding the
    method's rule, with feed(x, y, mask, reset), finish(), predict, save(path), load(path),
    state_dict(), load_state_dict(sd), model, state, t, updates."""
    rule, shell = build_rule(method, options, "torch")  # shell: amp, checkpoint, if given
    # the table names each method's torch rule by a dotted path, resolved at run time: a Rule
    # (TBPTT's: a Truncation or its rule), as the shell checks (check_arguments)
    rule = cast("Truncation | Rule", rule)
    return TBPTT(model, rule, optimizer, **shell_options(locals()), **shell)


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
