"""Which predicted frames go to the caregiver's queue: the one policy (pure: no I/O, the caller's clock).

A camera at 2 fps sees 170,000 frames a day; a caregiver labels a handful. Queue a frame only
if a face was found (``faces_only``), the head is unsure about it (``min_uncertainty``),
``every_s`` has passed since the last queued one, and it is not nearly the same picture as
that one (a sleeping baby is one question, not a thousand): cosine similarity of the
embeddings at or above ``duplicate_cosine`` (None: no such check).

``Device.predict(enqueue=True)`` asks it with the settings of its ``DeviceConfig`` (any
unsure frame, face or not, at most one per ``queue_min_interval_s``); the camera loop
(``watch``) predicts with ``enqueue=False`` and asks its own, stricter one on the stream's clock.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .core.uncertainty import DEFAULT_THRESHOLD

QUEUE = "queue"


@dataclass(frozen=True)
class QueueSettings:
    every_s: float = 60.0
    min_uncertainty: Optional[float] = None  # None: the device's ``uncertainty_threshold`` (``DEFAULT_THRESHOLD`` alone)
    duplicate_cosine: Optional[float] = 0.98
    faces_only: bool = True

    def __post_init__(self) -> None:
        cos, low = self.duplicate_cosine, self.min_uncertainty
        if self.every_s < 0 or (low is not None and not 0.0 <= low <= 1.0) or (cos is not None and not -1.0 <= cos <= 1.0):
            raise ValueError("--queue-every must be >= 0, uncertainty in [0, 1], cosine in [-1, 1]")


class QueuePolicy:
    """``decide`` says why a frame is (not) queued; ``queued`` records one that was."""

    def __init__(self, settings: QueueSettings = QueueSettings()):
        self.settings = settings
        self._last_t: Optional[float] = None
        self._last_embedding: Optional[np.ndarray] = None

    def decide(self, t: float, face_found: bool, uncertainty: float, embedding: Optional[np.ndarray]) -> str:
        """``QUEUE`` or the reason not to: ``no face``, ``confident``, ``too soon``, ``duplicate``."""
        s = self.settings
        if s.faces_only and not face_found:
            return "no face"
        if uncertainty < (DEFAULT_THRESHOLD if s.min_uncertainty is None else s.min_uncertainty):
            return "confident"
        if self._last_t is not None and t - self._last_t < s.every_s:
            return "too soon"
        last = self._last_embedding
        if s.duplicate_cosine is not None and embedding is not None and last is not None and np.size(embedding) == last.size \
                and cosine(embedding, last) >= s.duplicate_cosine:
            return "duplicate"
        return QUEUE

    def queued(self, t: float, embedding: Optional[np.ndarray]) -> None:
        self._last_t = t
        self._last_embedding = None if embedding is None else np.asarray(embedding, np.float32).copy()

    def forget_embedding(self) -> None:
        """A new extractor: its embeddings cannot be compared with the last queued one's."""
        self._last_embedding = None


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0
