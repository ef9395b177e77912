"""The synthetic tasks against their papers' definitions, and their streams."""

import math

import numpy as np
import pytest

from tbptt.app.tasks import (
    COPY_BLANK,
    COPY_DELIMITER,
    TaskStreams,
    adding_problem,
    copy_memory,
    copy_memory_baseline,
    validation_set,
)


def test_adding_problem_follows_hochreiter_and_schmidhuber():
    """Two pairs marked 1.0 (one of the first ten, one of the first T/2 - 1), -1 at both ends,
    the target 0.5 + (X1 + X2)/4 at the last step only, lengths in [T, T + T/10]."""
    T, batch = 60, 400
    x, y, mask = adding_problem(T, batch, np.random.default_rng(1))
    assert x.shape[1:] == (batch, 2) and y.shape == (x.shape[0], batch, 1)
    lengths = mask.argmax(axis=0) + 1  # the target sits at each sequence's last step
    assert lengths.min() >= T and lengths.max() <= T + T // 10
    assert (mask.sum(axis=0) == 1).all()
    for j, n in enumerate(lengths):
        values, markers = x[:n, j, 0], x[:n, j, 1]
        assert np.all(np.abs(values) <= 1) and np.all(x[n:, j] == 0)
        marked = np.flatnonzero(markers == 1.0)
        # X2: one of the first T/2 - 1 pairs still unmarked, so at most position T/2 - 1
        assert len(marked) == 2 and marked[0] < 10 and marked[1] <= T // 2 - 1
        ends = [i for i in (0, n - 1) if i not in marked]
        assert np.all(markers[ends] == -1.0)
        others = np.setdiff1d(np.arange(n), [*marked, 0, n - 1])
        assert np.all(markers[others] == 0.0)
        if marked[0] == 0 and marked[1] >= 10:  # the first pair was X1's (X2's would be rarer)
            assert values[0] == 0.0  # X1 = 0 when the first pair got marked
        assert y[n - 1, j, 0] == pytest.approx(0.5 + values[marked].sum() / 4)
    first = [np.flatnonzero(x[:10, j, 1] == 1.0) for j in range(batch)]
    assert all(len(f) >= 1 for f in first)  # a mark among the first ten in every sequence
    seen = np.bincount([f[0] for f in first], minlength=10)
    assert seen.min() > 0  # every one of the first ten positions gets marked sometimes


def test_adding_problem_rejects_a_length_too_short_for_its_marks():
    """T must leave room for the first ten pairs inside the first T/2 - 1."""
    with pytest.raises(ValueError, match="T must be an integer >= 22"):
        adding_problem(10, 1, np.random.default_rng(0))


def test_copy_memory_follows_arjovsky_shah_and_bengio():
    """10 symbols from a_0..a_7, T-1 blanks, the delimiter, 10 blanks; the target is T+10 blanks
    then the symbols; cross-entropy at every step."""
    lag, batch = 7, 50
    x, y, mask = copy_memory(lag, batch, np.random.default_rng(2))
    assert x.shape == (lag + 20, batch, 10) and y.shape == (lag + 20, batch)
    assert np.all(x.sum(-1) == 1) and np.all(mask == 1)
    inputs = x.argmax(-1)  # (T, batch)
    assert np.all(inputs[:10] < 8)
    assert np.all(inputs[10 : 10 + lag - 1] == COPY_BLANK)
    assert np.all(inputs[10 + lag - 1] == COPY_DELIMITER)
    assert np.all(inputs[10 + lag :] == COPY_BLANK)
    assert np.all(y[: lag + 10] == COPY_BLANK)
    np.testing.assert_array_equal(y[lag + 10 :], inputs[:10])


def test_copy_memory_baseline_is_the_papers():
    """10 log 8 / (T + 20) nats per step."""
    assert copy_memory_baseline(100) == pytest.approx(10 * math.log(8) / 120)


def _adding(rng):
    return adding_problem(24, 1, rng)


def test_task_streams_do_not_depend_on_how_they_are_read():
    """Reading 3 + 17 + 40 steps gives the same data as reading 60 at once."""
    whole = TaskStreams(_adding, 3, seed=5).chunk(0, 60)
    parts = TaskStreams(_adding, 3, seed=5)
    pieces = [parts.chunk(0, 3), parts.chunk(3, 17), parts.chunk(20, 40)]
    for k in range(4):
        np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in pieces]))
    skipped = TaskStreams(_adding, 3, seed=5).chunk(20, 40)  # fast-forward, as a resumed run does
    for k in range(4):
        np.testing.assert_array_equal(skipped[k], pieces[2][k])


def test_task_streams_reset_at_every_sequence_start():
    """Each stream is a run of whole sequences; reset marks each one's first step."""
    x, y, mask, reset = TaskStreams(_adding, 2, seed=0).chunk(0, 200)
    for j in range(2):
        starts = np.flatnonzero(reset[:, j])
        ends = np.flatnonzero(mask[:, j])
        assert starts[0] == 0
        np.testing.assert_array_equal(starts[1:], ends[: len(starts) - 1] + 1)
        assert np.all(x[starts, j, 1] != 0)  # the first pair is marked (-1, or 1 if chosen)


def test_validation_set_aligns_sequences_at_their_ends():
    """Shorter sequences are padded at the start, masked there, with a reset at their first step."""
    x, y, mask, reset = validation_set(_adding, 20, seed=0)
    assert np.all(mask[-1] == 1) and mask.sum() == 20
    first = reset.argmax(axis=0)
    for j in range(20):
        assert np.all(x[: first[j], j] == 0) and x[first[j], j, 1] != 0
    seqs = TaskStreams(_adding, 1, seed=0).chunk(0, 30)[0]
    assert not np.array_equal(seqs[:24, 0], x[-24:, 0])  # never a training sequence
