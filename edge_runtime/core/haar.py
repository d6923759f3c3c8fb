"""OpenCV's Haar cascade: the face detector of older packages, and BlazeFace's fallback when a
package names it (``opencv-haar,centre-square``). Beside ``blazeface``, under ``facefinder``;
it imports nothing of ours (OpenCV only when a face is looked for).
"""
from __future__ import annotations

import os

import numpy as np

HAAR_MAX_SIDE = 320  # Haar runs on a copy this size (the spec's ``detect_max_side``)

_CASCADE = None


def _cascade():
    """The Haar detector, loaded once (OpenCV is imported only when detection is used)."""
    global _CASCADE
    if _CASCADE is None:
        import cv2

        path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        cascade = cv2.CascadeClassifier(path)
        if cascade.empty():
            raise RuntimeError(f"cannot load the Haar cascade at {path}")
        _CASCADE = cascade
    return _CASCADE


def detect_faces(gray: np.ndarray, max_side: int = HAAR_MAX_SIDE) -> list[tuple[int, int, int, int]]:
    """Face boxes (x, y, w, h) in ``gray``'s coordinates, largest first.

    Detection runs on a copy downscaled to ``max_side`` (Haar on a full 640 px frame is
    several times slower); boxes are scaled back so the crop keeps full resolution.
    """
    import cv2

    h, w = gray.shape
    scale = min(1.0, max_side / max(h, w))
    small = gray if scale == 1.0 else cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    min_side = max(20, int(min(small.shape) * 0.08))
    boxes = _cascade().detectMultiScale(small, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
    out = [tuple(int(round(v / scale)) for v in b) for b in (boxes if len(boxes) else [])]
    return sorted(out, key=lambda b: b[2] * b[3], reverse=True)
