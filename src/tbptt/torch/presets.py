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

Checked against each system's own source (tests/test_torch_presets.py reimplements each loop;
tests/test_torch_presets_keras.py trains the real Keras):

- word_language_model: pytorch/examples word_language_model/main.py (commit 28d16ff, 2025).
  `hidden = model.init_hidden(args.batch_size)` at the top of train() (line 170): a new stream
  every epoch. get_batch's `seq_len = min(args.bptt, len(source) - 1 - i)` (line 137): the last
  chunk is shorter and trained alone (the flush window). `criterion = nn.NLLLoss()` (line 109)
  averages over the chunk's seq_len * batch tokens: reduction="mean". A factor in the learning
  rate is not the same: `clip_grad_norm_(model.parameters(), args.clip)` (line 189, 0.25 by
  default) clips the averaged gradient.
- Keras 3.15.1: a stateful RNN keeps its state in non-trainable variables assigned after every
  call (keras/src/layers/rnn/rnn.py line 442, `self_state.assign(state)`; a copy_ under no_grad on
  the torch backend, backend/torch/core.py lines 116-118): the value carries to the next batch, the
  gradient does not. Only reset_state() zeroes them (rnn.py line 328); fit() never does. The
  batch size must be static (rnn.py line 283); a batch's timesteps are free, so a last, shorter
  batch is trained alone (flush). return_sequences=False (the default, and the stateful example,
  keras 2.3.1 examples/lstm_stateful.py) returns the last output only (rnn.py line 444): one loss
  per chunk, at its last step, inject="last". The default loss reduction "sum_over_batch_size"
  divides the sum by the number of loss elements (losses/loss.py line 159), after "mse" has
  averaged over the features (losses/losses.py line 1788): reduction="mean" with a loss_fn that
  averages over the features.
- Chainer (v7, examples/ptb/train_ptb.py): BPTTUpdater.update_core (lines 149-172) adds
  `optimizer.target(x, t)` for bprop_len steps, then backward(), unchain_backward(), update():
  disjoint chunks, the loss summed over time. Each step's loss is softmax_cross_entropy averaged
  over the batch (reduce="mean"): reduction="sum" with a loss_fn divided by the batch size. The
  iterator wraps around the data (`(offset + self.iteration) % len(self.dataset)`, line 119) and
  nothing resets the trained model's state; every update takes bprop_len steps, so no flush.
- Lightning 1.x (1.9.0): LightningModule.tbptt_split_batch splits each batch along time,
  `x[:, t : t + split_size]` (core/module.py line 1817), the last split shorter; each split is one
  training_step and one optimizer step, the previous split's hiddens detached
  (loops/utilities.py line 68), and `self.optimizer_loop._hiddens = None` after every batch
  (loops/batch/training_batch_loop.py line 98): a new stream per batch, its short last split
  trained alone. Lightning backpropagates what training_step returns: reduction="mean" for the
  usual mean losses (F.cross_entropy, F.mse_loss).
- Mikolov's RNNLM 0.4b: rnnlm.cpp parses -bptt B and increments it (`bptt++`, line 544).
  learnNet (rnnlmlib.cpp) backpropagates one step when bptt <= 1 (line 1382: `-bptt 0`, the
  default, is plain backpropagation after every word, TBPTT(1, 1), whatever -bptt-block), else
  every bptt_block words (line 1406) runs `for (step=0; step<bptt+bptt_block-2; step++)` (line
  1407) over the incremented value: B + b - 1 steps, so `-bptt 1` is BPTT over the block. The
  block's errors enter the loop at their own steps, summed, and are zeroed after it (line 1437):
  each loss once, inject="new". A build of 0.4b with a print after that loop runs 6 steps for
  `-bptt 3 -bptt-block 4` and 3 for `-bptt 1 -bptt-block 3`. Every epoch starts from h = 0.1
  (netFlush, line 936; state0 in the driver), and the words after an epoch's last full block get
  no BPTT update in that epoch (no flush).
- Theano: the gradient of scan stops after `grad_steps = tensor.minimum(grad_steps,
  self.truncate_gradient)` steps (theano/scan_module/scan_op.py).

Where the systems differ from the driver beyond the windows:

- RNNLM updates its output layer after every word, backpropagates through the steps before the
  last update with the recurrent weights of now rather than of then, and with -independent adds
  an update and a reset at every sentence end, off the schedule. Its history (bptt_hidden) is not
  cleared between epochs, so the first block of an epoch can reach into the previous epoch's last
  activations and the errors of its words after the last block.
- Keras 3.15.1 on the torch backend: a stateful LSTM trains only with use_cudnn=False (the fused
  path keeps the initial state that the layer then overwrites in place; keras-team/keras#23462),
  and ops.matmul computes float64 tensors in float32 (keras-team/keras#23704).
- Theano: a layer applied to scan's outputs outside the scan gets the gradient of every step's loss.
- The forum snippet (discuss.pytorch.org "Implementing Truncated Backpropagation Through Time",
  albanD's TBPTT class) never zeroes the .grad of its kept states, so with k2 > k1 the state
  gradients of earlier updates leak into later ones, and its in-place optimizer step invalidates
  the graphs it keeps; the preset computes what it intends, by the canonical rule. Its update
  backpropagates loss_module(output, target) of the update step: reduction="mean" if that loss
  averages over the batch.
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
