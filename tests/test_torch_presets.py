"""Each preset against a direct reimplementation of its system's published loop.

Most comparisons freeze the parameters (an optimizer that only records each update's gradients),
so they check exactly "which losses each update backpropagates, how far, and how they are
reduced": the driver under the preset must record the same gradients, update for update, as the
loop written the way that system's code does it (cited in src/tbptt/torch/presets.py). The
word_language_model loop is also run online with its SGD and clipping, over two epochs. The real
Keras is trained in tests/test_torch_presets_keras.py.

Tolerance 1e-12 in float64: the driver's reduction="mean" divides the summed gradient by the
count after backward, where these loops backpropagate a mean, so the last bits may differ.
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


def stream(T: int, classes: bool = False, seed: int | None = None):
    gen = torch.Generator().manual_seed(T if seed is None else seed)
    x = torch.randn(T, BATCH, M, generator=gen, dtype=DT)
    y = (
        torch.randint(0, P, (T, BATCH), generator=gen)
        if classes
        else torch.randn(T, BATCH, P, generator=gen, dtype=DT)
    )
    return x, y


def with_driver(preset, net, x, y, loss_fn=l2_loss, chunk: int = 5, rec=None):
    """The gradients of every update the driver makes under the preset, recorded (one stream)."""
    rec = Recorder(net.parameters()) if rec is None else rec
    driver = TBPTT(net, preset.truncation, rec, loss_fn=loss_fn, reduction=preset.reduction)
    for a in range(0, x.shape[0], chunk):
        driver.feed(x[a : a + chunk], y[a : a + chunk])
    driver.finish()
    return rec.history


def assert_same(got: list, want: list, tol: float = 1e-12) -> None:
    assert len(got) == len(want)
    for g_upd, w_upd in zip(got, want, strict=True):
        for g, w in zip(g_upd, w_upd, strict=True):
            assert (g - w).abs().max() <= tol * max(1.0, float(w.abs().max()))


def grads_of(net) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()]


def distance(net, ref) -> float:
    """The largest parameter difference between two models."""
    pairs = zip(net.parameters(), ref.parameters(), strict=True)
    return max(float((p - q).detach().abs().max()) for p, q in pairs)


# -- word_language_model: chunks of bptt, the last one shorter, the mean loss -------------------
def word_language_model(net, x, y, bptt):
    """main.py train(): init_hidden, then for every chunk (get_batch: the last one shorter)
    repackage_hidden, zero_grad, the criterion's mean over the chunk, backward."""
    out = []
    hidden = None  # hidden = model.init_hidden(args.batch_size): zeros
    for i in range(0, x.shape[0], bptt):
        data, targets = x[i : i + bptt], y[i : i + bptt]  # seq_len = min(bptt, len - 1 - i)
        hidden = None if hidden is None else hidden.detach()  # repackage_hidden
        net.zero_grad()
        output, hidden = net(data, hidden)
        l2_loss(output, targets).mean().backward()  # a mean over seq_len * batch, as NLLLoss
        out.append(grads_of(net))
    return out


def test_word_language_model_preset_trains_the_short_last_chunk() -> None:
    """word_language_model(4) on 23 steps: five chunks of 4 and one of 3, each its mean loss."""
    x, y = stream(23)
    got = with_driver(presets.word_language_model(4), model(), x, y)
    assert len(got) == 6
    assert_same(got, word_language_model(model(), x, y, 4))


def wlm_online(net, x, y, bptt: int, lr: float, clip: float, epochs: int) -> None:
    """main.py's loop: per epoch, train() from init_hidden; SGD by hand after clip_grad_norm_."""
    for _epoch in range(epochs):
        hidden = None  # init_hidden at the top of train(): every epoch starts from zeros
        for i in range(0, x.shape[0], bptt):
            hidden = None if hidden is None else hidden.detach()
            net.zero_grad()
            output, hidden = net(x[i : i + bptt], hidden)
            F.cross_entropy(output.reshape(-1, P), y[i : i + bptt].reshape(-1)).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            for p in net.parameters():
                p.data.add_(p.grad, alpha=-lr)


