"""Each preset against a direct implementation of its system's recipe (issue 3, item 6).

The parameters stay frozen (an optimizer that only records each update's gradients), so the
comparison is exactly "which losses each update backpropagates, and how far": the driver with the
preset's Truncation must record the same gradients, update for update, as the recipe written the
way that system's code does it. The k1 = k2 presets are also compared online with SGD.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tbptt.torch import TBPTT, ElmanRNN, cross_entropy_loss, l2_loss, presets

DT = torch.float64
M, N, P, BATCH = 2, 4, 3, 2


class Recorder(torch.optim.Optimizer):
    """An optimizer that records every update's gradients and leaves the parameters unchanged."""

    def __init__(self, params) -> None:
        super().__init__(list(params), {})
        self.history: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None) -> None:
        ps = [p for g in self.param_groups for p in g["params"]]
        self.history.append([p.grad.clone() for p in ps])


def model(f: str = "tanh", g: str = "identity", batch_first: bool = False) -> ElmanRNN:
    return ElmanRNN(
        n=N, m=M, p=P, bias=g != "softmax", f=f, g=g, batch_first=batch_first, dtype=DT, seed=3
    )


def stream(T: int, classes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, BATCH, M, generator=gen, dtype=DT)
    y = (
        torch.randint(0, P, (T, BATCH), generator=gen)
        if classes
        else torch.randn(T, BATCH, P, generator=gen, dtype=DT)
    )
    return x, y


def with_driver(trunc, net, x, y, loss_fn=l2_loss, chunk: int = 5, batch_first: bool = False):
    """The gradients of every update the driver makes with a recording optimizer."""
    rec = Recorder(net.parameters())
    driver = TBPTT(net, trunc, rec, loss_fn=loss_fn, batch_first=batch_first)
    td = 1 if batch_first else 0
    for a in range(0, x.shape[td], chunk):
        driver.feed(
            x.narrow(td, a, min(chunk, x.shape[td] - a)),
            y.narrow(td, a, min(chunk, y.shape[td] - a)),
        )
    driver.finish()
    return rec.history


def assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g_upd, w_upd in zip(got, want, strict=True):
        for g, w in zip(g_upd, w_upd, strict=True):
            assert (g - w).abs().max() < 1e-10


def grads_of(net) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()]


# -- k1 = k2 = k: state detached between chunks -----------------------------------------------------
def word_language_model(net, x, y, bptt):
    """pytorch/examples word_language_model/main.py train(): repackage_hidden, backward per chunk."""
    out = []
    hidden = None
    for i in range(0, x.shape[0] - bptt + 1, bptt):  # chunks of bptt (the partial one: see presets)
        data, targets = x[i : i + bptt], y[i : i + bptt]
        hidden = None if hidden is None else hidden.detach()  # repackage_hidden
        net.zero_grad()
        output, hidden = net(data, hidden)
        l2_loss(output, targets).sum().backward()
        out.append(grads_of(net))
    return out


