"""Square face crops from a detection: margin, eye levelling and the resampling that does it.

Pure geometry on numpy arrays (OpenCV for the warp). The crop is cut by one affine warp
that rotates about the face centre so the eyes are level, scales and translates; a face
far larger than the model input is first shrunk with area averaging, so the warp never
aliases (a 2,000 px face and a 100 px face give the same kind of crop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Crops are cut at most this many pixels a side; the model input (64 px) is resized from it.
MAX_CROP_SIDE = 256


@dataclass(frozen=True)
class FaceSquare:
    """Where to cut: centre and side in frame pixels, rotation in degrees (counter-clockwise)."""

    cx: float
    cy: float
    side: float
    angle: float = 0.0

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The axis-aligned (x, y, w, h) of the unrotated square, clipped to the frame."""
        x0 = int(round(max(0.0, self.cx - self.side / 2)))
        y0 = int(round(max(0.0, self.cy - self.side / 2)))
        x1 = int(round(min(float(width), self.cx + self.side / 2)))
        y1 = int(round(min(float(height), self.cy + self.side / 2)))
        return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def eye_angle(keypoints: np.ndarray) -> float:
    """Degrees to rotate (counter-clockwise on screen) so the eyes (keypoints 0 and 1) are level."""
    (x0, y0), (x1, y1) = sorted((tuple(keypoints[0]), tuple(keypoints[1])))  # image-left eye first
    return math.degrees(math.atan2(y1 - y0, x1 - x0))


def face_square(box: tuple[float, float, float, float], margin: float, keypoints: np.ndarray | None = None,
                align: bool = False, max_angle: float = 45.0) -> FaceSquare:
    """A square around a detector box grown by ``margin`` of its size on each side.

    With ``align`` and keypoints the square turns with the eye line (angles beyond
    ``max_angle`` are taken as keypoint errors and ignored).
    """
    x, y, w, h = box
    side = max(w, h) * (1.0 + 2.0 * margin)
    angle = eye_angle(keypoints) if align and keypoints is not None else 0.0
    if abs(angle) > max_angle:
        angle = 0.0
    return FaceSquare(x + w / 2.0, y + h / 2.0, max(side, 1.0), angle)


SHRINK_FIRST = 1.5  # a square this many times larger than its crop is area-averaged before the warp


def pixels_read(sq: FaceSquare, width: int, height: int, max_side: int = MAX_CROP_SIDE) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): a box holding every frame pixel ``cut`` reads for ``sq``, clipped to the
    frame, so a caller may convert only these pixels to gray and get the same crop: the
    neighbourhood ``cut`` area-averages, else the turned square and its bilinear neighbours."""
    if sq.side / _out_side(sq, max_side) > SHRINK_FIRST:
        r = sq.side * 0.75
    else:
        turn = math.radians(sq.angle)
        r = sq.side / 2.0 * (abs(math.cos(turn)) + abs(math.sin(turn))) + 2.0
    x0, y0 = max(0, math.floor(sq.cx - r)), max(0, math.floor(sq.cy - r))
    x1, y1 = min(width, math.ceil(sq.cx + r) + 1), min(height, math.ceil(sq.cy + r) + 1)
    return x0, y0, max(x0 + 1, x1), max(y0 + 1, y1)


def _out_side(sq: FaceSquare, max_side: int) -> int:
    return int(max(1, min(round(sq.side), max_side)))


def cut(gray: np.ndarray, sq: FaceSquare, max_side: int = MAX_CROP_SIDE) -> np.ndarray:
    """The square's pixels, upright, as a uint8 (S, S) crop with S = min(side, max_side).

    Outside the frame the border pixels are repeated (a face at the edge keeps its size
    instead of being squeezed).
    """
    import cv2

    out = _out_side(sq, max_side)
    factor = sq.side / out
    src, cx, cy = gray, sq.cx, sq.cy
    if factor > SHRINK_FIRST:  # shrink the neighbourhood first: area averaging, then a near-1:1 warp
        reach = sq.side * 0.75  # half the diagonal of the square, and a little more
        h, w = gray.shape
        x0, y0 = max(0, int(cx - reach)), max(0, int(cy - reach))
        x1, y1 = min(w, int(math.ceil(cx + reach))), min(h, int(math.ceil(cy + reach)))
        region = gray[y0:y1, x0:x1]
        k = 1.0 / factor
        src = cv2.resize(region, (max(1, round(region.shape[1] * k)), max(1, round(region.shape[0] * k))),
                         interpolation=cv2.INTER_AREA)
        kx, ky = src.shape[1] / region.shape[1], src.shape[0] / region.shape[0]
        cx, cy, factor = (cx - x0) * kx, (cy - y0) * ky, factor * kx
    m = cv2.getRotationMatrix2D((float(cx), float(cy)), float(sq.angle), 1.0 / factor)
    m[0, 2] += out / 2.0 - cx
    m[1, 2] += out / 2.0 - cy
    return cv2.warpAffine(src, m, (out, out), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
