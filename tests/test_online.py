"""Online TBPTT (SEMANTICS.md 5-6, invariant 7.6): tbptt.TBPTT against a torch autograd twin."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import OnlineTBPTT, Problem, assert_close, plain_detach_training, rel_err

import tbptt
from tbptt import SGD, TBPTT, Adam, Truncation

OPTIMIZERS = {
    "sgd": SGD(lr=0.1),
    "momentum": SGD(lr=0.05, momentum=0.9),
    "nesterov": SGD(lr=0.05, momentum=0.8, nesterov=True),
    "adam": Adam(lr=0.01),
}


def pieces(P: Problem, chunks: list[int]):
    """(x, y, mask, reset) chunk by chunk, of the given lengths."""
    t = 0
    for c in chunks:
        sl = slice(t, t + c)
        yield P.x[sl], P.y[sl], _cut(P.mask, sl), _cut(P.reset, sl)
        t += c
    assert t == P.T


def _cut(a: np.ndarray | None, sl: slice) -> np.ndarray | None:
    return None if a is None else a[sl]


def run_both(P, tr, opt, chunks, clip=None, rtol=1e-10, reduction="sum", **kw):
    """Feed the same chunks to the engine and the oracle; compare after every chunk and finish."""
    eng = TBPTT(P.model, tr, opt, loss=P.loss, clip=clip, h0=P.h0, reduction=reduction)
    kw["reduction"] = reduction
    ref = OnlineTBPTT(P.model, tr, opt, loss=P.loss, clip=clip, h0=P.h0, **kw)
    for x, y, mask, reset in pieces(P, chunks):
        got = eng.feed(x, y, mask=mask, reset=reset)
        want = ref.feed(x, y, mask=mask, reset=reset)
        assert abs(got - want) <= 1e-10 * max(abs(want), 1.0)  # the loss of the forward pass
        assert eng.updates == ref.updates and eng.t == ref.t and eng.u_prev == ref.u_prev
        assert_close(eng.model.params, ref.params, rtol=rtol)
    eng.finish()
    ref.finish()
    assert eng.updates == ref.updates
    assert_close(eng.model.params, ref.params, rtol=rtol)
    return eng, ref


# -- update by update against the canonical rule -------------------------------------------------
@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("inject", tbptt.INJECT_MODES)
def test_online_matches_canonical_rule_update_by_update(opt, inject):
    """Step-by-step chunks, k2 not a multiple of k1: every update equals the autograd twin's."""
    P = Problem(T=17, batch=2, h0=True, seed=50)
    run_both(P, Truncation(2, 5, inject, flush=True), OPTIMIZERS[opt], [1] * 17)


@pytest.mark.parametrize("inject", tbptt.INJECT_MODES)
@pytest.mark.parametrize(("k1", "k2"), [(3, 3), (2, 5), (4, 6)])
def test_online_mean_reduction_matches_the_oracle(inject, k1, k2):
    """reduction="mean": each update is the derivative of its injected losses' weighted mean
    (masks with fractional weights, resets, the flush window's shorter chunk), as autograd's."""
    if inject == "new" and k2 < k1:
        return
    P = Problem(T=17, batch=3, h0=True, mask=True, reset=True, seed=57)
    P.mask = P.mask * np.random.default_rng(0).uniform(0.2, 1.0, P.mask.shape)
    tr = Truncation(k1, k2, inject, flush=True)
    mean, _ = run_both(P, tr, OPTIMIZERS["sgd"], [4, 6, 7], reduction="mean")
    total, _ = run_both(P, tr, OPTIMIZERS["sgd"], [4, 6, 7])
    assert rel_err(mean.model.params["A"], total.model.params["A"]) > 1e-3  # it divides


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("clip", [0.05, 0.5])
def test_online_clipping_matches_torch(opt, clip):
    """Gradient-norm clipping equals torch.nn.utils.clip_grad_norm_ before each step."""
    P = Problem(T=14, batch=2, seed=51)
    tr = Truncation(3, 4, "new", flush=True)
    eng, ref = run_both(P, tr, OPTIMIZERS[opt], [1] * 14, clip=clip)
    unclipped = TBPTT(P.model, tr, OPTIMIZERS[opt])
    unclipped.feed(P.x, P.y)
    unclipped.finish()
    assert rel_err(unclipped.model.params["A"], eng.model.params["A"]) > 1e-6  # clipping acted


