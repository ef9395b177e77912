"""tbptt.torch.Recurrent as PyTorch users build it: token ids, an nn.Embedding, nn.LSTM or nn.GRU
(batch_first or not), a head (issue 24, C1-C3).

The reference for training is word_language_model's loop (pytorch/examples), written out below:
embedding -> rnn -> decoder, the hidden state detached every k steps (repackage_hidden), the
cross-entropy of the chunk (mean or sum), SGD. TBPTT(k, k) must give its parameters, to 1e-10
in float64, whatever the chunks fed to the driver.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tbptt
from tbptt.torch import TBPTT, ElmanRNN, Recurrent

DT = torch.float64
V, E, H, BATCH, T, K = 7, 5, 6, 3, 24, 4


def ids(seed: int = 0) -> torch.Tensor:
    """A stream of token ids (T + 1, batch), time-major: inputs [:-1], next-token targets [1:]."""
    return torch.randint(0, V, (T + 1, BATCH), generator=torch.Generator().manual_seed(seed))


def layers(cell: type[nn.RNNBase], batch_first: bool) -> tuple[nn.Embedding, nn.RNNBase, nn.Linear]:
    torch.manual_seed(0)
    return (
        nn.Embedding(V, E).to(DT),
        cell(E, H, batch_first=batch_first).to(DT),
        nn.Linear(H, V).to(DT),
    )


def repackage_hidden(h):
    """word_language_model's: wraps hidden states in new tensors, to detach them from their
    history (the gradient stops at the chunk's start)."""
    return h.detach() if isinstance(h, torch.Tensor) else tuple(repackage_hidden(v) for v in h)


def classic(encoder, rnn, decoder, data, reduction: str, lr: float) -> None:
    """word_language_model's training loop over chunks of K steps (its bptt), in place."""
    params = [*encoder.parameters(), *rnn.parameters(), *decoder.parameters()]
    opt = torch.optim.SGD(params, lr=lr)
    hidden = None
    for i in range(0, T, K):
        inp, target = data[i : i + K], data[i + 1 : i + 1 + K]  # (K, batch)
        if rnn.batch_first:
            inp, target = inp.T, target.T
        if hidden is not None:
            hidden = repackage_hidden(hidden)
        output, hidden = rnn(encoder(inp), hidden)
        logits = decoder(output)
        loss = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), reduction=reduction)
        opt.zero_grad()
        loss.backward()
        opt.step()


# -- C3: width and dtype ------------------------------------------------------------------------
def test_an_input_of_another_width_names_the_width_expected() -> None:
    """x of 4 features into an nn.GRU(3, ...): an InputError naming input_size=3."""
    torch.manual_seed(0)
    model = Recurrent(nn.GRU(3, 4), nn.Linear(4, 2)).to(DT)
    d = TBPTT(model, tbptt.Truncation(2, 2), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(tbptt.InputError, match=r"x has 4 features per step.*input_size=3"):
        d.feed(torch.zeros(5, 2, 4, dtype=DT), torch.zeros(5, 2, 2, dtype=DT))


@pytest.mark.parametrize("kind", ["Recurrent", "ElmanRNN"])
def test_float64_data_into_a_float32_model_names_the_dtype(kind: str) -> None:
    """float64 x into a float32 model is refused naming float32, never cast."""
    torch.manual_seed(0)
    if kind == "Recurrent":
        model: nn.Module = Recurrent(nn.LSTM(3, 4), nn.Linear(4, 2))
    else:
        model = ElmanRNN(n=4, m=3, p=2)
    d = TBPTT(model, tbptt.Truncation(2, 2), torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.zeros(5, 2, 3, dtype=DT)
    with pytest.raises(tbptt.InputError, match=r"x is float64, but .* parameters are float32"):
        d.feed(x, np.zeros((5, 2, 2), np.float32))
    with pytest.raises(tbptt.InputError, match=r"float32"):
        model(x)
