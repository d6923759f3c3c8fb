"""Consented face crops waiting to be uploaded (numpy only).

Off by default: a device writes here only when its owner opted in
(``DeviceConfig.share_crops`` / ``infantino-edge sync --share-crops`` / ``infantino-edge
consent on``). Each labelled crop (the package's 64x64 uint8 input) and its class index wait
in ``<state_dir>/consent_outbox.npz`` until the sync server has acknowledged them; the file is
bounded (oldest dropped, counted), written atomically, and every change re-reads it under a
file lock, so a caregiver page and a ``sync`` run in another process never lose each other's
crops. Withdrawing consent deletes the file, so nothing collected before can leave later;
``erase`` also asks the server (at the next sync) to delete what it already holds.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from .core import safe_npz
from .core.atomic import atomic_write_bytes, atomic_write_text

CONSENT_NAME = "consent.json"
OUTBOX_NAME = "consent_outbox.npz"
LOCK_NAME = ".consent.lock"
CROPS_FORMAT = "infantino-crops/1"


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    with open(state_dir / LOCK_NAME, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
        yield


def _consent(state_dir: Path) -> dict:
    try:
        record = json.loads((state_dir / CONSENT_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def recorded_consent(state_dir: str | Path) -> bool:
    """What the device's owner last chose; no record (or an unreadable one) means no consent."""
    return _consent(Path(state_dir)).get("share_crops") is True


def erase_pending(state_dir: str | Path) -> bool:
    """The owner withdrew with ``erase`` and the server has not yet confirmed deleting the crops."""
    return _consent(Path(state_dir)).get("erase_uploaded") is True


def record_consent(state_dir: str | Path, share: bool, erase: bool = False) -> None:
    """Persist the owner's choice; withdrawing also deletes every crop still waiting to be sent,
    and with ``erase`` the next sync asks the server to delete this device's crops."""
    folder = Path(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        before = _consent(folder)
        erase_uploaded = bool(not share and (erase or before.get("erase_uploaded")))
        if before.get("share_crops") is not share or bool(before.get("erase_uploaded")) != erase_uploaded:
            atomic_write_text(folder / CONSENT_NAME, json.dumps({"share_crops": share, "erase_uploaded": erase_uploaded,
                                                                 "changed_at": time.time()}))
        if not share:
            (folder / OUTBOX_NAME).unlink(missing_ok=True)


def erase_done(state_dir: str | Path) -> None:
    """The server confirmed ``DELETE /v1/crops``."""
    folder = Path(state_dir)
    with _locked(folder):
        record = _consent(folder)
        if record.get("erase_uploaded"):
            atomic_write_text(folder / CONSENT_NAME, json.dumps({**record, "erase_uploaded": False}))


class CropOutbox:
    """A bounded, crash-safe FIFO of (crop, label) pairs for ``POST /v1/crops``.

    Items carry increasing sequence numbers, so acknowledging an upload removes exactly the
    crops that were sent even if others were added (or the oldest dropped) meanwhile.
    """

    def __init__(self, state_dir: str | Path, max_items: int = 512):
        self.folder = Path(state_dir)
        self.path = self.folder / OUTBOX_NAME
        self.max_items = max_items

    def _read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(crops, labels, seq, dropped); an unreadable outbox only loses crops never sent."""
        try:
            with safe_npz.load(self.path) as npz:
                return npz["crops"], npz["labels"], npz["seq"], int(npz["dropped"])
        except (OSError, KeyError, ValueError):
            return np.zeros((0, 0, 0), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64), 0

    def _write(self, crops: np.ndarray, labels: np.ndarray, seq: np.ndarray, dropped: int) -> None:
        if not len(labels):
            self.path.unlink(missing_ok=True)
            return
        buf = io.BytesIO()
        np.savez(buf, crops=crops, labels=labels.astype(np.int64), seq=seq.astype(np.int64), dropped=np.int64(dropped))
        atomic_write_bytes(self.path, buf.getvalue())

    def shared(self) -> bool:
        """Consent as recorded now (another process, e.g. ``infantino-edge consent off``, may change it)."""
        return recorded_consent(self.folder)

    def erase_pending(self) -> bool:
        return erase_pending(self.folder)

    def erase_done(self) -> None:
        erase_done(self.folder)

    def __len__(self) -> int:
        return len(self._read()[1])

    @property
    def dropped(self) -> int:
        """Crops pushed out by newer ones while the outbox was full (or of an older input size)."""
        return self._read()[3]

    def add(self, crop: np.ndarray, label: int) -> bool:
        """Queue a labelled crop if (and only if) the owner consents now; returns whether it was queued."""
        crop = np.asarray(crop, np.uint8)
        if crop.ndim != 2:
            raise ValueError(f"a shared crop is a 2-D uint8 face crop, not shape {crop.shape}")
        if not self.shared():
            return False  # no lock file, no outbox: nothing at all is written without consent
        with _locked(self.folder):
            if not self.shared():  # withdrawn while we waited for the lock
                return False
            crops, labels, seq, dropped = self._read()
            if len(labels) and crops.shape[1:] != crop.shape:  # a new package changed the input size:
                dropped += len(labels)                          # the server would refuse the old crops
                crops, labels, seq = crops[:0].reshape(0, *crop.shape), labels[:0], seq[:0]
            nxt = int(seq[-1]) + 1 if len(seq) else 0
            crops = np.concatenate([crops.reshape(-1, *crop.shape), crop[None]])
            labels, seq = np.append(labels, int(label)), np.append(seq, nxt)
            over = max(0, len(labels) - self.max_items)
            self._write(crops[over:], labels[over:], seq[over:], dropped + over)
        return True

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The oldest ``n`` waiting crops (N, H, W) uint8, labels (N,) int64 and the last one's
        sequence number (for ``acknowledge``)."""
        crops, labels, seq, _ = self._read()
        return crops[:n], labels[:n].astype(np.int64), int(seq[:n][-1]) if len(seq) else -1

    def acknowledge(self, upto: int) -> None:
        """The server stored everything up to sequence number ``upto``: forget those."""
        with _locked(self.folder):
            crops, labels, seq, dropped = self._read()
            keep = seq > upto
            self._write(crops[keep], labels[keep], seq[keep], dropped)


def batch_key(device: str, crops: np.ndarray, labels: np.ndarray) -> str:
    """Idempotency key of one upload: the same crops resent after a lost answer are stored once."""
    digest = hashlib.sha256(crops.tobytes() + labels.astype("<i8").tobytes()).hexdigest()[:32]
    return f"{device[:64]}-crops-{digest}"
