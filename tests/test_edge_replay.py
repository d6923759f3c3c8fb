"""Class-balanced reservoir and FIFO holdout: bounded, balanced, arrays in and out."""
from __future__ import annotations

import numpy as np
import pytest

from infantino.edge_runtime.core.replay import HoldoutSet, ReplayBuffer, balanced_indices


def _fill(buf: ReplayBuffer, labels, seed=0) -> None:
    rng = np.random.default_rng(seed)
    for i, y in enumerate(labels):
        buf.add(np.full(buf.dim, i, np.float32), int(y), rng)


def test_reservoir_is_bounded_per_class_and_counts_what_it_saw():
    buf = ReplayBuffer(3, 4, per_class=5)
    _fill(buf, [0] * 100 + [1] * 3)
    assert list(buf.count) == [5, 3, 0] and list(buf.seen) == [100, 3, 0]
    assert len(buf) == 8


def test_reservoir_keeps_a_uniform_sample_of_a_long_stream():
    kept = np.zeros(200)
    for seed in range(200):
        buf = ReplayBuffer(1, 1, per_class=10)
        _fill(buf, [0] * 200, seed)
        kept[buf.x[0, :, 0].astype(int)] += 1
    # Each of 200 items is kept with probability 10/200: early and late ones alike.
    assert abs(kept[:100].sum() - kept[100:].sum()) < 0.15 * kept.sum()


def test_sampling_is_balanced_over_classes_not_over_samples():
    buf = ReplayBuffer(3, 2, per_class=50)
    _fill(buf, [0] * 50 + [1] * 2)  # class 0 is 25x more frequent; class 2 is empty
    _, y = buf.sample(4000, np.random.default_rng(1))
    share = np.bincount(y, minlength=3) / len(y)
    np.testing.assert_allclose(share, [0.5, 0.5, 0.0], atol=0.04)


def test_sampling_an_empty_buffer_gives_empty_arrays():
    x, y = ReplayBuffer(7, 4, 3).sample(8, np.random.default_rng(0))
    assert x.shape == (0, 4) and y.shape == (0,)


def test_round_trip_through_arrays_and_invalid_arrays_are_refused():
    buf = ReplayBuffer(3, 4, per_class=5)
    _fill(buf, [0, 1, 1, 2, 2, 2])
    again = ReplayBuffer.from_arrays(buf.to_arrays())
    np.testing.assert_array_equal(again.x, buf.x)
    np.testing.assert_array_equal(again.count, buf.count)
    bad = buf.to_arrays()
    bad["replay_count"] = np.array([9, 0, 0])
    with pytest.raises(ValueError, match="invalid counts"):
        ReplayBuffer.from_arrays(bad)
    with pytest.raises(ValueError, match="missing"):
        ReplayBuffer.from_arrays({})


def test_wrong_embedding_size_or_label_is_refused():
    buf = ReplayBuffer(3, 4, per_class=5)
    with pytest.raises(ValueError, match="size"):
        buf.add(np.zeros(5), 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="label"):
        buf.add(np.zeros(4), 3, np.random.default_rng(0))
    assert len(buf) == 0 and buf.seen.sum() == 0


def test_holdout_evicts_the_oldest_of_a_class_first():
    h = HoldoutSet(2, 1, per_class=2)
    assert h.push(np.array([1.0]), 0) is None
    assert h.push(np.array([2.0]), 0) is None
    assert h.push(np.array([9.0]), 1) is None
    np.testing.assert_array_equal(h.push(np.array([3.0]), 0), [1.0])
    np.testing.assert_array_equal(h.push(np.array([4.0]), 0), [2.0])
    x, y = h.all()
    assert sorted(x[:, 0].tolist()) == [3.0, 4.0, 9.0] and sorted(y.tolist()) == [0, 0, 1]
    again = HoldoutSet.from_arrays(h.to_arrays())
    np.testing.assert_array_equal(again.all()[0], x)


def test_balanced_indices_pick_at_most_k_per_class():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 5)
    idx = balanced_indices(labels, 3, np.random.default_rng(0))
    assert np.bincount(labels[idx]).tolist() == [3, 2, 3]
    assert np.all(np.diff(idx) > 0)
