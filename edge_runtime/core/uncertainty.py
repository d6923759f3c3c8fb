"""How unsure the head is about a frame, as numbers in [0, 1] (pure numpy).

Infant expressions are often genuinely between two classes (fear/surprise, sad/angry).
Two views of that: the normalised entropy (is the mass spread over many classes?) and
the top-2 margin (are the two best classes close?). The score averages entropy and
``1 - margin`` so a confident two-way tie counts as uncertain even when entropy is low.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Chosen on the 460 infant photos with the release package (docs/edge.md): 27 % of them score
# at least 0.7 and the head is wrong on 70 % of those, against 55 % of the rest; 0.6 would
# queue 39 % of all frames, 0.8 only 13 %.
DEFAULT_THRESHOLD = 0.7


def _as_2d(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return p[None] if p.ndim == 1 else p


def entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy divided by log(K): 0 for one-hot, 1 for uniform. Shape (N,) or ()."""
    q = _as_2d(p)
    k = q.shape[1]
    if k < 2:
        return np.zeros(len(q)) if np.ndim(p) == 2 else np.float64(0.0)
    q = np.clip(q, 0.0, 1.0)
    h = -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0), axis=1) / np.log(k)
    h = np.clip(h, 0.0, 1.0)
    return h if np.ndim(p) == 2 else h[0]


def margin(p: np.ndarray) -> np.ndarray:
    """Best minus second-best probability: 1 for one-hot, 0 for a tie."""
    q = _as_2d(p)
    if q.shape[1] < 2:
        m = np.ones(len(q))
    else:
        top2 = np.partition(q, q.shape[1] - 2, axis=1)[:, -2:]
        m = np.clip(top2[:, 1] - top2[:, 0], 0.0, 1.0)
    return m if np.ndim(p) == 2 else m[0]


def score(p: np.ndarray) -> np.ndarray:
    """The uncertainty the device reports: mean of normalised entropy and ``1 - margin``."""
    return 0.5 * (entropy(p) + 1.0 - margin(p))


@dataclass(frozen=True)
class Uncertainty:
    """The three numbers for one frame."""

    score: float
    entropy: float
    margin: float

    @classmethod
    def of(cls, p: np.ndarray) -> "Uncertainty":
        """Each number computed once (a camera asks for every frame); ``score``'s formula."""
        h, m = float(entropy(p)), float(margin(p))
        return cls(0.5 * (h + 1.0 - m), h, m)
