"""Frames the head was unsure about, waiting on disk for a caregiver's label.

One item is three small files in the queue folder, all named by its id:
``<id>.png`` (the 64x64 grayscale face crop, lossless, so it re-embeds to exactly the
tensor that was predicted), ``<id>.json`` (prediction, uncertainty, when) and, once
labelled, ``<id>.label`` (kept as a tombstone after the device learned the frame). The JSON is written last, atomically: an item exists once its
JSON does. The label file is published with ``os.link`` of a finished temp file, which
fails if it already exists: the first label wins, across threads and processes, and a
second click on the same frame is reported, not counted.

Ids are ``<time in ns, 16 hex>-<8 hex of the frame's hash>``: they sort by age, are safe
in a URL path and a file name, and the same frame is not queued twice.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .core.atomic import _fsync_dir, atomic_write_bytes, atomic_write_text
from .config import DEFAULT_MAX_ITEMS
from .core.preprocess import CLASSES

ID_PATTERN = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{8}$")


class QueueError(ValueError):
    """An unknown or malformed queue id, or an unknown label."""


@dataclass
class QueueItem:
    id: str
    created: float
    predicted: str
    uncertainty: float
    probabilities: list[float]
    face_found: bool
    source: str = ""
    label: str | None = None  # the caregiver's answer once resolved
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "predicted": self.predicted, "uncertainty": self.uncertainty,
                "probabilities": self.probabilities, "face_found": self.face_found, "source": self.source,
                "label": self.label, **({"extra": self.extra} if self.extra else {})}


class AnnotationQueue:
    """A bounded folder of uncertain frames; the oldest unlabelled ones go when it is full."""

    def __init__(self, folder: str | os.PathLike, max_items: int = DEFAULT_MAX_ITEMS, classes: Sequence[str] = CLASSES):
        if max_items < 1:
            raise ValueError("the annotation queue needs room for at least one frame")
        self.folder = Path(folder)
        self.max_items = max_items
        self.classes = tuple(classes)
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- paths
    def _path(self, item_id: str, suffix: str) -> Path:
        if not isinstance(item_id, str) or not ID_PATTERN.match(item_id):
            raise QueueError(f"malformed queue id {str(item_id)[:40]!r}")
        return self.folder / f"{item_id}{suffix}"

    def crop_path(self, item_id: str) -> Path:
        """The PNG a web page shows for this frame."""
        return self._path(item_id, ".png")

    def ids(self) -> list[str]:
        """Ids of every item (labelled or not), oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.json") if ID_PATTERN.match(p.stem))

    # ---------------------------------------------------------------- add
    def add(self, crop: np.ndarray, *, predicted: str, uncertainty: float, probabilities: Sequence[float],
            face_found: bool, source: str = "", frame_key: str | None = None) -> str | None:
        """Queue a crop; returns its id, or None when this frame is already waiting."""
        tag = (frame_key or secrets.token_hex(4))[:8].lower()
        if not re.fullmatch(r"[0-9a-f]{8}", tag):
            raise QueueError("frame_key must be hexadecimal")
        png = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop, dtype=np.uint8), "L").save(png, format="PNG")
        with self._lock:
            if self.folder.is_dir() and any(self.folder.glob(f"*-{tag}.json")):
                return None
            item_id = f"{time.time_ns():016x}-{tag}"
            item = QueueItem(item_id, time.time(), predicted, float(uncertainty), [float(p) for p in probabilities],
                             bool(face_found), source[-200:])
            atomic_write_bytes(self._path(item_id, ".png"), png.getvalue())
            atomic_write_text(self._path(item_id, ".json"), json.dumps(item.to_dict()))
            self._trim()
        return item_id

    def _trim(self) -> None:
        pending = [i for i in self.ids() if not self._path(i, ".label").exists()]
        for old in pending[: max(0, len(pending) - self.max_items)]:
            self.remove(old)

    # ---------------------------------------------------------------- read
    def get(self, item_id: str) -> QueueItem:
        path = self._path(item_id, ".json")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise QueueError(f"no queued frame {item_id}") from None
        except (OSError, ValueError) as exc:
            raise QueueError(f"queued frame {item_id} is unreadable ({exc})") from exc
        label = self._read_label(item_id)
        return QueueItem(d["id"], d["created"], d["predicted"], d["uncertainty"], d["probabilities"], d["face_found"],
                         d.get("source", ""), label, d.get("extra", {}))

    def _read_label(self, item_id: str) -> str | None:
        try:
            return json.loads(self._path(item_id, ".label").read_text(encoding="utf-8"))["label"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError):
            return None  # never published half-written (see resolve); treat as unlabelled

    def items(self, include_resolved: bool = False) -> list[QueueItem]:
        """Items oldest first; by default only those still waiting for a label."""
        out = []
        for item_id in self.ids():
            with contextlib.suppress(QueueError):  # removed between listing and reading
                item = self.get(item_id)
                if include_resolved or item.label is None:
                    out.append(item)
        return out

    def __len__(self) -> int:
        return len(self.items())

    def crop(self, item_id: str) -> np.ndarray:
        """The stored face crop, uint8 (H, W)."""
        try:
            with Image.open(self.crop_path(item_id)) as img:
                return np.asarray(img.convert("L"), dtype=np.uint8)
        except FileNotFoundError:
            raise QueueError(f"no queued frame {item_id}") from None

    # ---------------------------------------------------------------- label
    def resolve(self, item_id: str, label: str) -> tuple[str, bool]:
        """Record ``label`` for the frame; returns (the frame's label, True) for the first label only.

        A second call for the same frame (two caregivers, a double click, a retried
        request), even after the device learned and removed it, returns the *first*
        label and False and changes nothing.
        """
        if label not in self.classes:
            raise QueueError(f"unknown label {label!r}; expected one of {', '.join(self.classes)}")
        final = self._path(item_id, ".label")
        if final.exists():
            return self._read_label(item_id) or label, False
        self.get(item_id)  # raises for an unknown frame
        fd, tmp = tempfile.mkstemp(prefix=f".{item_id}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"label": label, "at": time.time()}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, final)  # atomic and exclusive: fails if someone labelled it first
            except FileExistsError:
                return self._read_label(item_id) or label, False
            _fsync_dir(self.folder)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return label, True

    def unresolve(self, item_id: str) -> None:
        """Take a label back: the device could not save what it learned from it (a full disk), so the
        frame waits for a label again instead of being learned at the next start."""
        with contextlib.suppress(FileNotFoundError):
            self._path(item_id, ".label").unlink()
        _fsync_dir(self.folder)

    def resolved(self) -> list[QueueItem]:
        """Labelled items not yet removed (the device learns them, then removes them)."""
        return [i for i in self.items(include_resolved=True) if i.label is not None]

    def remove(self, item_id: str, keep_label: bool = False) -> None:
        """Delete an item's files (JSON first, so a half-removed item is simply gone).

        ``keep_label`` leaves the small ``.label`` file as a tombstone, so a late second
        label of a learned frame is still recognised as a repeat (the newest
        ``max_items`` tombstones are kept).
        """
        suffixes = (".json", ".png") if keep_label else (".json", ".png", ".label")
        for suffix in suffixes:
            with contextlib.suppress(FileNotFoundError):
                self._path(item_id, suffix).unlink()
        if keep_label:
            live = set(self.ids())
            stones = sorted(p.stem for p in self.folder.glob("*.label") if ID_PATTERN.match(p.stem) and p.stem not in live)
            for old in stones[: max(0, len(stones) - self.max_items)]:
                with contextlib.suppress(FileNotFoundError):
                    self._path(old, ".label").unlink()
