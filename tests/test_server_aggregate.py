"""The pure aggregation module: FedAvg, staleness discounts, robust rules, clipping."""
from __future__ import annotations

import numpy as np
import pytest

from infantino.sync_server.aggregate import (Strategy, aggregate, aggregate_deltas, apply_step, clip_rows, coordinate_median,
                                   flatten, ingest_bound, label_cap, merge_voices, sqrt_discount, trimmed_mean, unflatten)

FEDAVG = Strategy(rule="fedavg", clip_norm=None)


def _layers(rng, scale=1.0):
    return [rng.normal(0, scale, (4, 3)).astype(np.float32), rng.normal(0, scale, (3,)).astype(np.float32)]


def test_flatten_unflatten_round_trip():
    rng = np.random.default_rng(0)
    layers = _layers(rng)
    back = unflatten(flatten(layers), [a.shape for a in layers])
    for a, b in zip(layers, back):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="does not hold layers"):
        unflatten(np.zeros(5, np.float32), [(4, 3)])


def test_fedavg_is_the_sample_weighted_mean():
    # Prepare
    rng = np.random.default_rng(1)
    a, b = _layers(rng), _layers(rng)
    # Execute
    out = aggregate([(a, 1), (b, 3)])
    # Assert
    for la, lb, lo in zip(a, b, out):
        np.testing.assert_allclose(lo, (la + 3 * lb) / 4, rtol=1e-6)


def test_fresh_updates_are_averaged_by_samples():
    deltas = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    res = aggregate_deltas(deltas, [1, 3], [0, 0], FEDAVG)
    np.testing.assert_allclose(res.delta, [0.25, 0.75], rtol=1e-6)
    assert res.info["n_updates"] == 2 and res.info["n_samples"] == 4


def test_staleness_discounts_without_renormalising():
    deltas = np.ones((2, 3), np.float32)
    res = aggregate_deltas(deltas, [1, 1], [3, 3], FEDAVG)
    # both updates are 3 versions old: the step shrinks by 1/sqrt(4) = 0.5
    np.testing.assert_allclose(res.delta, 0.5, rtol=1e-6)
    none = aggregate_deltas(deltas, [1, 1], [3, 3], Strategy(rule="fedavg", clip_norm=None, staleness="none"))
    np.testing.assert_allclose(none.delta, 1.0)
    np.testing.assert_allclose(sqrt_discount(np.array([0, 3, 8])), [1.0, 0.5, 1 / 3])


def test_sample_weight_is_capped():
    deltas = np.array([[1.0], [0.0]], np.float32)
    res = aggregate_deltas(deltas, [10**9, 1000], [0, 0], Strategy(rule="fedavg", clip_norm=None, max_weight_samples=1000))
    np.testing.assert_allclose(res.delta, [0.5])


def test_median_and_trimmed_mean_ignore_a_poisoned_update():
    rng = np.random.default_rng(2)
    honest = rng.normal(0.1, 0.01, (9, 50)).astype(np.float32)
    poisoned = np.vstack([honest, np.full((1, 50), 1e4, np.float32)])
    for strategy in (Strategy(rule="median"), Strategy(rule="trimmed_mean", trim_fraction=0.2)):
        res = aggregate_deltas(poisoned, [10] * 10, [0] * 10, strategy)
        assert np.abs(res.delta - 0.1).max() < 0.05, strategy.rule
    fedavg = aggregate_deltas(poisoned, [10] * 10, [0] * 10, FEDAVG)
    assert fedavg.delta.min() > 900  # the plain mean is wrecked: this is what the robust rules are for


def test_norm_clipping_bounds_every_row():
    deltas = np.array([[3.0, 4.0], [0.3, 0.4]], np.float32)
    clipped, n = clip_rows(deltas, 1.0)
    assert n == 1
    np.testing.assert_allclose(np.linalg.norm(clipped, axis=1), [1.0, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(deltas[0], [3.0, 4.0])  # input untouched
    three = np.vstack([deltas, [[0.6, 0.8]]]).astype(np.float32)  # norms 5, 0.5, 1
    res = aggregate_deltas(three, [1, 1, 1], [0, 0, 0], Strategy(rule="fedavg", clip_norm="median"))
    assert res.info["n_clipped"] == 1 and res.info["clip_bound"] == pytest.approx(1.0)
    assert res.info["delta_norm_max"] == pytest.approx(5.0)


def test_trimmed_mean_and_median_match_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 7)).astype(np.float32)
    s = np.sort(x, axis=0)
    np.testing.assert_allclose(trimmed_mean(x, 0.2), s[2:8].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(coordinate_median(x), np.median(x, axis=0), rtol=1e-6)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="nothing to aggregate"):
        aggregate_deltas(np.zeros((0, 3), np.float32), [], [])
    with pytest.raises(ValueError, match="NaN or infinite"):
        aggregate_deltas(np.array([[np.nan]], np.float32), [1], [0])
    with pytest.raises(ValueError, match="sample counts must be positive"):
        aggregate_deltas(np.ones((1, 2), np.float32), [0], [0])
    with pytest.raises(ValueError, match="unknown rule 'krum'"):
        Strategy(rule="krum")
    with pytest.raises(ValueError, match="unknown strategy settings: typo"):
        Strategy.from_dict({"rule": "fedavg", "typo": 1})
    assert Strategy.from_dict({"clip_norm": "none"}).clip_norm is None
    assert Strategy.from_dict({"clip_norm": "2.5"}).clip_norm == 2.5


