"""Face crops of labelled samples, kept so a new extractor can re-embed them (numpy only).

The replay buffer keeps *embeddings*, which a new extractor cannot read. When sync installs
a package with another extractor, these crops are embedded again and the head is re-fitted
on them, so what caregivers taught the device survives the upgrade.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class SampleKeeper:
    """Face crops of labelled samples, class-balanced (reservoir per class), for re-embedding.

    The device's replay buffer keeps *embeddings*, which a new extractor cannot read. This
    keeps the uint8 crops (the package's input size, 64x64 = 4 KB each) in
    ``<state_dir>/samples.npz``, written atomically; 32 per class is under 1 MB.
    """

    def __init__(self, state_dir: Path, per_class: int = 32, n_classes: int = 7, seed: int = 0):
        self.path = Path(state_dir) / "samples.npz"
        self.per_class = per_class
        self.n_classes = n_classes
        self.rng = np.random.default_rng(seed)
        self.reload()

    def reload(self) -> None:
        """Read ``samples.npz`` again (another process may have written it; the device calls this
        under the state folder's writer lock, with the snapshot)."""
        self.crops: list[list[np.ndarray]] = [[] for _ in range(self.n_classes)]
        self.seen = np.zeros(self.n_classes, np.int64)
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        with np.load(self.path, allow_pickle=False) as npz:
            crops, labels, seen = npz["crops"], npz["labels"], npz["seen"]
        if seen.shape != (self.n_classes,):
            return  # another class set: start over rather than mislabel
        self.seen = seen.astype(np.int64)
        for crop, label in zip(crops, labels):
            if 0 <= int(label) < self.n_classes and len(self.crops[int(label)]) < self.per_class:
                self.crops[int(label)].append(np.asarray(crop, np.uint8))

    def add(self, crop: np.ndarray, label: int, save: bool = True) -> None:
        crop = np.asarray(crop, np.uint8)
        if crop.ndim != 2 or not 0 <= int(label) < self.n_classes:
            raise ValueError("a kept sample is a 2-D uint8 crop with a class index")
        c = int(label)
        self.seen[c] += 1
        if len(self.crops[c]) < self.per_class:
            self.crops[c].append(crop)
        else:
            j = int(self.rng.integers(0, self.seen[c]))
            if j < self.per_class:
                self.crops[c][j] = crop
        if save:
            self.save()

    def all(self) -> tuple[list[np.ndarray], np.ndarray]:
        crops = [c for cls in self.crops for c in cls]
        labels = np.array([i for i, cls in enumerate(self.crops) for _ in cls], np.int64)
        return crops, labels

    def __len__(self) -> int:
        return sum(len(c) for c in self.crops)

    def save(self) -> None:
        crops, labels = self.all()
        shape = crops[0].shape if crops else (0, 0)
        same = [c if c.shape == shape else np.zeros(shape, np.uint8) for c in crops]
        arr = np.stack(same) if same else np.zeros((0, 0, 0), np.uint8)
        atomic_write_bytes(self.path, _npz_bytes(crops=arr, labels=labels, seen=self.seen))
