"""Schedules that reproduce other systems' truncation, as tbptt.Truncation (SEMANTICS.md 4).

Each function returns the plain Truncation(k1, k2, inject, flush) whose windows are the ones that
system backpropagates; tests/test_torch_presets.py checks each against a direct implementation of
that system's recipe. Depth counts the steps a loss's gradient travels, its own step included
(Window.depth).

| preset                      | Truncation                   | losses each update backpropagates     | how far                                 |
|-----------------------------|------------------------------|---------------------------------------|-----------------------------------------|
| word_language_model(k)      | (k, k, "new")                | the k losses of the chunk, once each  | loss j of a chunk: j steps, to its start |
| keras_stateful(k)           | (k, k, "new")                | same                                  | same                                    |
| chainer_bproplen(k)         | (k, k, "new")                | same                                  | same                                    |
| lightning_1x(k)             | (k, k, "new")                | same                                  | same                                    |
| theano_scan(k, T)           | (T, k, "window"), one update | l_{T-k+1} .. l_T, at the end only     | l_t: t - (T-k) steps, to step T-k+1      |
| forum_snippet(k1, k2)       | (k1, k2, "last")             | l_u only (one in k1 losses)           | k2 steps                                |
| mikolov_rnnlm(B, b)         | (b, B+b-2, "new")            | the b losses since the last update    | newest B+b-2 steps, oldest B-1 steps    |

What the presets leave out, where the systems differ from their own schedule:

- word_language_model and Lightning 1.x also train the last, shorter chunk of a sequence (T mod k
  steps) through itself only. The contract's flush window starts at T - k2 + 1, k steps back, so
  no Truncation expresses it: the presets have flush=False and equal those systems when k divides
  the sequence length (Keras needs fixed-length chunks; Chainer never backpropagates a remainder).
  Lightning starts every batch from hiddens=None: feed reset=True at a batch's first step.
- Losses are sums over steps and streams here; those systems take means (a factor in the lr).
- Theano: a layer applied to scan's outputs outside the scan gets the gradient of every step's
  loss; only what runs inside the scan (here the whole model) is truncated.
- The forum snippet (discuss.pytorch.org "Implementing Truncated Backpropagation Through Time",
  albanD's TBPTT class) never zeroes the .grad of its kept states, so with k2 > k1 the state
  gradients of earlier updates leak into later ones, and its in-place optimizer step invalidates
  the graphs it keeps; the preset computes what it intends, by the canonical rule.
- Mikolov's RNNLM (rnnlmlib.cpp, learnNet: `for (step=0; step<bptt+bptt_block-2; step++)`)
  updates the output layer after every word, and backpropagates through the steps before the last
  update with the recurrent weights of now rather than of then. The windows are the same.
"""

from __future__ import annotations

from ..errors import InputError
from ..schedule import Truncation


def word_language_model(bptt: int) -> Truncation:
    """pytorch/examples word_language_model: chunks of `bptt` steps, hidden detached between them."""
    return Truncation(bptt, bptt, inject="new", flush=False)


def keras_stateful(timesteps: int) -> Truncation:
    """Keras stateful RNN fit on batches of `timesteps` steps: the state carries, the gradient not."""
    return Truncation(timesteps, timesteps, inject="new", flush=False)


def chainer_bproplen(bproplen: int) -> Truncation:
    """Chainer's ptb example: accumulate the loss, every bproplen steps backward, unchain_backward."""
    return Truncation(bproplen, bproplen, inject="new", flush=False)


def lightning_1x(truncated_bptt_steps: int) -> Truncation:
    """PyTorch Lightning 1.x truncated_bptt_steps: a batch split along time, hiddens detached."""
    return Truncation(truncated_bptt_steps, truncated_bptt_steps, inject="new", flush=False)


def theano_scan(truncate_gradient: int, T: int) -> Truncation:
    """Theano scan(truncate_gradient=k) over T steps: one backward pass over the last k steps."""
    if isinstance(T, bool) or not isinstance(T, int) or T < truncate_gradient:
        raise InputError(
            f"T must be an integer >= truncate_gradient={truncate_gradient}, got {T!r}"
        )
    return Truncation(T, truncate_gradient, inject="window", flush=False)


def forum_snippet(k1: int, k2: int) -> Truncation:
    """The PyTorch forum's TBPTT(k1, k2) class: every k1 steps, the last loss through k2 steps."""
    return Truncation(k1, k2, inject="last", flush=False)


def mikolov_rnnlm(bptt: int, bptt_block: int) -> Truncation:
    """Mikolov's RNNLM `-bptt B -bptt-block b`: every b words, the block's errors B+b-2 steps back."""
    if isinstance(bptt, bool) or not isinstance(bptt, int) or bptt < 2:
        raise InputError(
            f"bptt must be an integer >= 2 (RNNLM's BPTT branch; bptt 0 or 1 is plain BP), got {bptt!r}"
        )
    return Truncation(bptt_block, bptt + bptt_block - 2, inject="new", flush=False)


PRESETS = {
    "word_language_model": word_language_model,
    "keras_stateful": keras_stateful,
    "chainer_bproplen": chainer_bproplen,
    "lightning_1x": lightning_1x,
    "theano_scan": theano_scan,
    "forum_snippet": forum_snippet,
    "mikolov_rnnlm": mikolov_rnnlm,
}