@pytest.mark.parametrize("opt", ["momentum", "adam"])
@pytest.mark.parametrize("inject", tbptt.INJECT_MODES)
def test_online_resets_and_masks(opt, inject):
    """Resets restart a stream from h0 as a constant, masks switch losses off; same as autograd."""
    P = Problem(T=16, batch=3, h0=True, mask=True, reset=True, seed=52)
    run_both(P, Truncation(3, 5, inject, flush=True), OPTIMIZERS[opt], [1] * 16)


@pytest.mark.parametrize("chunks", [[16], [5, 5, 5, 1], [2, 7, 1, 1, 5], [4, 4, 4, 4]])
@pytest.mark.parametrize(("k1", "k2"), [(3, 7), (3, 3), (4, 6)])
def test_online_chunks_not_aligned_with_k1(chunks, k1, k2):
    """Chunk lengths that do not align with k1 give the canonical rule's parameters."""
    P = Problem(T=16, batch=2, mask=True, reset=True, seed=53)
    run_both(P, Truncation(k1, k2, "new", flush=True), OPTIMIZERS["adam"], chunks)


def test_online_chunking_does_not_matter():
    """Any chunking of one stream trains to the same parameters."""
    P = Problem(T=20, batch=2, mask=True, reset=True, seed=54)
    tr = Truncation(3, 5, "window", flush=True)
    results = []
    for chunks in ([20], [1] * 20, [7, 6, 7], [2, 3, 5, 10]):
        eng = TBPTT(P.model, tr, OPTIMIZERS["momentum"])
        for x, y, mask, reset in pieces(P, chunks):
            eng.feed(x, y, mask=mask, reset=reset)
        eng.finish()
        results.append(eng.model.params)
    for other in results[1:]:
        assert_close(other, results[0], rtol=1e-12)


@pytest.mark.parametrize(
    "kind", ["single", "no-bias", "cross-entropy", "ce-single", "softmax-l2", "relu-sigmoid"]
)
def test_online_model_variants(kind):
    """One stream, no biases, cross-entropy, softmax with L2, relu/sigmoid: same as autograd."""
    opts = {
        "single": {},
        "no-bias": {"batch": 2, "bias": False},
        "cross-entropy": {"batch": 2, "p": 3, "loss": "cross_entropy", "mask": True},
        "ce-single": {"p": 3, "loss": "cross_entropy", "reset": True},
        "softmax-l2": {"batch": 2, "p": 3, "g": "softmax"},
        "relu-sigmoid": {"batch": 2, "f": "relu", "g": "sigmoid"},
    }[kind]
    P = Problem(T=13, seed=55, **opts)
    run_both(P, Truncation(2, 3, "new", flush=True), OPTIMIZERS["adam"], [4, 4, 5])


@pytest.mark.parametrize("flush", [False, True])
def test_online_flush_only_on_finish(flush):
    """Without flush the tail after the last update trains nothing; with flush finish() updates."""
    P = Problem(T=11, batch=2, seed=56)
    eng, ref = run_both(P, Truncation(4, 6, "new", flush=flush), OPTIMIZERS["sgd"], [11])
    assert eng.updates == 2 + flush


def test_online_k2_beyond_stream_start():
    """k2 larger than every update time: windows reach back to step 1 and stop there."""
    P = Problem(T=9, batch=2, h0=True, seed=57)
    run_both(P, Truncation(2, 20, "new", flush=True), OPTIMIZERS["momentum"], [1] * 9)


def test_online_k1_beyond_stream_trains_only_on_flush():
    """k1 > T: no update while feeding; flush makes the one update."""
    P = Problem(T=5, batch=2, seed=58)
    eng, _ = run_both(P, Truncation(8, 8, "new", flush=True), OPTIMIZERS["sgd"], [2, 3])
    assert eng.updates == 1


