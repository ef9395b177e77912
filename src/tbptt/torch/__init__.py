"""The PyTorch engine: TBPTT(k1, k2) for any recurrent nn.Module (the part of tbptt using torch).

    from tbptt.torch import TBPTT, ElmanRNN, Recurrent, l2_loss, cross_entropy_loss
    model = Recurrent(nn.LSTM(m, hidden, num_layers=2), nn.Linear(hidden, p))
    driver = TBPTT(model, tbptt.Truncation(k1, k2, inject="new"), optimizer, loss_fn=l2_loss)
    for x, y in chunks:                        # (L, batch, m), (L, batch, p); any L
        mean_loss = driver.feed(x, y)          # updates where the schedule says
    driver.finish()                            # the flush update
    driver.save(path)                          # everything needed to continue exactly

The module protocol is module(x_chunk, state) -> (output_chunk, new_state), state a tensor or any
nesting of tuples, lists and dicts of tensors, None meaning the module's zeros; optional: the
keyword starts (the module takes the resets itself), the attributes state_batch_dim and
packable (False: the rows of a call depend on its batch, so resets split the call instead of
packing it; call.py). The schedule is
tbptt.Truncation, the same object as the numpy engine's, and the online update follows the
canonical rule of SEMANTICS.md 5. TBPTT (driver.py) is the one trainer: a shell holding a rule
(rule.py), TBPTT's own for a Truncation (tbptt.py, segments.py). Other systems' training loops as
the driver's arguments (schedule, reduction, restarts): presets.py. The unbiased alternatives to
truncation (SEMANTICS.md 8) on the same protocol, each a TBPTT holding its rule: ARTBP
(artbp.py), UORO (uoro.py) and RTRL (rtrl.py, small modules; forward.py), all four by name in
methods.py. Rollouts for recurrent reinforcement learning (SEMANTICS.md 9): rl.py, packed by
packing.py, a single-layer nn.GRU's rounds with a backward of their own (gru.py). Linear
recurrences as one scan per chunk, taking the resets themselves (SEMANTICS.md 10): MinGRU, LRU
and linear_scan (scan.py), ScanLM (scan_lm.py).
"""

from . import methods, presets, rl
from .artbp import ARTBP
from .driver import TBPTT
from .modules import ElmanRNN, Recurrent, cross_entropy_loss, l2_loss
from .rtrl import RTRL
from .scan import LRU, MinGRU, linear_scan  # linear recurrences as one scan (SEMANTICS.md 10)
from .scan_lm import ScanLM
from .uoro import UORO

__all__ = [
    "ARTBP",
    "LRU",
    "RTRL",
    "TBPTT",
    "UORO",
    "ElmanRNN",
    "MinGRU",
    "Recurrent",
    "ScanLM",
    "cross_entropy_loss",
    "l2_loss",
    "linear_scan",
    "methods",
    "presets",
    "rl",
]
