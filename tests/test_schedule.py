"""The TBPTT(k1, k2) schedule against SEMANTICS.md section 4 read literally."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tbptt
from tbptt import Truncation, Window


def spec_windows(k1: int, k2: int, inject: str, flush: bool, T: int) -> list[tuple]:
    """Section 4 (contract version 2) transcribed: [(s, I as a set, u)] in update order."""
    times = [(u, max(1, u - k2 + 1)) for u in range(1, T + 1) if u % k1 == 0]
    if flush and T % k1 != 0 and T >= 1:  # the next scheduled window, cut at T; none if empty
        s = max(1, (T // k1) * k1 + k1 - k2 + 1)
        if s <= T:
            times.append((T, s))
    out, u_prev = [], 0
    for u, s in times:
        injected = {
            "new": set(range(u_prev + 1, u + 1)),
            "window": set(range(s, u + 1)),
            "last": {u},
        }[inject]
        out.append((s, injected, u))
        u_prev = u
    return out


def as_spec(windows: list[Window]) -> list[tuple]:
    return [(w.s, set(w.losses), w.u) for w in windows]


schedules = st.integers(1, 9).flatmap(
    lambda k1: st.tuples(
        st.just(k1),
        st.integers(1, 12),
        st.sampled_from(tbptt.INJECT_MODES),
        st.booleans(),
    ).filter(lambda s: s[2] != "new" or s[1] >= s[0])
)


@settings(max_examples=150, deadline=None)
@given(schedules, st.integers(0, 30))
def test_windows_match_section_4(schedule, T):
    """windows(T) are exactly the update times, starts and injected sets of section 4."""
    k1, k2, inject, flush = schedule
    tr = Truncation(k1, k2, inject, flush)
    windows = tr.windows(T)
    assert as_spec(windows) == spec_windows(k1, k2, inject, flush, T)
    assert [w.u for w in windows] == tr.update_times(T)
    for w in windows:
        assert set(w.losses) <= set(w.steps)  # I is inside s..u
        assert len(w.steps) <= k2


@settings(max_examples=150, deadline=None)
@given(schedules, st.integers(0, 30))
def test_loss_uses_counts_and_depths(schedule, T):
    """loss_uses(T) gives, per loss, the number of windows injecting it and its depths t - s + 1."""
    tr = Truncation(*schedule)
    uses = {t: [] for t in range(1, T + 1)}
    for s, injected, _ in spec_windows(*schedule, T):
        for t in injected:
            uses[t].append(t - s + 1)
    want = [(len(d), min(d, default=0), max(d, default=0)) for d in uses.values()]
    assert tr.loss_uses(T) == want


@settings(max_examples=100, deadline=None)
@given(schedules, st.integers(0, 30))
def test_backward_steps_is_total_window_length(schedule, T):
    """backward_steps(T) counts every step of every window (Williams and Peng's cost)."""
    tr = Truncation(*schedule)
    assert tr.backward_steps(T) == sum(u - s + 1 for s, _, u in spec_windows(*schedule, T))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(0, 8), st.integers(0, 30), st.booleans())
def test_inject_new_uses_each_loss_once(k1, extra, T, flush):
    """inject='new': each loss in exactly one window; without flush the last T mod k1 in none."""
    tr = Truncation(k1, k1 + extra, "new", flush)
    counts = [c for c, _, _ in tr.loss_uses(T)]
    unused = 0 if flush else T % k1
    assert counts == [1] * (T - unused) + [0] * unused


@settings(max_examples=100, deadline=None)
@given(schedules, st.integers(0, 30))
def test_stream_view_matches_windows(schedule, T):
    """Walking a stream with is_update, next_update, window and flush_window gives windows(T)."""
    tr = Truncation(*schedule)
    got, u_prev = [], 0
    for t in range(1, T + 1):
        assert tr.next_update(t - 1) == next(u for u in range(t, t + tr.k1 + 1) if u % tr.k1 == 0)
        if tr.is_update(t):
            got.append(tr.window(t, u_prev))
            u_prev = t
    last = tr.flush_window(T)
    if last is not None:
        got.append(last)
    assert got == tr.windows(T)


def test_window_formula():
    """window(u, u_prev) puts s at max(1, u - k2 + 1) and I as each inject mode says."""
    assert Truncation(3, 5, "new").window(9, 6) == Window(s=5, i=7, u=9)
    assert Truncation(3, 5, "window").window(9, 6) == Window(s=5, i=5, u=9)
    assert Truncation(3, 5, "last").window(9, 6) == Window(s=5, i=9, u=9)
    assert Truncation(3, 5, "new").window(3, 0) == Window(s=1, i=1, u=3)


def test_window_properties():
    """A window's steps, losses and depths are s..u, i..u and t - s + 1."""
    w = Window(s=4, i=6, u=8)
    assert list(w.steps) == [4, 5, 6, 7, 8]
    assert list(w.losses) == [6, 7, 8]
    assert [w.depth(t) for t in w.losses] == [3, 4, 5]


@pytest.mark.parametrize("T", [1, 5, 12])
def test_exact_is_one_window_over_everything(T):
    """Truncation.exact(T) and k1 = k2 = T are the single window (1, 1..T, T) of section 2."""
    assert Truncation.exact(T).windows(T) == [Window(1, 1, T)]
    for inject in tbptt.INJECT_MODES[:2]:
        assert Truncation(T, T, inject).windows(T) == [Window(1, 1, T)]