def test_online_is_not_recomputation():
    """With k2 > k1 the canonical rule differs from re-running windows with current parameters;
    with k1 = k2 the two coincide."""
    P = Problem(T=15, batch=2, seed=59)
    for k1, k2, differs in ((3, 7, True), (3, 3, False)):
        tr = Truncation(k1, k2, "new", flush=True)
        eng = TBPTT(P.model, tr, OPTIMIZERS["sgd"])
        eng.feed(P.x, P.y)
        eng.finish()
        recomputed = OnlineTBPTT(P.model, tr, OPTIMIZERS["sgd"], recompute=True)
        recomputed.feed(P.x, P.y)
        recomputed.finish()
        err = rel_err(eng.model.params["A"], recomputed.params["A"])
        assert (err > 1e-6) if differs else (err < 1e-10), err


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_online_k1_equals_k2_is_plain_detach_training(opt):
    """k1 = k2 = k online equals ordinary PyTorch training that detaches the state every k steps."""
    P = Problem(T=19, batch=2, seed=60)
    chunks = [(P.x[:6], P.y[:6]), (P.x[6:], P.y[6:])]
    want = plain_detach_training(P.model, OPTIMIZERS[opt], 4, chunks, clip=1.0)
    eng = TBPTT(P.model, Truncation(4, 4), OPTIMIZERS[opt], clip=1.0)
    for x, y in chunks:
        eng.feed(x, y)
    eng.finish()
    assert_close(eng.model.params, want, rtol=1e-10)


def test_online_h_and_t_track_the_stream():
    """The carried state is the last h_t of the forward pass and t counts the steps."""
    P = Problem(T=10, batch=2, seed=61)
    eng = TBPTT(P.model, Truncation(3, 4), OPTIMIZERS["sgd"])
    ref = OnlineTBPTT(P.model, Truncation(3, 4), OPTIMIZERS["sgd"])
    eng.feed(P.x[:7], P.y[:7])
    ref.feed(P.x[:7], P.y[:7])
    assert (eng.t, eng.u_prev) == (7, 6)
    np.testing.assert_allclose(eng.h, ref.h.detach().numpy(), rtol=1e-12)


def test_online_memory_does_not_grow():
    """Only about k2 past steps are kept, however long the stream."""
    P = Problem(T=60, batch=2, seed=62)
    eng = TBPTT(P.model, Truncation(2, 5, "window"), OPTIMIZERS["sgd"])
    for x, y, _, _ in pieces(P, [3] * 20):
        eng.feed(x, y)
        state = eng.state_dict()
        kept = sum(len(v) for k, v in state.items() if k.startswith("seg") and k.endswith(".x"))
        assert kept <= 5 + 3
        assert eng.rule.history.cap <= 2 * (5 + 2 * 2)  # the buffers: twice what a window may need
    assert eng.rule.history.first > 40  # old steps were dropped from the front


def test_online_long_stream_with_ragged_chunks():
    """Hundreds of steps in chunks of 1 to 20 with resets: the history's rows move to the front and
    its buffers grow many times, and every update still equals the autograd twin's."""
    rng = np.random.default_rng(5)
    chunks = []
    while sum(chunks) < 300:
        chunks.append(int(rng.integers(1, 21)))
    chunks[-1] -= sum(chunks) - 300
    P = Problem(T=300, batch=2, h0=True, reset=True, seed=64)
    eng, _ = run_both(P, Truncation(3, 8, "new", flush=True), OPTIMIZERS["adam"], chunks, clip=1.0)
    assert eng.rule.history.first > 250


# -- save and resume ----------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize(("k1", "k2", "inject"), [(3, 7, "new"), (2, 5, "window"), (4, 4, "last")])
def test_save_load_resume_is_identical(tmp_path, opt, k1, k2, inject):
    """Saving mid-stream (between updates, windows pending) and resuming gives identical
    parameters."""
    P = Problem(T=23, batch=2, h0=True, mask=True, reset=True, seed=63)
    tr = Truncation(k1, k2, inject, flush=True)
    chunks = [5, 6, 4, 8]
    whole = TBPTT(P.model, tr, OPTIMIZERS[opt], h0=P.h0)
    for x, y, mask, reset in pieces(P, chunks):
        whole.feed(x, y, mask=mask, reset=reset)
    whole.finish()

    path = tmp_path / "run.npz"
    parts = list(pieces(P, chunks))
    first = TBPTT(P.model, tr, OPTIMIZERS[opt], h0=P.h0)
    for x, y, mask, reset in parts[:2]:
        first.feed(x, y, mask=mask, reset=reset)
    first.save(path)
    assert os.listdir(tmp_path) == ["run.npz"]  # no temporary file left behind
    other = Problem(T=1, batch=2, seed=99).model  # load replaces whatever model it was built with
    second = TBPTT(other, tr, OPTIMIZERS[opt], h0=P.h0)
    second.load(path)
    assert second.t == 11 and second.u_prev == first.u_prev
    for x, y, mask, reset in parts[2:]:
        second.feed(x, y, mask=mask, reset=reset)
    second.finish()
    for k, v in whole.model.params.items():
        assert np.array_equal(second.model.params[k], v), k
    assert np.array_equal(second.h, whole.h)


