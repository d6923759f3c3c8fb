"""The merge policy, pure: *adopt the global head, then replay the local samples* (numpy only).

The global head already holds this device's uploaded learning (and everyone else's); a few
epochs of replay over the device's kept labelled samples re-personalise it to this nursery.
The replayed head is the new reference point: replay is not uploaded again.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ..core.head import OnlineHead


@dataclasses.dataclass(frozen=True)
class MergePolicy:
    """Adopt the global head, then ``replay_epochs`` passes over the kept samples (0 = adopt only)."""

    replay_epochs: int = 3
    batch_size: int = 32
    max_samples: int = 2000
    seed: int = 0


def adopt_and_replay(global_head: OnlineHead, embeddings: Optional[np.ndarray], labels: Optional[np.ndarray],
                     policy: MergePolicy = MergePolicy()) -> OnlineHead:
    """The merge policy: a copy of the global head, fine-tuned for a few epochs on local samples."""
    head = global_head.copy()
    if embeddings is None or labels is None or len(labels) == 0 or policy.replay_epochs <= 0:
        return head
    rng = np.random.default_rng(policy.seed)
    x = np.asarray(embeddings, np.float32)
    y = np.asarray(labels, np.int64)
    if len(y) > policy.max_samples:
        keep = rng.choice(len(y), policy.max_samples, replace=False)
        x, y = x[keep], y[keep]
    version = head.version
    for _ in range(policy.replay_epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), policy.batch_size):
            idx = order[start:start + policy.batch_size]
            head.learn_step(x[idx], y[idx])  # numpy Adam: the device never needs scikit-learn
    head.version = version  # the head still descends from this global version
    return head