def test_apply_step_adds_the_flat_step():
    rng = np.random.default_rng(4)
    w = _layers(rng)
    step = np.ones(15, np.float32)
    out = apply_step(w, step)
    np.testing.assert_allclose(out[0], w[0] + 1)
    np.testing.assert_allclose(out[1], w[1] + 1)


def test_the_default_strategy_is_the_robust_one():
    assert (Strategy().rule, Strategy().clip_norm, Strategy().staleness) == ("trimmed_mean", "median", "sqrt")
    # Prepare: 9 honest voices and one that pushes one coordinate hard, as the issue-14 attack did
    rng = np.random.default_rng(5)
    honest = rng.normal(0.0, 0.01, (9, 40)).astype(np.float32)
    hostile = np.zeros((1, 40), np.float32)
    hostile[0, 3] = 49.9
    # Execute
    res = aggregate_deltas(np.vstack([honest, hostile]), [8] * 9 + [100000], [0] * 10)
    # Assert: clipped to the median voice norm, then trimmed: the hostile coordinate barely moves
    assert res.info["n_clipped"] >= 1 and res.info["clip_bound"] < 0.1
    assert abs(res.delta[3]) < 0.02


def test_a_device_is_one_voice_however_many_updates_it_sends():
    # Prepare: voice 7 sends ten copies of a crafted update, voices 1 and 2 one honest update each
    honest = np.array([[0.1, 0.0], [0.0, 0.1]], np.float32)
    crafted = np.tile(np.array([[5.0, 5.0]], np.float32), (10, 1))
    deltas = np.vstack([honest, crafted])
    voices = [1, 2] + [7] * 10
    # Execute
    merged, index = merge_voices(deltas, voices)
    res = aggregate_deltas(deltas, [4, 4] + [1000] * 10, [0] * 12, Strategy(rule="fedavg", clip_norm="median"),
                           voices=voices, sample_caps=[64] * 12)
    # Assert
    np.testing.assert_allclose(merged, [[0.1, 0.0], [0.0, 0.1], [50.0, 50.0]])
    assert index.tolist() == [0, 1] + [2] * 10
    assert res.info["n_updates"] == 12 and res.info["n_voices"] == 3
    assert res.info["n_samples_claimed"] == 10008 and res.info["n_samples"] == 4 + 4 + 64
    # the crafted voice is clipped to the median voice norm (0.1) and weighs 64 labels, not 10,000
    assert res.info["clip_bound"] == pytest.approx(0.1, rel=1e-5)
    assert np.linalg.norm(res.delta) < 0.1


def test_a_clip_bound_never_exceeds_the_cap_from_past_rounds():
    deltas = np.full((3, 4), 10.0, np.float32)  # a buffer of only oversized voices sets a high median
    free = aggregate_deltas(deltas, [1, 1, 1], [0, 0, 0], Strategy(rule="fedavg"))
    capped = aggregate_deltas(deltas, [1, 1, 1], [0, 0, 0], Strategy(rule="fedavg"), norm_cap=0.5)
    assert free.info["clip_bound"] == pytest.approx(20.0) and free.info["n_clipped"] == 0
    assert capped.info["clip_bound"] == 0.5 and np.linalg.norm(capped.delta) == pytest.approx(0.5, rel=1e-5)


def test_trimming_drops_at_least_one_voice_per_side_from_three_on():
    x = np.array([[0.0], [1.0], [2.0], [100.0]], np.float32)
    np.testing.assert_allclose(trimmed_mean(x, 0.2, min_trim=1), [1.5])  # floor(0.8) = 0, yet the outlier goes
    np.testing.assert_allclose(trimmed_mean(x, 0.2, min_trim=0), [25.75])
    np.testing.assert_allclose(trimmed_mean(x[:2], 0.2, min_trim=1), [0.5])  # two voices: nothing to trim


def test_label_cap_and_ingest_bound():
    assert label_cap(0.0, 64, 240) == 64 and label_cap(1800.0, 64, 240) == 184 and label_cap(-5.0, 64, 240) == 64
    assert ingest_bound(50.0, None, 10.0) == 50.0  # no honest round measured yet: the hard bound
    assert ingest_bound(50.0, 0.3, 10.0) == pytest.approx(3.0)
    assert ingest_bound(50.0, 30.0, 10.0) == 50.0
    with pytest.raises(ValueError, match="min_trim"):
        Strategy(min_trim=-1)