@pytest.mark.parametrize("T", [6, 7, 13])
def test_k2_at_least_k1_ceil_T_over_k1_with_flush_is_exact_window_set(T):
    """k2 >= k1 ceil(T / k1), inject='new', flush: windows start at 1 and inject each loss once;
    one step less and the flush window (or the last one) starts later."""
    k1 = 4
    k2 = k1 * math.ceil(T / k1)
    tr = Truncation(k1, k2, "new", flush=True)
    assert all(w.s == 1 for w in tr.windows(T))
    assert sorted(t for w in tr.windows(T) for t in w.losses) == list(range(1, T + 1))
    if T > k1:
        assert Truncation(k1, k2 - 1, "new", flush=True).windows(T)[-1].s == 2


@pytest.mark.parametrize(("k", "T", "flush"), [(3, 9, False), (3, 9, True), (3, 10, False)])
def test_detach_every_k_is_disjoint_chunks(k, T, flush):
    """k1 = k2 = k: disjoint chunks of k steps, each injecting its own losses."""
    tr = Truncation(k, k, "new", flush)
    chunks = [(j, j + k - 1) for j in range(1, T - k + 2, k)]
    assert [(w.s, w.i, w.u) for w in tr.windows(T)] == [(s, s, u) for s, u in chunks]


def test_detach_every_k_flush_window_is_the_short_last_chunk():
    """With flush and k not dividing T, the last window is the short last chunk alone (version 2:
    the next window cut at T), as a detach-every-k loop trains it; without flush it is dropped."""
    k, T = 3, 10
    windows = Truncation(k, k, "new", flush=True).windows(T)
    assert Truncation.detach_every(k) == Truncation(k, k, "new", flush=True)
    assert [(w.s, w.i, w.u) for w in windows] == [(1, 1, 3), (4, 4, 6), (7, 7, 9), (10, 10, 10)]
    no_flush = Truncation.detach_every(k, flush=False).windows(T)
    assert [(w.s, w.i, w.u) for w in no_flush] == [(1, 1, 3), (4, 4, 6), (7, 7, 9)]


@pytest.mark.parametrize(
    ("k1", "k2", "T", "want"), [(4, 2, 7, (7, 7)), (4, 2, 6, None), (4, 6, 7, (3, 7))]
)
def test_flush_window_is_empty_when_k2_is_at_most_k1_minus_T_mod_k1(k1, k2, T, want):
    """No flush update when k2 <= k1 - (T mod k1): the next window would start after T."""
    w = Truncation(k1, k2, "window", flush=True).flush_window(T)
    assert (None if w is None else (w.s, w.u)) == want
    assert Truncation(k1, k2, "window", flush=True).update_times(T)[-1] == (T if want else 4)


@pytest.mark.parametrize("k2", [1, 3, 20])
def test_k1_1_is_fully_online_bptt_h(k2):
    """k1 = 1, inject='new': every step backpropagates its own loss k2 steps."""
    T = 8
    got = [(w.s, w.i, w.u) for w in Truncation(1, k2, "new").windows(T)]
    assert got == [(max(1, t - k2 + 1), t, t) for t in range(1, T + 1)]


@pytest.mark.parametrize("k", [1, 3, 7])
def test_theano_single_end_window(k):
    """k1 = T, k2 = k, inject='window': one window over the last k steps, all their losses."""
    T = 7
    assert Truncation(T, k, "window").windows(T) == [Window(T - k + 1, T - k + 1, T)]


def test_seed_answer_window_holds_k_plus_1_steps():
    """The seed answer's sum from T-k to T is the end window with k2 = k + 1."""
    T, k = 10, 4
    (w,) = Truncation(T, k + 1, "window").windows(T)
    assert list(w.steps) == list(range(T - k, T + 1))
    assert len(w.steps) == k + 1


@pytest.mark.parametrize("inject", tbptt.INJECT_MODES)
def test_k1_beyond_T_has_no_windows(inject):
    """k1 > T: no update, no window; flush adds the one window ending at T."""
    T = 5
    assert Truncation(8, 9, inject).windows(T) == []
    (w,) = Truncation(8, 9, inject, flush=True).windows(T)
    assert (w.s, w.u) == (1, T)
    assert w.i == {"new": 1, "window": 1, "last": T}[inject]


def test_zero_length_sequence():
    """T = 0: no windows, even with flush."""
    assert Truncation(2, 3, "new", flush=True).windows(0) == []
    assert Truncation(2, 3).loss_uses(0) == []


@pytest.mark.parametrize(("k1", "k2"), [(1, 1), (2, 6), (4, 6), (3, 7), (6, 4)])
def test_keep_segment_and_describe(k1, k2):
    """keep is k2, segment is gcd(k1, k2), describe names the schedule."""
    tr = Truncation(k1, k2, "window", flush=True)
    assert tr.keep == k2
    assert tr.segment == math.gcd(k1, k2)
    assert tr.describe() == f"TBPTT(k1={k1}, k2={k2}, inject=window, flush)"
    assert Truncation(k1, max(k1, k2)).describe() == f"TBPTT(k1={k1}, k2={max(k1, k2)}, inject=new)"


def test_numpy_integers_accepted():
    """k1 and k2 may be numpy integers; they are stored as int."""
    import numpy as np

    tr = Truncation(np.int64(2), np.int32(3))
    assert (tr.k1, tr.k2) == (2, 3) and type(tr.k1) is int
