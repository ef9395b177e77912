"""tbptt: backpropagation through time and truncated BPTT(k1, k2), exactly and fast.

The core needs numpy only. The PyTorch engine lives in `tbptt.torch` (the `torch` extra).

    model = tbptt.ElmanRNN(A, B, C, b=None, c=None, f="tanh", g="identity")
    trunc = tbptt.Truncation(k1, k2, inject="new", flush=False)
    grads = tbptt.gradients(model, x, y, truncation=None, h0=None, loss="l2")
    x = tbptt.OneHot(ids, m)   # integer inputs: B x_t a lookup, dL/dB a scatter-add

Beyond truncation (SEMANTICS.md 8): tbptt.rtrl_gradients (exact, carried forward),
tbptt.uoro_gradients and tbptt.artbp_gradients (unbiased, random), and the online trainers
tbptt.RTRL, tbptt.UORO and tbptt.ARTBP beside tbptt.TBPTT.

The contract every engine implements is SEMANTICS.md (the model, exact BPTT, windows, the
TBPTT(k1, k2) schedule, frozen and online use, streams and resets).
"""

from .errors import InputError, NonFiniteError
from .inputs import OneHot
from .numpy.artbp import ARTBP, artbp_gradients
from .numpy.elman import ElmanRNN
from .numpy.optim import SGD, Adam, clip_grad_norm, grad_norm
from .numpy.rtrl import RTRL, rtrl_gradients
from .numpy.tbptt import gradients, total_loss
from .numpy.trainer import TBPTT
from .numpy.uoro import UORO, uoro_gradients
from .schedule import INJECT_MODES, Truncation, Window

__version__ = "0.1.0"

__all__ = [
    "ARTBP",
    "INJECT_MODES",
    "RTRL",
    "SGD",
    "TBPTT",
    "UORO",
    "Adam",
    "ElmanRNN",
    "InputError",
    "NonFiniteError",
    "OneHot",
    "Truncation",
    "Window",
    "artbp_gradients",
    "clip_grad_norm",
    "grad_norm",
    "gradients",
    "rtrl_gradients",
    "total_loss",
    "uoro_gradients",
]
