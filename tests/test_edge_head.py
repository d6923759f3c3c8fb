"""The head's numpy fast path computes exactly what scikit-learn's MLPClassifier computes."""
from __future__ import annotations

import numpy as np
import pytest

from infantino.edge_runtime.core.head import HeadParams, OnlineHead


@pytest.fixture(scope="module")
def fitted() -> OnlineHead:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 16)).astype(np.float32)
    return OnlineHead.fit(x, np.arange(70) % 7, HeadParams(hidden_layer_sizes=(32,)), max_iter=30)


def _batch(seed: int = 1, n: int = 17) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 16)).astype(np.float32), rng.integers(0, 7, n)


def test_numpy_forward_matches_sklearn_predict_proba(fitted):
    x, _ = _batch()
    np.testing.assert_allclose(fitted.predict_proba(x), fitted.to_sklearn().predict_proba(x), atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_learn_step_matches_partial_fit(fitted, weighted):
    # Prepare: two copies of the same head with the same Adam state
    x, y = _batch()
    sw = np.random.default_rng(2).uniform(0.5, 3.0, len(y)) if weighted else None
    fast, ref = fitted.copy(), fitted.copy().to_sklearn()
    # Execute
    fast.learn_step(x, y, steps=3, sample_weight=sw)
    for _ in range(3):
        ref.partial_fit(x, y, sample_weight=sw)
    # Assert
    for a, b in zip(fast.weights(), ref.coefs_ + ref.intercepts_):
        np.testing.assert_allclose(a, b, atol=1e-12)
    assert fast.version == 0  # a learning step leaves the sync version alone


def test_partial_fit_keeps_the_arrays_and_adam_state_of_sklearns_step(fitted):
    # Prepare
    x, y = _batch()
    head, ref = fitted.copy(), fitted.copy().to_sklearn()
    arrays = head.weights()
    # Execute: the head's partial_fit, then one more numpy step; sklearn takes both steps itself
    head.partial_fit(x, y)
    head.learn_step(x, y)
    ref.partial_fit(x, y)
    ref.partial_fit(x, y)
    # Assert: same numbers, in the head's own arrays
    for a, b, same in zip(head.weights(), ref.coefs_ + ref.intercepts_, arrays):
        np.testing.assert_allclose(a, b, atol=1e-12)
        assert a is same
    assert head.version == 0


def test_sklearn_round_trip_copies_weights_and_adam_state(fitted):
    # Prepare: a head that has learned, so it carries Adam moments
    head = fitted.copy()
    head.learn_step(*_batch(), steps=2)
    # Execute
    clf = head.to_sklearn()
    back = OnlineHead.from_sklearn(clf, head.classes, version=5)
    clf.partial_fit(*_batch(5))  # training the classifier leaves both heads alone
    # Assert
    for a, b in zip(back.weights(), head.weights()):
        np.testing.assert_array_equal(a, b)
    assert back.params == head.params and back.version == 5
    head.learn_step(*_batch(4))
    back.learn_step(*_batch(4))
    for a, b in zip(back.weights(), head.weights()):
        np.testing.assert_array_equal(a, b)


def test_learn_step_on_a_loaded_head_matches_sklearn_from_the_same_file(fitted, tmp_path):
    fitted.save(tmp_path / "head.npz")
    loaded = OnlineHead.load(tmp_path / "head.npz")
    x, y = _batch()
    loaded.learn_step(x, y, steps=2)
    ref = OnlineHead.load(tmp_path / "head.npz").to_sklearn()  # carries the file's Adam state
    ref.partial_fit(x, y)
    ref.partial_fit(x, y)
    for a, b in zip(loaded.weights(), ref.coefs_ + ref.intercepts_):
        np.testing.assert_allclose(a, b, atol=1e-12)
    assert loaded.version == fitted.version == 0


def test_checkpoint_restore_undoes_a_step(fitted):
    head = fitted.copy()
    before = [w.copy() for w in head.weights()]
    cp = head.checkpoint()
    head.learn_step(*_batch(), steps=5, learning_rate=0.1)
    head.restore(cp)
    for a, b in zip(head.weights(), before):
        np.testing.assert_array_equal(a, b)
    assert head.version == 0
    # The Adam moments came back too: the next step equals a step from a fresh copy.
    other = fitted.copy()
    head.learn_step(*_batch(3))
    other.learn_step(*_batch(3))
    for a, b in zip(head.weights(), other.weights()):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_npz_round_trip_keeps_adam_state_after_learning(fitted):
    head = fitted.copy()
    head.learn_step(*_batch(), steps=2)
    head.version = 3  # set by sync or the device, carried by the file
    again = OnlineHead.from_bytes(head.to_bytes())
    assert again.version == head.version == 3
    head.learn_step(*_batch(4))
    again.learn_step(*_batch(4))
    for a, b in zip(head.weights(), again.weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)  # weights travel as float32


def test_log_loss_is_per_sample_cross_entropy(fitted):
    x, y = _batch()
    p = fitted.predict_proba(x)
    np.testing.assert_allclose(fitted.log_loss(x, y), -np.log(p[np.arange(len(y)), y]), rtol=1e-5)


def test_bad_labels_and_embeddings_are_refused(fitted):
    head = fitted.copy()
    x, _ = _batch()
    with pytest.raises(ValueError, match="labels"):
        head.learn_step(x, np.full(len(x), 9))
    with pytest.raises(ValueError, match="input size"):
        head.learn_step(np.zeros((2, 5)), np.zeros(2, int))
    with pytest.raises(ValueError, match="NaN"):
        head.predict_proba(np.full((1, 16), np.nan))
    assert head.version == 0


def test_l2sp_anchor_keeps_the_head_near_where_it_started(fitted):
    x, y = _batch()
    free, held = fitted.copy(), fitted.copy()
    start = [w.copy() for w in fitted.weights()]
    for _ in range(30):
        free.learn_step(x, y, learning_rate=0.01)
        held.learn_step(x, y, learning_rate=0.01, anchor=start, anchor_strength=10.0)

    def drift(h):
        return sum(float(np.sum((w - s) ** 2)) for w, s in zip(h.weights(), start))

    assert drift(held) < 0.5 * drift(free)
    with pytest.raises(ValueError, match="anchor"):
        held.learn_step(x, y, anchor=start[:1], anchor_strength=1.0)


def test_fit_learns_a_small_separable_set():
    """Regression: the all-classes warm-up must not trip sklearn's early stop after 11 epochs."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(140, 16)).astype(np.float32) * 0.1
    y = np.repeat(np.arange(7), 20)
    x[np.arange(140), y] += 1.0
    head = OnlineHead.fit(x, y, HeadParams(hidden_layer_sizes=(32,)), max_iter=300)
    assert np.mean(head.predict_proba(x).argmax(1) == y) > 0.95