def driver_online(net, x, y, preset, lr: float, clip: float, epochs: int) -> None:
    """The same with the driver: a new TBPTT (a new stream) every epoch, finish() at its end."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _epoch in range(epochs):
        driver = TBPTT(
            net,
            preset.truncation,
            opt,
            loss_fn=cross_entropy_loss,
            clip=clip,
            reduction=preset.reduction,
        )
        for a in range(0, x.shape[0], 6):
            driver.feed(x[a : a + 6], y[a : a + 6])
        driver.finish()


def test_word_language_model_online_over_two_epochs() -> None:
    """Online, SGD with clip 0.25: the preset, a stream per epoch, trains as main.py's loop."""
    x, y = stream(23, classes=True)
    net, ref = model(g="softmax"), model(g="softmax")
    driver_online(net, x, y, presets.word_language_model(4), lr=2.0, clip=0.25, epochs=2)
    wlm_online(ref, x, y, 4, lr=2.0, clip=0.25, epochs=2)
    assert distance(net, ref) < 1e-12
    assert distance(model(g="softmax"), ref) > 1e-2  # trained: the comparison says something


def test_word_language_model_mean_is_not_a_factor_in_the_lr() -> None:
    """Summed losses with lr / (bptt * batch) train otherwise: the clip sees the summed gradient."""
    x, y = stream(23, classes=True)
    net, ref = model(g="softmax"), model(g="softmax")
    summed = presets.Preset(presets.word_language_model(4).truncation, "sum", "every epoch")
    driver_online(net, x, y, summed, lr=2.0 / (4 * BATCH), clip=0.25, epochs=2)
    wlm_online(ref, x, y, 4, lr=2.0, clip=0.25, epochs=2)
    assert distance(net, ref) > 1e-2


# -- Chainer: the per-step batch means summed over bproplen steps -------------------------------
def chainer_bproplen(net, x, y, bproplen):
    """train_ptb.py BPTTUpdater.update_core: loss += the step's batch mean for bprop_len steps,
    then cleargrads, backward, unchain_backward, update."""
    out = []
    loss, count, state = 0, 0, None
    for t in range(x.shape[0]):
        output, state = net(x[t : t + 1], state)
        loss = loss + l2_loss(output, y[t : t + 1]).mean()  # softmax_cross_entropy: batch mean
        count += 1
        if count % bproplen == 0:
            net.zero_grad()  # model.cleargrads()
            loss.backward()
            state = state.detach()  # loss.unchain_backward(): the graph before is cut
            loss = 0
            out.append(grads_of(net))
    return out


def test_chainer_bproplen_preset() -> None:
    """chainer_bproplen(4) with loss_fn / batch: the updater's gradients; the remainder
    untrained."""
    x, y = stream(23)
    got = with_driver(
        presets.chainer_bproplen(4), model(), x, y, loss_fn=lambda o, t: l2_loss(o, t) / BATCH
    )
    assert len(got) == 5
    assert_same(got, chainer_bproplen(model(), x, y, 4))


# -- Lightning 1.x: every batch split along time, hiddens reset between batches -----------------
def lightning_1x(net, batches, split_size):
    """Per batch: tbptt_split_batch along dim 1 (`x[:, t : t + split_size]`, the last split
    shorter), one training_step and step per split with the previous hiddens detached; hiddens
    None again for the next batch; training_step returns a mean loss."""
    out = []
    for xb, yb in batches:
        hiddens = None  # optimizer_loop._hiddens = None after every batch
        for t in range(0, xb.shape[1], split_size):
            net.zero_grad()
            output, hiddens = net(xb[:, t : t + split_size], hiddens)
            l2_loss(output, yb[:, t : t + split_size]).mean().backward()
            hiddens = hiddens.detach()  # recursive_detach
            out.append(grads_of(net))
    return out


def test_lightning_preset_two_batches() -> None:
    """lightning_1x(6), a stream per batch: the same updates as two batch-first batches of 23."""
    batches = []
    for seed in (1, 2):
        x, y = stream(23, seed=seed)
        batches.append((x.transpose(0, 1), y.transpose(0, 1)))  # (batch, T, ...)
    p = presets.lightning_1x(6)
    net = model(batch_first=True)
    rec = Recorder(net.parameters())
    for xb, yb in batches:
        driver = TBPTT(net, p.truncation, rec, batch_first=True, reduction=p.reduction)
        driver.feed(xb, yb)
        driver.finish()
    assert len(rec.history) == 8
    assert_same(rec.history, lightning_1x(model(batch_first=True), batches, 6))


