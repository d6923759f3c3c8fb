"""Bounded, class-balanced stores of labelled embeddings (numpy only, no I/O).

``ReplayBuffer``: one reservoir per class (Vitter's algorithm R), so the memory a device
keeps is a uniform sample of everything it was taught, per class, in fixed space; mixing
a draw from it into each update is what stops the head from forgetting older answers.
Classes are drawn uniformly, so a week of "happy" labels cannot crowd out "sad".

``HoldoutSet``: a few recent labels per class kept *out* of training, first in first
out; the guard scores an update on them. A sample leaving the holdout is then learned.

Both are plain arrays in and out (``to_arrays`` / ``from_arrays``) for the state file.
"""
from __future__ import annotations

import numpy as np


def _check(x: np.ndarray, label: int, n_classes: int, dim: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if x.shape != (dim,):
        raise ValueError(f"embedding of size {x.size} does not match the buffer's {dim}")
    if not 0 <= int(label) < n_classes:
        raise ValueError(f"label {label} is not a class index in [0, {n_classes})")
    return x


def _arrays_of(prefix: str, arrays: dict[str, np.ndarray], third: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        x = np.array(arrays[f"{prefix}_x"], dtype=np.float32)
        count = np.array(arrays[f"{prefix}_count"], dtype=np.int64)
        extra = np.array(arrays[f"{prefix}_{third}"], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"{prefix} arrays are missing {exc}") from exc
    if x.ndim != 3 or count.shape != (x.shape[0],) or extra.shape != (x.shape[0],):
        raise ValueError(f"{prefix} arrays have inconsistent shapes {x.shape}, {count.shape}, {extra.shape}")
    if count.min(initial=0) < 0 or count.max(initial=0) > x.shape[1] or not np.all(np.isfinite(x)):
        raise ValueError(f"{prefix} arrays hold invalid counts or values")
    return x, count, extra


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``per_class`` random indices of each label, sorted: how a package picks the
    source-domain replay (``replay_seed.npz``) from its training embeddings."""
    labels = np.asarray(labels)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


class ReplayBuffer:
    """Class-balanced reservoir: ``per_class`` slots for each of ``n_classes`` classes."""

    def __init__(self, n_classes: int, dim: int, per_class: int):
        self.x = np.zeros((n_classes, per_class, dim), np.float32)
        self.count = np.zeros(n_classes, np.int64)  # filled slots per class
        self.seen = np.zeros(n_classes, np.int64)  # samples ever offered per class

    @property
    def n_classes(self) -> int:
        return self.x.shape[0]

    @property
    def dim(self) -> int:
        return self.x.shape[2]

    @property
    def per_class(self) -> int:
        return self.x.shape[1]

    def __len__(self) -> int:
        return int(self.count.sum())

    def add(self, x: np.ndarray, label: int, rng: np.random.Generator) -> None:
        """Offer one sample: kept for sure while its class has room, else with probability k/seen."""
        x = _check(x, label, self.n_classes, self.dim)
        c = int(label)
        self.seen[c] += 1
        if self.per_class == 0:
            return
        if self.count[c] < self.per_class:
            self.x[c, self.count[c]] = x
            self.count[c] += 1
            return
        j = int(rng.integers(0, self.seen[c]))
        if j < self.per_class:
            self.x[c, j] = x

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` draws (with replacement): a class uniformly among the non-empty ones, then a slot."""
        present = np.flatnonzero(self.count)
        if n <= 0 or not len(present):
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        classes = present[rng.integers(0, len(present), size=n)]
        slots = (rng.random(n) * self.count[classes]).astype(np.int64)
        return self.x[classes, slots].copy(), classes.astype(np.int64)

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored sample and its label."""
        idx = [(c, s) for c in range(self.n_classes) for s in range(int(self.count[c]))]
        if not idx:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        cs, ss = np.array(idx).T
        return self.x[cs, ss].copy(), cs.astype(np.int64)

    def to_arrays(self, prefix: str = "replay") -> dict[str, np.ndarray]:
        return {f"{prefix}_x": self.x.copy(), f"{prefix}_count": self.count.copy(), f"{prefix}_seen": self.seen.copy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "replay") -> "ReplayBuffer":
        x, count, seen = _arrays_of(prefix, arrays, "seen")
        if np.any(seen < count):
            raise ValueError(f"{prefix}: a class holds more samples than it was offered")
        buf = cls(x.shape[0], x.shape[2], x.shape[1])
        buf.x, buf.count, buf.seen = x, count, seen
        return buf


class HoldoutSet:
    """Up to ``per_class`` samples per class kept out of training, oldest leaves first."""

    def __init__(self, n_classes: int, dim: int, per_class: int):
        self.x = np.zeros((n_classes, per_class, dim), np.float32)
        self.count = np.zeros(n_classes, np.int64)
        self.head = np.zeros(n_classes, np.int64)  # ring index of the oldest sample per class

    @property
    def dim(self) -> int:
        return self.x.shape[2]

    def __len__(self) -> int:
        return int(self.count.sum())

    def push(self, x: np.ndarray, label: int) -> np.ndarray | None:
        """Hold ``x`` back; returns the class's oldest sample when it had to make room, else None."""
        n_classes, k, dim = self.x.shape
        x = _check(x, label, n_classes, dim)
        c = int(label)
        if k == 0:
            return x
        if self.count[c] < k:
            self.x[c, (self.head[c] + self.count[c]) % k] = x
            self.count[c] += 1
            return None
        evicted = self.x[c, self.head[c]].copy()
        self.x[c, self.head[c]] = x
        self.head[c] = (self.head[c] + 1) % k
        return evicted

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        k = self.x.shape[1]
        xs, ys = [], []
        for c in np.flatnonzero(self.count):
            slots = (self.head[c] + np.arange(self.count[c])) % k
            xs.append(self.x[c, slots])
            ys.append(np.full(len(slots), c, np.int64))
        if not xs:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        return np.concatenate(xs), np.concatenate(ys)

    def to_arrays(self, prefix: str = "holdout") -> dict[str, np.ndarray]:
        return {f"{prefix}_x": self.x.copy(), f"{prefix}_count": self.count.copy(), f"{prefix}_ring": self.head.copy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "holdout") -> "HoldoutSet":
        x, count, head = _arrays_of(prefix, arrays, "ring")
        if np.any(head < 0) or np.any(head >= max(1, x.shape[1])):
            raise ValueError(f"{prefix}: ring index out of range")
        out = cls(x.shape[0], x.shape[2], x.shape[1])
        out.x, out.count, out.head = x, count, head
        return out
