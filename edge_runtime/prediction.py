"""What ``Device.predict`` answers (``Prediction``), and the content key of a frame for the embedding cache."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
from PIL import Image

from .preprocess import ImageError, ImageSource


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


def frame_key(image: ImageSource) -> str:
    """A content key for the embedding cache: the same frame gives the same key."""
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
        h.update(np.ascontiguousarray(image).data)
    elif isinstance(image, Image.Image):
        h.update(f"pil:{image.mode}:{image.size}:".encode())
        h.update(image.tobytes())
    else:
        raise ImageError(f"cannot read an image from a {type(image).__name__}")
    return h.hexdigest()


def source_name(image: ImageSource) -> str:
    return Path(image).name if isinstance(image, (str, os.PathLike)) else type(image).__name__