def keras_stateful(net, x, y, timesteps):
    """A stateful Keras RNN fit on (batch, timesteps) batches: states kept as values, not graphs."""
    out = []
    states = torch.zeros(BATCH, N, dtype=DT)  # model.reset_states()
    for i in range(0, x.shape[0] // timesteps * timesteps, timesteps):
        net.zero_grad()
        output, new = net(x[i : i + timesteps], states)
        l2_loss(output, y[i : i + timesteps]).sum().backward()
        states = new.detach().clone()  # state.assign(new_state) after the batch
        out.append(grads_of(net))
    return out


def chainer_bproplen(net, x, y, bproplen):
    """Chainer's ptb example: loss += per step; every bproplen steps backward, unchain_backward."""
    out = []
    loss, count, state = 0, 0, None
    for t in range(x.shape[0]):
        output, state = net(x[t : t + 1], state)
        loss = loss + l2_loss(output, y[t : t + 1]).sum()
        count += 1
        if count % bproplen == 0:
            net.zero_grad()  # model.cleargrads()
            loss.backward()
            state = state.detach()  # loss.unchain_backward(): the graph before is cut
            loss = 0
            out.append(grads_of(net))
    return out


def lightning_1x(net, x, y, split_size):
    """Lightning 1.x: tbptt_split_batch along time (dim 1, batch first), hiddens detached."""
    out = []
    T = x.shape[1]
    splits = [(x[:, t : t + split_size], y[:, t : t + split_size]) for t in range(0, T, split_size)]
    hiddens = None
    for xs, ys in splits:
        if xs.shape[1] < split_size:
            break  # the shorter last split: see the preset's note
        net.zero_grad()
        output, hiddens = net(xs, hiddens)  # training_step(batch, batch_idx, hiddens)
        l2_loss(output, ys).sum().backward()
        hiddens = hiddens.detach()
        out.append(grads_of(net))
    return out


@pytest.mark.parametrize(
    "name, recipe",
    [("word_language_model", word_language_model), ("keras_stateful", keras_stateful)],
)
def test_detach_every_k_presets(name: str, recipe) -> None:
    """word_language_model and keras_stateful: k1 = k2 = k, the recipes' gradients per update."""
    x, y = stream(24)
    trunc = presets.PRESETS[name](4)
    assert_same(with_driver(trunc, model(), x, y), recipe(model(), x, y, 4))


def test_chainer_bproplen_preset_with_remainder() -> None:
    """chainer_bproplen: per-step calls, remainder never backpropagated, as flush=False."""
    x, y = stream(23)
    assert_same(
        with_driver(presets.chainer_bproplen(4), model(), x, y), chainer_bproplen(model(), x, y, 4)
    )


def test_lightning_preset_batch_first() -> None:
    """lightning_1x on batch-first data: the same updates as splitting the batch along dim 1."""
    x, y = stream(24)
    x, y = x.transpose(0, 1), y.transpose(0, 1)  # (batch, T, ...)
    got = with_driver(presets.lightning_1x(6), model(batch_first=True), x, y, batch_first=True)
    assert_same(got, lightning_1x(model(batch_first=True), x, y, 6))


def test_detach_every_k_online_equals_word_language_model_sgd() -> None:
    """Online, with SGD and clipping, the preset trains like word_language_model's loop."""
    x, y = stream(24)
    net, ref = model(), model()
    driver = TBPTT(
        net, presets.word_language_model(4), torch.optim.SGD(net.parameters(), lr=0.1), clip=0.25
    )
    for a in range(0, 24, 6):
        driver.feed(x[a : a + 6], y[a : a + 6])
    hidden = None
    for i in range(0, 24, 4):
        hidden = None if hidden is None else hidden.detach()
        ref.zero_grad()
        output, hidden = ref(x[i : i + 4], hidden)
        l2_loss(output, y[i : i + 4]).sum().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.25)
        for p in ref.parameters():
            p.data.add_(p.grad, alpha=-0.1)
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        assert (p - q).abs().max() < 1e-12


# -- Theano: one window at the end --------------------------------------------------------------
def theano_scan(net, x, y, k):
    """scan(truncate_gradient=k): the backward scan visits the last k steps only, in reverse."""
    A, B, C, c = net.A.detach(), net.B.detach(), net.C.detach(), net.c.detach()
    with torch.no_grad():
        _, _ = net(x)
        hs = [torch.zeros(BATCH, N, dtype=DT)]
        for t in range(x.shape[0]):
            hs.append(torch.tanh(x[t] @ B.T + net.b + hs[-1] @ A.T))
    g = {k_: torch.zeros_like(v) for k_, v in net.named_parameters()}
    carry = torch.zeros(BATCH, N, dtype=DT)  # A^T r_{t+1}
    T = x.shape[0]
    for t in range(T, T - k, -1):  # the k steps the reverse scan runs through
        e = hs[t] @ C.T + c - y[t - 1]  # dl_t/dz_t (identity g, L2)
        r = (e @ C + carry) * (1 - hs[t] ** 2)  # delta_t * f'(a_t)
        g["A"] += r.T @ hs[t - 1]
        g["B"] += r.T @ x[t - 1]
        g["b"] += r.sum(0)
        g["C"] += e.T @ hs[t]
        g["c"] += e.sum(0)
        carry = r @ A
    return [[g[k_] for k_, _ in net.named_parameters()]]


def test_theano_scan_preset() -> None:
    """theano_scan(k, T): one update at T, the gradient of the last k steps' losses, k steps deep."""
    x, y = stream(17)
    assert_same(
        with_driver(presets.theano_scan(6, 17), model(), x, y), theano_scan(model(), x, y, 6)
    )


# -- the forum snippet: inject="last" ----------------------------------------------------------
def forum_snippet(net, x, y, k1, k2, clear_state_grads=True):
    """albanD's TBPTT class (discuss.pytorch.org/t/15500): one-step calls, state grads chained."""
    opt = Recorder(net.parameters())
    retain_graph = k1 < k2
    states = [(None, torch.zeros(BATCH, N, dtype=DT))]
    for j in range(x.shape[0]):
        state = states[-1][1].detach()
        state.requires_grad = True
        output, new_state = net(x[j : j + 1], state)
        states.append((state, new_state))
        while len(states) > k2:
            del states[0]
        if (j + 1) % k1 == 0:
            loss = l2_loss(output, y[j : j + 1]).sum()
            opt.zero_grad()
            if clear_state_grads:  # not in the post: the kept states' .grad would accumulate
                for s, _ in states:
                    if s is not None:
                        s.grad = None
            loss.backward(retain_graph=retain_graph)
            for i in range(k2 - 1):
                if states[-i - 2][0] is None:
                    break
                curr_grad = states[-i - 1][0].grad
                states[-i - 2][1].backward(curr_grad, retain_graph=retain_graph)
            opt.step()
    return opt.history


