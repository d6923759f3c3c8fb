"""Seeded, stratified index splits (pure numpy): one definition for training, device and benches."""
from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): ``fraction`` of each class held out, seeded and sorted."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_held = int(round(len(idx) * fraction))
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def grouped_stratified_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold index in [0, k) for each sample: every member of a group in one fold, classes spread evenly.

    Groups (e.g. identical files under two labels) are dealt to folds class by class in a
    seeded order, each to the fold that holds the fewest of that class so far.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    if k < 2:
        raise ValueError("k must be at least 2")
    rng = np.random.default_rng(seed)
    uniq, first = np.unique(groups, return_index=True)
    group_label = labels[first]
    fold_of_group = np.zeros(len(uniq), np.int64)
    count = np.zeros((k, int(labels.max(initial=0)) + 1), np.int64)
    for c in np.unique(group_label):
        members = rng.permutation(np.flatnonzero(group_label == c))
        for g in members:
            f = int(np.argmin(count[:, c] + rng.random(k) * 0.1))  # ties broken at random
            fold_of_group[g] = f
            count[f, c] += 1
    return fold_of_group[np.searchsorted(uniq, groups)]
