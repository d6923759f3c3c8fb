"""Uncertainty numbers mean what they say: 0 when sure, 1 when anything goes, high for a tie."""
from __future__ import annotations

import numpy as np

from infantino.edge_runtime.core.uncertainty import Uncertainty, entropy, margin, score


def test_one_hot_is_certain_and_uniform_is_maximally_uncertain():
    one_hot = np.eye(7)[2]
    uniform = np.full(7, 1 / 7)
    assert entropy(one_hot) == 0.0 and margin(one_hot) == 1.0 and score(one_hot) == 0.0
    np.testing.assert_allclose([entropy(uniform), margin(uniform), score(uniform)], [1.0, 0.0, 1.0], atol=1e-12)


def test_a_two_way_tie_scores_high_even_with_low_entropy():
    tie = np.array([0.5, 0.5, 0, 0, 0, 0, 0])
    assert entropy(tie) < 0.4  # entropy alone would call this fairly sure
    assert margin(tie) == 0.0
    assert score(tie) > 0.6


def test_batch_shapes_and_order():
    p = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    s = score(p)
    assert s.shape == (3,)
    assert s[0] < s[1] < s[2]
    np.testing.assert_allclose(margin(p), [0.85, 0.05, 0.0], atol=1e-12)


def test_dataclass_of_one_frame():
    u = Uncertainty.of(np.array([0.7, 0.2, 0.1]))
    assert 0 < u.score < 1 and abs(u.margin - 0.5) < 1e-12 and isinstance(u.entropy, float)