@pytest.mark.parametrize("k1, k2", [(3, 3), (2, 5), (3, 8), (4, 2)])
def test_forum_snippet_preset(k1: int, k2: int) -> None:
    """forum_snippet(k1, k2): the loss at u only, k2 steps back, as the snippet (grads cleared)."""
    x, y = stream(20)
    assert_same(
        with_driver(presets.forum_snippet(k1, k2), model(), x, y),
        forum_snippet(model(), x, y, k1, k2),
    )


def test_forum_snippet_as_posted_leaks_state_gradients() -> None:
    """Without clearing the kept states' .grad, the posted snippet's overlapping updates differ."""
    x, y = stream(20)
    posted = forum_snippet(model(), x, y, 2, 5, clear_state_grads=False)
    fixed = forum_snippet(model(), x, y, 2, 5)
    assert (
        max(
            float((a - b).abs().max())
            for u, v in zip(posted, fixed, strict=True)
            for a, b in zip(u, v, strict=True)
        )
        > 1e-3
    )


# -- Mikolov's RNNLM ------------------------------------------------------------------------------
def rnnlm(net, x, y, bptt, bptt_block):
    """rnnlmlib.cpp learnNet's BPTT branch, frozen weights, gradient-descent sign (er = -their er)."""
    A, B, C = net.A.detach(), net.B.detach(), net.C.detach()
    size = bptt + bptt_block  # the history arrays bptt_history, bptt_hidden
    hidden = [torch.zeros(BATCH, N, dtype=DT)] * (size + 1)  # bptt_hidden[].ac, newest first
    err = [torch.zeros(BATCH, N, dtype=DT)] * (size + 1)  # bptt_hidden[].er
    inputs = [torch.zeros(BATCH, M, dtype=DT)] * (size + 1)  # bptt_history
    h = torch.zeros(BATCH, N, dtype=DT)
    gC = torch.zeros_like(C)
    out = []
    for counter in range(1, x.shape[0] + 1):
        h_prev, h = h, torch.sigmoid(x[counter - 1] @ B.T + h @ A.T)  # computeNet
        e = torch.softmax(h @ C.T, -1) - F.one_hot(y[counter - 1], P).to(DT)  # neu2 error
        gC += e.T @ h  # syn1 (RNNLM applies it at once; summed here per block)
        hidden = [h, *hidden[:-1]]  # shift memory needed for bptt to next time step
        err = [e @ C, *err[:-1]]
        inputs = [x[counter - 1], *inputs[:-1]]
        hidden_prev = [h_prev, *hidden[1:]]  # neu0's hidden part for step 0 is h_{t-1}
        if counter % bptt_block == 0:
            gA, gB = torch.zeros_like(A), torch.zeros_like(B)
            er = err[0]
            for step in range(bptt + bptt_block - 2):
                ac = hidden[step]
                er = er * ac * (1 - ac)  # error derivation at layer 1
                gB += er.T @ inputs[step]  # weight update 1->0, input part
                gA += er.T @ (hidden_prev[step] if step == 0 else hidden[step + 1])
                er = er @ A + err[step + 1]  # propagate error from time T-n to T-n-1
            err = [torch.zeros_like(h)] * (size + 1)  # bptt_hidden[].er = 0
            out.append([gA, gB, gC.clone()])
            gC = torch.zeros_like(C)
    return out


@pytest.mark.parametrize("bptt, block", [(4, 3), (2, 5), (3, 1)])
def test_mikolov_rnnlm_preset(bptt: int, block: int) -> None:
    """mikolov_rnnlm(B, b): every b words, the block's losses, the newest B + b - 2 steps back."""
    x, y = stream(21, classes=True)
    trunc = presets.mikolov_rnnlm(bptt, block)
    net = model(f="sigmoid", g="softmax")
    got = with_driver(trunc, net, x, y, loss_fn=cross_entropy_loss)
    assert_same(got, rnnlm(model(f="sigmoid", g="softmax"), x, y, bptt, block))


def test_presets_are_plain_truncations() -> None:
    """Every preset returns the Truncation the table in presets.py gives."""
    assert presets.word_language_model(35).describe() == "TBPTT(k1=35, k2=35, inject=new)"
    assert presets.theano_scan(5, 50).describe() == "TBPTT(k1=50, k2=5, inject=window)"
    assert presets.forum_snippet(2, 8).describe() == "TBPTT(k1=2, k2=8, inject=last)"
    assert presets.mikolov_rnnlm(4, 10).describe() == "TBPTT(k1=10, k2=12, inject=new)"
    with pytest.raises(ValueError, match="bptt must be an integer >= 2"):
        presets.mikolov_rnnlm(1, 10)
