"""Presets: other systems' training loops as the driver's arguments (SEMANTICS.md 4 and 5).

Each function returns a Preset: the Truncation whose windows that system backpropagates, the
reduction= that gives its loss, and when the system starts its state over. One stream of the
driver (one TBPTT, ended by finish()) is what runs between two restarts; with flush, finish()
trains the stream's last, shorter chunk alone, as these systems do:

    p = presets.word_language_model(35)
    for epoch in range(epochs):          # init_hidden() at the top of train(): a new stream
        driver = TBPTT(model, p.truncation, optimizer, reduction=p.reduction, clip=0.25)
        for x, y in chunks:
            driver.feed(x, y)
        driver.finish()                  # the short last chunk, averaged over its own losses

    preset                                      truncation               reduction  restart
    word_language_model(k)                      (k, k, "new", flush)     mean       every epoch
    keras_stateful(k, return_sequences=True)    (k, k, "new", flush)     mean       reset_state()
    keras_stateful(k, return_sequences=False)   (k, k, "last", flush)    mean       reset_state()
    chainer_bproplen(k)                         (k, k, "new")            sum        never
    lightning_1x(k)                             (k, k, "new", flush)     mean       every batch
    theano_scan(k, T)                           (T, k, "window")         sum        every sequence
    forum_snippet(k1, k2)                       (k1, k2, "last")         sum        every sequence
    mikolov_rnnlm(B, b), B >= 1                 (b, B + b - 1, "new")    sum        every epoch
    mikolov_rnnlm(0, b)                         (1, 1, "new")            sum        every epoch

(theano_scan: one update, at the end; RNNLM restarts from h = 0.1)

Each preset was checked against the system's own source (tests/test_torch_presets.py reimplements
each loop; tests/test_torch_presets_keras.py trains the real Keras): the files and lines, and where
the systems differ from the driver beyond the windows, are in docs/torch.md ("Presets").
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..schedule import Truncation


@dataclass(frozen=True)
class Preset:
    """A system's training loop in the driver's terms.

    truncation: the windows, TBPTT(model, truncation, ...).
    reduction: the driver's reduction= ("sum" or "mean") that gives the system's loss.
    restart: when the system starts its state over: end the stream there (finish(), which trains
        a last, shorter chunk where truncation.flush) and start a new TBPTT.
    """

    truncation: Truncation
    reduction: str
    restart: str

    def describe(self) -> str:
        """One line: 'TBPTT(k1=35, k2=35, inject=new, flush), reduction=mean, restart every epoch'
        (for instance)."""
        return f"{self.truncation.describe()}, reduction={self.reduction}, restart {self.restart}"


def _check(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InputError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


def word_language_model(bptt: int) -> Preset:
    """pytorch/examples word_language_model: chunks of `bptt` steps, the mean loss of each."""
    k = _check("bptt", bptt, 1)
    return Preset(Truncation(k, k, inject="new", flush=True), "mean", "every epoch")


def keras_stateful(timesteps: int, *, return_sequences: bool) -> Preset:
    """A stateful Keras RNN fit on batches of `timesteps` steps (the state carries, the gradient
    not); its loss at every step (return_sequences=True) or at each chunk's last (False)."""
    k = _check("timesteps", timesteps, 1)
    if not isinstance(return_sequences, bool):
        raise InputError(f"return_sequences must be a bool, got {return_sequences!r}")
    inject = "new" if return_sequences else "last"
    return Preset(Truncation(k, k, inject=inject, flush=True), "mean", "at reset_state()")


def chainer_bproplen(bproplen: int) -> Preset:
    """Chainer's ptb example: the per-step batch means summed, every bproplen steps backward and
    unchain_backward (pass a loss_fn divided by the batch size)."""
    k = _check("bproplen", bproplen, 1)
    return Preset(Truncation(k, k, inject="new", flush=False), "sum", "never")


def lightning_1x(truncated_bptt_steps: int) -> Preset:
    """PyTorch Lightning 1.x truncated_bptt_steps: each batch split along time, hiddens detached."""
    k = _check("truncated_bptt_steps", truncated_bptt_steps, 1)
    return Preset(Truncation(k, k, inject="new", flush=True), "mean", "every batch")


def theano_scan(truncate_gradient: int, T: int) -> Preset:
    """Theano scan(truncate_gradient=k) over T steps: one backward pass over the last k steps."""
    k = _check("truncate_gradient", truncate_gradient, 1)
    T = _check("T", T, k)
    return Preset(Truncation(T, k, inject="window", flush=False), "sum", "every sequence")


def forum_snippet(k1: int, k2: int) -> Preset:
    """The PyTorch forum's TBPTT(k1, k2) class: every k1 steps, the last loss through k2 steps."""
    return Preset(Truncation(k1, k2, inject="last", flush=False), "sum", "every sequence")


def mikolov_rnnlm(bptt: int, bptt_block: int) -> Preset:
    """Mikolov's RNNLM `-bptt B -bptt-block b`: every b words, the block's errors B + b - 1 steps
    back (B >= 1); B = 0, its default, is plain backpropagation after every word."""
    B = _check("bptt", bptt, 0)
    b = _check("bptt_block", bptt_block, 1)
    if B == 0:  # learnNet's `if (bptt<=1)` branch: one step, every word
        return Preset(Truncation(1, 1, inject="new"), "sum", "every epoch, from h = 0.1")
    return Preset(Truncation(b, B + b - 1, inject="new"), "sum", "every epoch, from h = 0.1")


PRESETS = {
    "word_language_model": word_language_model,
    "keras_stateful": keras_stateful,
    "chainer_bproplen": chainer_bproplen,
    "lightning_1x": lightning_1x,
    "theano_scan": theano_scan,
    "forum_snippet": forum_snippet,
    "mikolov_rnnlm": mikolov_rnnlm,
}
