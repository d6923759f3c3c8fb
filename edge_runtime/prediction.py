"""What ``Device.predict`` answers (``Prediction``), and the content key of a frame for the embedding cache."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
from PIL import Image

from .core.preprocess import ImageError, ImageSource


@dataclass
class Prediction:
    """One frame's answer. Unpacks like the seed's API: ``label, uncertainty = prediction``."""

    label: str
    index: int
    probabilities: np.ndarray  # float32, in ``classes`` order
    uncertainty: float
    entropy: float
    margin: float
    face_found: bool
    box: tuple[int, int, int, int]
    frame_key: str
    queued_id: str | None = None
    embedding: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    classes: tuple[str, ...] = field(default=(), repr=False)
    epoch: int = field(default=-1, repr=False, compare=False)  # which of the device's packages embedded it

    def __iter__(self) -> Iterator[Any]:
        return iter((self.label, self.uncertainty))

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, self.probabilities)},
                "uncertainty": round(self.uncertainty, 6), "entropy": round(self.entropy, 6), "margin": round(self.margin, 6),
                "face_found": self.face_found, "box": list(self.box), "queued_id": self.queued_id}


@dataclass
class Cached:
    embedding: np.ndarray
    crop: np.ndarray
    face_found: bool
    epoch: int  # the package that embedded it (a ``Device`` counts its package switches)


Learnable = Union[ImageSource, Prediction]


FINGERPRINT_STRIDE = 199  # bytes between sampled bytes (a prime): every row of a 640x480 RGB frame holds ~10 of them


def fingerprint(a: np.ndarray) -> bytes:
    """A cheap content fingerprint of a pixel array (~35 us for 640x480 RGB, against ~1.3 ms for
    hashing every byte): the wrapping sum of all its 64-bit words, which any change of one byte
    moves, plus every ``FINGERPRINT_STRIDE``-th byte in place, which a rearrangement moves.
    Two camera frames that differ agree on both only by construction, never by sensor noise."""
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    words = len(flat) // 8
    total = int(flat[: words * 8].view(np.uint64).sum(dtype=np.uint64)) if words else 0
    tail = flat[words * 8:].tobytes()
    return total.to_bytes(8, "little") + tail + flat[::FINGERPRINT_STRIDE].tobytes()


def frame_key(image: ImageSource) -> str:
    """A content key for the embedding cache: the same frame gives the same key. Paths key on
    name, size and mtime; bytes on every byte; pixel arrays on ``fingerprint`` (a frame is keyed on
    every prediction, so this stays far below the cost of the models)."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(image, (str, os.PathLike)):
        try:
            st = os.stat(image)
        except OSError:
            raise ImageError(f"no such image file: {image}") from None
        h.update(f"path:{os.path.abspath(image)}:{st.st_size}:{st.st_mtime_ns}".encode())
    elif isinstance(image, (bytes, bytearray, memoryview)):
        h.update(b"bytes:")
        h.update(image)
    elif isinstance(image, np.ndarray):
        h.update(f"array:{image.shape}:{image.dtype}:".encode())
        h.update(fingerprint(image))
    elif isinstance(image, Image.Image):
        h.update(f"pil:{image.mode}:{image.size}:".encode())
        h.update(fingerprint(np.frombuffer(image.tobytes(), np.uint8)))
    else:
        raise ImageError(f"cannot read an image from a {type(image).__name__}")
    return h.hexdigest()


def source_name(image: ImageSource) -> str:
    return Path(image).name if isinstance(image, (str, os.PathLike)) else type(image).__name__
