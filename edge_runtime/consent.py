"""Consented face crops waiting to be uploaded (numpy only).

Off by default: a device writes here only when its owner opted in
(``DeviceConfig.share_crops``). Each labelled crop (the package's 64x64 uint8 input) and
its class index wait in ``<state_dir>/consent_outbox.npz`` until the sync server has
acknowledged them; the file is bounded (oldest dropped, counted) and written atomically.
Withdrawing consent deletes the file, so nothing collected before can leave later.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes, atomic_write_text

CONSENT_NAME = "consent.json"
OUTBOX_NAME = "consent_outbox.npz"
CROPS_FORMAT = "infantino-crops/1"


def recorded_consent(state_dir: str | Path) -> bool:
    """What the device's owner last chose; no record (or an unreadable one) means no consent."""
    try:
        return json.loads((Path(state_dir) / CONSENT_NAME).read_text()).get("share_crops") is True
    except (OSError, ValueError, AttributeError):
        return False


def record_consent(state_dir: str | Path, share: bool) -> None:
    """Persist the owner's choice; withdrawing also deletes every crop still waiting to be sent."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    if recorded_consent(state_dir) != share or not (Path(state_dir) / CONSENT_NAME).exists():
        atomic_write_text(Path(state_dir) / CONSENT_NAME, json.dumps({"share_crops": share, "changed_at": time.time()}))
    if not share:
        (Path(state_dir) / OUTBOX_NAME).unlink(missing_ok=True)


class CropOutbox:
    """A bounded, crash-safe FIFO of (crop, label) pairs for ``POST /v1/crops``."""

    def __init__(self, state_dir: str | Path, max_items: int = 512):
        self.path = Path(state_dir) / OUTBOX_NAME
        self.max_items = max_items
        self.crops: list[np.ndarray] = []
        self.labels: list[int] = []
        self.dropped = 0
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                crops, labels, dropped = npz["crops"], npz["labels"], npz["dropped"]
        except (OSError, KeyError, ValueError):
            return  # an unreadable outbox only loses crops that were never sent; learning is unaffected
        self.crops = [np.asarray(c, np.uint8) for c in crops]
        self.labels = [int(v) for v in labels]
        self.dropped = int(dropped)

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, crop: np.ndarray, label: int) -> None:
        crop = np.asarray(crop, np.uint8)
        if crop.ndim != 2 or (self.crops and crop.shape != self.crops[0].shape):
            raise ValueError("a shared crop is a 2-D uint8 face crop of the package's input size")
        self.crops.append(crop)
        self.labels.append(int(label))
        overflow = len(self.labels) - self.max_items
        if overflow > 0:
            del self.crops[:overflow], self.labels[:overflow]
            self.dropped += overflow
        self._save()

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The oldest ``n`` waiting crops (N, H, W) uint8 and labels (N,) int64."""
        crops = self.crops[:n]
        return (np.stack(crops) if crops else np.zeros((0, 0, 0), np.uint8)), np.asarray(self.labels[:n], np.int64)

    def acknowledge(self, n: int) -> None:
        """The server stored the oldest ``n``: forget them."""
        del self.crops[:n], self.labels[:n]
        self._save()

    def clear(self) -> None:
        self.crops, self.labels = [], []
        self.path.unlink(missing_ok=True)

    def _save(self) -> None:
        if not self.labels:
            self.path.unlink(missing_ok=True)
            return
        buf = io.BytesIO()
        np.savez(buf, crops=np.stack(self.crops), labels=np.asarray(self.labels, np.int64), dropped=np.int64(self.dropped))
        atomic_write_bytes(self.path, buf.getvalue())


def batch_key(device: str, crops: np.ndarray, labels: np.ndarray) -> str:
    """Idempotency key of one upload: the same crops resent after a lost answer are stored once."""
    digest = hashlib.sha256(crops.tobytes() + labels.astype("<i8").tobytes()).hexdigest()[:32]
    return f"{device[:64]}-crops-{digest}"