def test_state_dict_round_trip_without_files():
    """load_state_dict(state_dict()) continues exactly like the original object."""
    P = Problem(T=12, batch=2, seed=64)
    tr = Truncation(2, 5, "new")
    a = TBPTT(P.model, tr, OPTIMIZERS["adam"])
    a.feed(P.x[:5], P.y[:5])
    b = TBPTT(P.model, tr, OPTIMIZERS["adam"])
    b.load_state_dict(a.state_dict())
    a.feed(P.x[5:], P.y[5:])
    b.feed(P.x[5:], P.y[5:])
    for k, v in a.model.params.items():
        assert np.array_equal(b.model.params[k], v), k


# -- random schedules ---------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    k1=st.integers(1, 4),
    k2=st.integers(1, 7),
    inject=st.sampled_from(tbptt.INJECT_MODES),
    flush=st.booleans(),
    opt=st.sampled_from(sorted(OPTIMIZERS)),
    batch=st.sampled_from([None, 2]),
    chunks=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    extras=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_online_random_schedules(k1, k2, inject, flush, opt, batch, chunks, extras, seed):
    """Random schedules, optimizers and chunkings: the engine equals the autograd twin."""
    if inject == "new":
        k2 = max(k1, k2)
    P = Problem(sum(chunks), batch=batch, h0=extras, mask=extras, reset=extras, seed=seed)
    run_both(P, Truncation(k1, k2, inject, flush), OPTIMIZERS[opt], chunks, clip=1.0)


# -- what the caller holds and what feed returns (issue 13) -------------------------------------
def test_the_trainer_trains_the_model_it_was_given(tmp_path):
    """TBPTT trains its model in place, as torch.optim trains a module: a caller holding the model
    object reads the trained values (the autograd twin's), and load() restores into it too."""
    P = Problem(T=11, batch=2, seed=65)
    tr = Truncation(2, 5, "new", flush=True)
    model = P.model
    before = {k: v.copy() for k, v in model.params.items()}
    trainer = TBPTT(model, tr, OPTIMIZERS["adam"])
    ref = OnlineTBPTT(P.model, tr, OPTIMIZERS["adam"])
    for x, y, _, _ in pieces(P, [4, 7]):
        trainer.feed(x, y)
        ref.feed(x, y)
    trainer.save(tmp_path / "run.npz")
    trainer.finish()
    ref.finish()
    assert trainer.model is model
    assert_close(model.params, ref.params)
    assert not any(np.array_equal(before[k], v) for k, v in model.params.items())
    fresh = P.model
    TBPTT(fresh, tr, OPTIMIZERS["adam"]).load(tmp_path / "run.npz")
    assert_close(fresh.params, ref.history[-2])  # the values after the last update before save


def test_feed_returns_the_weighted_mean_loss():
    """feed() returns sum(w l) / sum(w) over the chunk's steps and streams for fractional mask
    weights, also when they sum to less than 1, each loss with the parameters in force at its
    step (the autograd twin computes it step by step)."""
    P = Problem(T=9, batch=2, seed=66)
    w = np.random.default_rng(67).uniform(0, 0.05, (9, 2))  # every chunk's weights sum below 1
    tr = Truncation(3, 4, "new")
    eng, ref = TBPTT(P.model, tr, SGD(lr=0.1)), OnlineTBPTT(P.model, tr, SGD(lr=0.1))
    for a, b in [(0, 2), (2, 7), (7, 9)]:
        got = eng.feed(P.x[a:b], P.y[a:b], mask=w[a:b])
        want = ref.feed(P.x[a:b], P.y[a:b], mask=w[a:b])
        assert w[a:b].sum() < 1 and want > 0
        assert abs(got - want) <= 1e-12 * want
    assert eng.updates == 3
    assert eng.feed(P.x[:2], P.y[:2], mask=np.zeros((2, 2))) == 0.0  # no weight: 0, not NaN
