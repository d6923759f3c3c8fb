"""The package's bootstrap head: fitted on adult FER embeddings plus the infant ones, class-balanced.

FER has 25k faces and the infant set a few hundred, so the infant embeddings are repeated
(``repeat``) and every class is capped to the same count before the fit: the head then
neither ignores infants nor the rare classes (disgust is 1.5 % of FER).
"""
from __future__ import annotations

import numpy as np

from infantino.edge_runtime.core.head import HeadParams, OnlineHead
from infantino.edge_runtime.core.preprocess import CLASSES


def balanced_mix(fer_x: np.ndarray, fer_y: np.ndarray, x: np.ndarray, y: np.ndarray, repeat: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """FER embeddings (capped per class to the median class count) plus ``repeat`` copies of the infant ones."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(fer_y, minlength=len(CLASSES))
    cap = int(np.median(counts[counts > 0])) if counts.any() else 0
    keep = np.concatenate([rng.permutation(np.flatnonzero(fer_y == c))[:cap] for c in range(len(CLASSES))])
    xs = np.concatenate([fer_x[keep]] + [x] * repeat) if len(x) else fer_x[keep]
    ys = np.concatenate([fer_y[keep]] + [y] * repeat) if len(y) else fer_y[keep]
    order = rng.permutation(len(ys))
    return xs[order].astype(np.float32), ys[order].astype(np.int64)


def fit_bootstrap_head(fer_x: np.ndarray, fer_y: np.ndarray, x: np.ndarray, y: np.ndarray, repeat: int = 4,
                       max_iter: int = 60, params: HeadParams = HeadParams(), seed: int = 0) -> OnlineHead:
    xs, ys = balanced_mix(fer_x, fer_y, x, y, repeat, seed)
    return OnlineHead.fit(xs, ys, params, max_iter=max_iter)
