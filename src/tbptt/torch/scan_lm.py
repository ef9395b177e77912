"""ScanLM: a stack of minGRU or LRU layers under the driver's protocol (SEMANTICS.md 10).

    u^0_t    = E[x_t] (token ids) or W_in x_t + b_in (vectors)     (batch, d) at each step
    v^l      = u^{l-1} + mix_l(norm_l(u^{l-1}), state_l, starts)     the layer's scan
    u^l      = v^l + W2_l GLU(W1_l norm'_l(v^l))                     GLU(p, q) = p * sigmoid(q)
    output_t = head(norm_f(u^L_t))                                    (batch, output_size)

mix_l is MinGRU(d, d) (its h is the output) or LRU(d, state_size) (y is the output); the norms
are nn.LayerNorm(d), the GLU's hidden width is expand * d (the LRU paper's block: norm,
recurrence, GLU, skip). The state is the tuple of the layers' states, each (batch, ...), so
state_batch_dim = 0; `starts` goes to every layer, which restarts its own state there.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .scan import LRU, MinGRU, _check_sizes, check_call, check_state

Tensor = torch.Tensor
CELLS = ("mingru", "lru")
OPTIONS = {"mingru": (), "lru": ("r_min", "r_max", "max_phase")}  # cell_options each cell takes


class _Block(nn.Module):
    """One residual block: v = u + mix(norm(u)); v + W2 GLU(W1 norm'(v))."""

    def __init__(self, cell: str, d: int, state_size: int, expand: int, options, **kw) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, **kw)
        if cell == "mingru":
            self.mix = MinGRU(d, d, **options, **kw)
        else:
            self.mix = LRU(d, state_size, **options, **kw)
        self.norm_ff = nn.LayerNorm(d, **kw)
        self.ff_in = nn.Linear(d, 2 * expand * d, **kw)
        self.ff_out = nn.Linear(expand * d, d, **kw)

    def forward(self, u: Tensor, state: Tensor | None, starts: Tensor | None):
        y, state = self.mix(self.norm(u), state, starts=starts)  # (T, batch, d)
        v = u + y
        return v + self.ff_out(F.glu(self.ff_in(self.norm_ff(v)), dim=-1)), state


class ScanLM(nn.Module):
    """Embedding (or input projection), num_layers residual scan blocks, a norm and a head.

    Args:
        cell: "mingru" or "lru".
        input_size: the vocabulary when tokens (x holds ids (T, batch)), else the inputs per
            step (x is (T, batch, input_size)).
        hidden_size: d, the width of the residual stream.
        output_size: the outputs per step (the logits of the next token, for a language model).
        num_layers: residual blocks. state_size: the LRU's complex state (default d).
        expand: the GLU's hidden width is expand * d. tokens: see input_size.
        cell_options: keywords for every layer's MinGRU or LRU (e.g. {"r_min": 0.9}).
        dtype, device: of the parameters.

    forward(x, state=None, *, starts=None) -> (output (T, batch, output_size), state), state the
    tuple of the layers' final states (None: zeros for all).
    """

    state_batch_dim = 0  # every layer's state is (batch, ...)

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        output_size: int,
        *,
        num_layers: int = 2,
        state_size: int | None = None,
        expand: int = 2,
        tokens: bool = True,
        cell_options: dict | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise InputError(f"cell must be one of {CELLS}, got {cell!r}")
        unknown = sorted(set(cell_options or {}) - set(OPTIONS[cell]))
        if unknown:
            raise InputError(
                f"cell_options {unknown} are not options of the {cell} cell; it takes "
                f"{list(OPTIONS[cell]) or 'none'}"
            )
        state_size = hidden_size if state_size is None else state_size
        _check_sizes(
            input_size=input_size,
            hidden_size=hidden_size,
            output_size=output_size,
            num_layers=num_layers,
            state_size=state_size,
            expand=expand,
        )
        kw = {"dtype": dtype, "device": device}
        self.cell, self.tokens, self.input_size = cell, bool(tokens), input_size
        d = hidden_size
        if self.tokens:
            self.embed = nn.Embedding(input_size, d, **kw)
        else:
            self.embed = nn.Linear(input_size, d, **kw)
        self.blocks = nn.ModuleList(
            _Block(cell, d, state_size, expand, cell_options or {}, **kw) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d, **kw)
        self.head = nn.Linear(d, output_size, **kw)

    def forward(
        self, x: Tensor, state: tuple | None = None, *, starts: Tensor | None = None
    ) -> tuple[Tensor, tuple]:
        p = self.head.weight
        check_call(x, None, starts, self.input_size, p.dtype, 1, p.dtype, p.device, self.tokens)
        L, batch = len(self.blocks), x.shape[1]
        if state is None:
            state = (None,) * L
        elif not (isinstance(state, tuple | list) and len(state) == L):
            n = len(state) if isinstance(state, tuple | list) else None
            got = type(state).__name__ + ("" if n is None else f" of {n}")
            raise InputError(f"state must be a tuple of {L} layer states or None, got {got}")
        for i, (block, s) in enumerate(zip(self.blocks, state, strict=True)):
            mix = cast(_Block, block).mix  # torch's nn.ModuleList is not generic: its _Blocks
            check_state(s, batch, mix.hidden_size, mix.state_dtype, p.device, f"state[{i}]")
        u = self.embed(x)  # (T, batch, d)
        new = []
        for block, s in zip(self.blocks, state, strict=True):
            u, s = block(u, s, starts)
            new.append(s)
        return self.head(self.norm(u)), tuple(new)
