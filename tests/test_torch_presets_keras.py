"""keras_stateful against the real Keras 3 (torch backend): a stateful LSTM fit on chunks.

Keras and the driver start from the same weights and train the same streams with SGD: Keras with
fit(batch_size=B, shuffle=False) on the full chunks (sample j of every batch is stream j, as its
stateful example lays them out), then on the shorter last chunk; the driver with an nn.LSTM that
holds Keras's weights, under keras_stateful(k, return_sequences=...).

Tolerance: Keras 3.15.1's torch backend computes ops.matmul of float64 tensors in float32
(keras/src/backend/common/dtypes.py, BIT64_TO_BIT32_DTYPE; keras-team/keras#23704), so the two
agree to float32 rounding, not to 1e-10: every parameter within 1e-6 (observed about 1e-8), while
training moves them by more than 1e-2 and each wrong setting (the other return_sequences, no
flush, reduction="sum") lands more than 1e-3 away. The LSTM needs use_cudnn=False: Keras's fused
LSTM path keeps the initial state that the stateful layer then overwrites in place, and backward
fails ("modified by an inplace operation", keras-team/keras#23462); the generic path copies it.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

from tbptt import Truncation
from tbptt.torch import TBPTT, Recurrent, presets


def _import_keras():
    """Keras on the torch backend; KERAS_BACKEND and KERAS_HOME are restored after the import."""
    saved = {k: os.environ.get(k) for k in ("KERAS_BACKEND", "KERAS_HOME")}
    with tempfile.TemporaryDirectory() as home:
        os.environ.update(KERAS_BACKEND="torch", KERAS_HOME=home)  # keras.json there, not in ~
        try:
            return pytest.importorskip("keras")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


keras = _import_keras()
if keras.backend.backend() != "torch":
    pytest.skip("keras was imported earlier with another backend", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings(  # keras 3.15.1 under numpy 2, not ours
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

B, M, N, P = 3, 2, 4, 2  # streams, inputs, LSTM units, outputs
K, T, LR = 5, 23, 0.25  # chunk length (timesteps), steps per stream (4 full chunks + 3), SGD


@pytest.fixture
def float64():
    """Keras's floatx float64 for one test, restored after."""
    old = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(old)


def mse(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Keras's "mse" per step and stream: the mean over the features, (batch, L, p) -> (batch,
    L)."""
    return ((output - y) ** 2).mean(-1)


def keras_fit(weights: list, x: np.ndarray, y: np.ndarray, return_sequences: bool) -> list:
    """Keras's weights after fit() on the full chunks, then on the short last chunk (torch's
    global RNG, which Keras draws from when it builds the layers, is left as it was)."""
    full = T // K * K
    xs = x[:, :full].reshape(B, -1, K, M).swapaxes(0, 1).reshape(-1, K, M)  # (chunks * B, K, m)
    ys = y[:, :full].reshape(B, -1, K, P).swapaxes(0, 1)  # (chunks, B, K, p)
    ys = ys.reshape(-1, K, P) if return_sequences else ys[:, :, -1].reshape(-1, P)
    last = y[:, full:] if return_sequences else y[:, -1]  # the loss at step T only
    with torch.random.fork_rng(devices=[]):
        inp = keras.Input(batch_shape=(B, None, M))
        lstm = keras.layers.LSTM(
            N, stateful=True, return_sequences=return_sequences, use_cudnn=False
        )
        model = keras.Model(inp, keras.layers.Dense(P)(lstm(inp)))
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=LR), loss="mse")
        model.set_weights(weights)
        model.fit(xs, ys, batch_size=B, shuffle=False, epochs=1, verbose=0)
        model.fit(x[:, full:], last, batch_size=B, shuffle=False, epochs=1, verbose=0)
        return model.get_weights()


def driver_fit(weights: list, x: np.ndarray, y: np.ndarray, trunc, reduction: str) -> list:
    """The same weights in nn.LSTM + nn.Linear, trained by the driver; returned in Keras's layout.

    Keras's kernel (m, 4n) and recurrent_kernel (n, 4n) are nn.LSTM's weight_ih and weight_hh
    transposed, with the gates in the same order (i, f, c, o); Keras has one bias, so bias_hh is
    zero and frozen. Dense's kernel (n, p) is nn.Linear's weight transposed.
    """
    lstm = nn.LSTM(M, N, batch_first=True, dtype=torch.float64)
    head = nn.Linear(N, P, dtype=torch.float64)
    kernel, recurrent, bias, dense, dense_bias = (torch.from_numpy(w) for w in weights)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(kernel.T)
        lstm.weight_hh_l0.copy_(recurrent.T)
        lstm.bias_ih_l0.copy_(bias)
        lstm.bias_hh_l0.zero_()
        head.weight.copy_(dense.T)
        head.bias.copy_(dense_bias)
    lstm.bias_hh_l0.requires_grad_(False)
    net = Recurrent(lstm, head)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=LR)
    driver = TBPTT(net, trunc, opt, loss_fn=mse, batch_first=True, reduction=reduction)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for a in range(0, T, 7):  # chunks of any length: the schedule, not the chunks, decides
        driver.feed(xt[:, a : a + 7], yt[:, a : a + 7])
    driver.finish()
    got = (lstm.weight_ih_l0.T, lstm.weight_hh_l0.T, lstm.bias_ih_l0, head.weight.T, head.bias)
    return [w.detach().numpy() for w in got]


def distance(a: list, b: list) -> float:
    return max(float(np.abs(u - v).max()) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("return_sequences", [True, False])
def test_keras_stateful_lstm_trains_as_the_preset(float64, return_sequences: bool) -> None:
    """A stateful Keras LSTM fit on chunks = the driver under keras_stateful (to 1e-6, see top)."""
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((B, T, M)), rng.standard_normal((B, T, P))
    shapes = [(M, 4 * N), (N, 4 * N), (4 * N,), (N, P), (P,)]
    weights = [0.5 * rng.standard_normal(s) for s in shapes]
    want = keras_fit(weights, x, y, return_sequences)
    p = presets.keras_stateful(K, return_sequences=return_sequences)
    got = driver_fit(weights, x, y, p.truncation, p.reduction)
    assert distance(got, want) < 1e-6
    assert distance(want, weights) > 1e-2
    inject = p.truncation.inject
    other = "last" if inject == "new" else "new"
    for trunc, reduction in [
        (Truncation(K, K, inject=other, flush=True), "mean"),  # the other return_sequences
        (Truncation(K, K, inject=inject, flush=False), "mean"),  # the short last chunk left out
        (p.truncation, "sum"),
    ]:
        assert distance(driver_fit(weights, x, y, trunc, reduction), want) > 1e-3