# -- Theano: one window at the end --------------------------------------------------------------
def theano_scan(net, x, y, k):
    """scan(truncate_gradient=k): the backward scan visits the last k steps only, in reverse."""
    A, B, C, c = net.A.detach(), net.B.detach(), net.C.detach(), net.c.detach()
    with torch.no_grad():
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
    """theano_scan(k, T): one update at T, the gradient of the last k steps' losses, k steps
    deep."""
    x, y = stream(17)
    assert_same(
        with_driver(presets.theano_scan(6, 17), model(), x, y),
        theano_scan(model(), x, y, 6),
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
def rnnlm(net, x, y, bptt_flag, bptt_block):
    """rnnlm.cpp and rnnlmlib.cpp learnNet, frozen weights, gradient-descent sign (-their er)."""
    bptt = bptt_flag + 1  # rnnlm.cpp: `bptt=atoi(argv[i+1]); bptt++;`
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
        if bptt <= 1:  # `if (bptt<=1)`: plain backpropagation after every word, one step
            er = (e @ C) * h * (1 - h)  # error derivation at layer 1
            out.append([er.T @ h_prev, er.T @ x[counter - 1], gC.clone()])
            gC = torch.zeros_like(C)
            continue
        hidden = [h, *hidden[:-1]]  # shift memory needed for bptt to next time step
        err = [e @ C, *err[:-1]]
        inputs = [x[counter - 1], *inputs[:-1]]
        hidden_prev = [h_prev, *hidden[1:]]  # neu0's hidden part for step 0 is h_{t-1}
        if counter % bptt_block == 0:
            gA, gB = torch.zeros_like(A), torch.zeros_like(B)
            er = err[0]
            for step in range(bptt + bptt_block - 2):  # bptt already incremented
                ac = hidden[step]
                er = er * ac * (1 - ac)  # error derivation at layer 1
                gB += er.T @ inputs[step]  # weight update 1->0, input part
                gA += er.T @ (hidden_prev[step] if step == 0 else hidden[step + 1])
                er = er @ A + err[step + 1]  # propagate error from time T-n to T-n-1
            err = [torch.zeros_like(h)] * (size + 1)  # bptt_hidden[].er = 0
            out.append([gA, gB, gC.clone()])
            gC = torch.zeros_like(C)
    return out


@pytest.mark.parametrize("bptt, block", [(4, 3), (2, 5), (3, 4), (3, 1), (1, 3), (1, 1), (0, 3)])
def test_mikolov_rnnlm_preset(bptt: int, block: int) -> None:
    """mikolov_rnnlm(B, b): every b words the block's losses, B + b - 1 steps back; B = 0 is BP."""
    x, y = stream(21, classes=True)
    net = model(f="sigmoid", g="softmax")
    got = with_driver(presets.mikolov_rnnlm(bptt, block), net, x, y, loss_fn=cross_entropy_loss)
    assert_same(got, rnnlm(model(f="sigmoid", g="softmax"), x, y, bptt, block))


def test_presets_state_truncation_reduction_and_restart() -> None:
    """Every preset gives the schedule, reduction and restart of the table in presets.py."""
    rnnlm_restart = "every epoch, from h = 0.1"
    for preset, schedule, reduction, restart in [
        (presets.word_language_model(35), "35, 35, new, flush", "mean", "every epoch"),
        (
            presets.keras_stateful(10, return_sequences=True),
            "10, 10, new, flush",
            "mean",
            "at reset_state()",
        ),
        (
            presets.keras_stateful(10, return_sequences=False),
            "10, 10, last, flush",
            "mean",
            "at reset_state()",
        ),
        (presets.chainer_bproplen(35), "35, 35, new", "sum", "never"),
        (presets.lightning_1x(20), "20, 20, new, flush", "mean", "every batch"),
        (presets.theano_scan(5, 50), "50, 5, window", "sum", "every sequence"),
        (presets.forum_snippet(2, 8), "2, 8, last", "sum", "every sequence"),
        (presets.mikolov_rnnlm(4, 10), "10, 13, new", "sum", rnnlm_restart),
        (presets.mikolov_rnnlm(1, 10), "10, 10, new", "sum", rnnlm_restart),
        (presets.mikolov_rnnlm(0, 10), "1, 1, new", "sum", rnnlm_restart),
    ]:
        tr = preset.truncation
        got = f"{tr.k1}, {tr.k2}, {tr.inject}" + (", flush" if tr.flush else "")
        assert (got, preset.reduction, preset.restart) == (schedule, reduction, restart)


def test_preset_arguments_are_checked() -> None:
    """keras_stateful needs return_sequences by keyword; bad numbers name the argument."""
    with pytest.raises(TypeError, match="return_sequences"):
        presets.keras_stateful(10)
    with pytest.raises(ValueError, match="return_sequences must be a bool"):
        presets.keras_stateful(10, return_sequences=1)
    with pytest.raises(ValueError, match="bptt must be an integer >= 0, got -1"):
        presets.mikolov_rnnlm(-1, 10)
    with pytest.raises(ValueError, match="bptt_block must be an integer >= 1, got 0"):
        presets.mikolov_rnnlm(3, 0)
    with pytest.raises(ValueError, match="T must be an integer >= 5, got 4"):
        presets.theano_scan(5, 4)
