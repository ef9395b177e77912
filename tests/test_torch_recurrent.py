"""tbptt.torch.Recurrent as PyTorch users build it: token ids, an nn.Embedding, nn.LSTM or nn.GRU
(batch_first or not), a head (issue 24, C1-C3).

The reference for training is word_language_model's loop (pytorch/examples), written out below:
embedding -> rnn -> decoder, the hidden state detached every k steps (repackage_hidden), the
cross-entropy of the chunk (mean or sum), SGD. TBPTT(k, k) must give its parameters, to 1e-10
in float64, whatever the chunks fed to the driver.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tbptt
from tbptt.torch import TBPTT, ElmanRNN, Recurrent, cross_entropy_loss

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


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_embedding_rnn_head_equals_the_repackage_hidden_loop(cell, batch_first, reduction) -> None:
    """Recurrent(rnn, head, embedding=) under TBPTT(k, k), fed chunks of any lengths, trains the
    parameters of word_language_model's loop, to 1e-10."""
    data, lr = ids(), 0.05 if reduction == "sum" else 0.5
    encoder, rnn, decoder = layers(cell, batch_first)
    model = Recurrent(copy.deepcopy(rnn), copy.deepcopy(decoder), embedding=copy.deepcopy(encoder))
    classic(encoder, rnn, decoder, data, reduction, lr)
    d = TBPTT(
        model,
        tbptt.Truncation(K, K),
        torch.optim.SGD(model.parameters(), lr=lr),
        loss_fn=cross_entropy_loss,
        batch_first=batch_first,
        reduction=reduction,
    )
    for a, b in [(0, 5), (5, 12), (12, 15), (15, 24)]:
        x, y = data[a:b], data[a + 1 : b + 1]
        d.feed(*((x.T, y.T) if batch_first else (x, y)))
    assert d.updates == T // K
    for mine, ref in [(model.embedding, encoder), (model.rnn, rnn), (model.head, decoder)]:
        for (k, p), q in zip(mine.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10, msg=k)
    assert not torch.equal(model.embedding.weight, layers(cell, batch_first)[0].weight)


@pytest.mark.parametrize("batch_first", [False, True])
def test_the_state_is_checked_against_the_embedded_input(batch_first: bool) -> None:
    """A state of the right batch is accepted with ids (batch on axis 1 of the state, whatever
    the layout); one of another batch is refused naming the shape it expected."""
    encoder, rnn, decoder = layers(nn.LSTM, batch_first)
    model = Recurrent(rnn, decoder, embedding=encoder)
    x = ids()[:4].T if batch_first else ids()[:4]
    h = (torch.zeros(1, BATCH, H, dtype=DT), torch.zeros(1, BATCH, H, dtype=DT))
    out, _ = model(x, h)
    assert out.shape == (*x.shape, V)
    bad = (torch.zeros(1, 2, H, dtype=DT), torch.zeros(1, 2, H, dtype=DT))
    with pytest.raises(tbptt.InputError, match=rf"\(\(1, {BATCH}, {H}\), \(1, {BATCH}, {H}\)\)"):
        model(x, bad)


# -- C2: ids without an embedding, OneHot ---------------------------------------------------------
@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU, nn.LSTM])
def test_ids_without_an_embedding_say_to_pass_one(cell) -> None:
    """Integer ids fed to a Recurrent without an embedding: an InputError that says embedding=."""
    torch.manual_seed(0)
    model = Recurrent(cell(3, 4), nn.Linear(4, 3)).to(DT)
    d = TBPTT(model, tbptt.Truncation(2, 2), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(tbptt.InputError, match=r"no embedding.*pass embedding=nn\.Embedding"):
        d.feed(ids()[:4] % 3, ids()[1:5] % 3)
    with pytest.raises(tbptt.InputError, match=r"pass embedding="):
        model(ids()[:4] % 3)


@pytest.mark.parametrize("batch_first", [False, True])
def test_floating_ids_into_an_embedding_say_to_pass_integer_ids(batch_first) -> None:
    """Ids cast to float (a (batch, L) or (L, batch) float tensor) fed to a Recurrent with an
    embedding: one InputError naming x's dtype and asking for integer ids, in feed and predict,
    not a reading of x as one stream of vectors; nothing trained."""
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 4, batch_first=batch_first)
    model = Recurrent(rnn, nn.Linear(4, 5), embedding=nn.Embedding(5, 3)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    d = TBPTT(model, tbptt.Truncation(2, 2), opt, batch_first=batch_first)
    x = ids()[:4] % 5
    x = x.T if batch_first else x
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(tbptt.InputError, match=r"^x must hold integer ids .* got torch\.float"):
        d.feed(x.to(DT), torch.zeros(*x.shape, 5, dtype=DT))
    with pytest.raises(tbptt.InputError, match=r"^x must hold integer ids"):
        d.predict(x.to(DT))
    assert d.t == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU, nn.LSTM])
def test_a_onehot_chunk_trains_as_its_one_hot_rows(cell) -> None:
    """A tbptt.OneHot chunk fed to a Recurrent without an embedding trains as the dense one-hot
    input does, to 1e-12; predict reads it alike."""
    data = ids(1).numpy() % 3
    x, y = data[:-1], torch.randn(T, BATCH, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    results = []
    for chunk in (tbptt.OneHot(x, 3), F.one_hot(torch.as_tensor(x), 3).to(DT)):
        torch.manual_seed(0)
        model = Recurrent(cell(3, 4), nn.Linear(4, 2)).to(DT)
        d = TBPTT(model, tbptt.Truncation(3, 6), torch.optim.SGD(model.parameters(), lr=0.1))
        for a in range(0, T, 8):
            d.feed(chunk[a : a + 8], y[a : a + 8])
        results.append(([p.detach() for p in model.parameters()], d.predict(chunk[:5])[0]))
    for a, b in zip(*(ps + [out] for ps, out in results), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


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
