"""MediaPipe's face mesh (468 points) on the BlazeFace face, and the mesh's expression geometry.

Why it exists: issue 22 asked whether explicit geometry (mouth opening and width, brow
height, eye opening) adds to the extractor's embedding on infants. This is the measuring
tool (``bench/landmarks_cv.py``, ``docs/landmarks.md``); the device does not use it.

``FaceMesh`` owns the ONNX Runtime session of ``face_landmark.tflite`` converted by
``infantino.export.landmarks``; the region it reads is MediaPipe's (the detection box's long
side x 1.5, turned so the eyes are level), cut by ``facecrop.cut``. ``geometry`` is pure
numpy: the mesh turned so the outer eye corners are level and scaled by their distance, so
every feature is free of image size, face size and in-plane rotation.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from infantino.edge_runtime.core.blazeface import Detection
from infantino.edge_runtime.core.facecrop import SHRINK_FIRST, FaceSquare, cut, face_square, pixels_read
from infantino.edge_runtime.core.onnx_session import cpu_session

LANDMARKS_FILE = "landmarks.onnx"
MESH_INPUT = 192  # the network's input side, RGB in [0, 1]
N_POINTS = 468
ROI_MARGIN = 0.25  # MediaPipe scales the detection box by 1.5: a margin of 0.25 a side

# Mesh indices (MediaPipe's canonical face mesh; "right" is the subject's right, on the image's left).
R_EYE_OUTER, R_EYE_INNER, R_EYE_TOP, R_EYE_BOTTOM = 33, 133, 159, 145
L_EYE_OUTER, L_EYE_INNER, L_EYE_TOP, L_EYE_BOTTOM = 263, 362, 386, 374
R_BROW, L_BROW = (70, 63, 105, 66, 107), (300, 293, 334, 296, 336)  # outer to inner
MOUTH_RIGHT, MOUTH_LEFT = 61, 291
INNER_LIP_TOP, INNER_LIP_BOTTOM = 13, 14
OUTER_LIP_TOP, OUTER_LIP_BOTTOM = 0, 17
NOSE_TIP, CHIN = 1, 152

FEATURES = ("mouth_open", "mouth_width", "mouth_aspect", "lip_height", "mouth_corner_lift", "eye_open",
            "brow_raise", "brow_inner_raise", "brow_gap", "nose_to_lip", "jaw_drop", "yaw")


@dataclass(frozen=True)
class MeshResult:
    """One face's mesh: points (468, 3) in pixels of the 192 x 192 eye-levelled region, the
    face score (sigmoid of the network's face flag) and the region it was read from."""

    points: np.ndarray
    score: float
    square: FaceSquare


# ---------------------------------------------------------------- pure geometry


def align(points: np.ndarray) -> np.ndarray:
    """(N, >=2) mesh -> (N, 2): origin between the outer eye corners, those corners on the x axis
    (y still points down, as in the image), one unit = their distance."""
    xy = np.asarray(points, np.float64)[:, :2]
    if xy.shape[0] < N_POINTS:
        raise ValueError(f"a face mesh has {N_POINTS} points, got {xy.shape[0]}")
    right, left = xy[R_EYE_OUTER], xy[L_EYE_OUTER]
    d = left - right
    iod = float(np.hypot(*d))
    if not math.isfinite(iod) or iod < 1e-6:
        raise ValueError("degenerate mesh: the outer eye corners coincide")
    c, s = d / iod
    rot = np.array([[c, s], [-s, c]])  # turns d onto +x
    return (xy - (right + left) / 2.0) @ rot.T / iod


def geometry(points: np.ndarray) -> np.ndarray:
    """The expression features ``FEATURES`` of one mesh, float32; lengths in inter-ocular distances."""
    p = align(points)
    y = p[:, 1]

    def dist(i: int, j: int) -> float:
        return float(np.hypot(*(p[i] - p[j])))

    mouth_open = y[INNER_LIP_BOTTOM] - y[INNER_LIP_TOP]
    mouth_width = dist(MOUTH_RIGHT, MOUTH_LEFT)
    mouth_mid = (y[INNER_LIP_TOP] + y[INNER_LIP_BOTTOM]) / 2.0
    eye_open = np.mean([(y[R_EYE_BOTTOM] - y[R_EYE_TOP]) / max(dist(R_EYE_OUTER, R_EYE_INNER), 1e-6),
                        (y[L_EYE_BOTTOM] - y[L_EYE_TOP]) / max(dist(L_EYE_OUTER, L_EYE_INNER), 1e-6)])
    brow_raise = np.mean([y[R_EYE_TOP] - y[list(R_BROW)].mean(), y[L_EYE_TOP] - y[list(L_BROW)].mean()])
    brow_inner = np.mean([y[R_EYE_INNER] - y[R_BROW[-1]], y[L_EYE_INNER] - y[L_BROW[-1]]])
    yaw = float(np.hypot(*(p[NOSE_TIP] - p[R_EYE_OUTER])) - np.hypot(*(p[NOSE_TIP] - p[L_EYE_OUTER])))
    return np.array([
        mouth_open, mouth_width, mouth_open / max(mouth_width, 1e-6),
        y[OUTER_LIP_BOTTOM] - y[OUTER_LIP_TOP],
        mouth_mid - (y[MOUTH_RIGHT] + y[MOUTH_LEFT]) / 2.0,  # > 0: the corners sit above the lips' centre (a smile)
        eye_open, brow_raise, brow_inner, dist(R_BROW[-1], L_BROW[-1]),
        y[OUTER_LIP_TOP] - y[NOSE_TIP], y[CHIN] - y[NOSE_TIP], yaw,
    ], np.float32)


# ---------------------------------------------------------------- the region and the network


def mesh_square(det: Detection | None, width: int, height: int) -> FaceSquare:
    """MediaPipe's region for a detection; without one the frame's centre square (the crop's own fallback)."""
    if det is None:
        side = float(min(width, height))
        return FaceSquare(width / 2.0, height / 2.0, side)
    return face_square(det.box, ROI_MARGIN, det.keypoints, align=True)


def mesh_input(rgb: np.ndarray, sq: FaceSquare) -> np.ndarray:
    """The (192, 192, 3) uint8 eye-levelled region: ``cut`` per channel on only the pixels it reads. A square up
    to 2.25 x the input side is warped directly to at most 1.5 x it and the three channels shrunk together
    (``cut``'s own area-averaging, once per channel, costs about 4x more)."""
    import cv2

    h, w = rgb.shape[:2]
    cut_side = MESH_INPUT if sq.side <= MESH_INPUT * SHRINK_FIRST else int(MESH_INPUT * SHRINK_FIRST)
    x0, y0, x1, y1 = pixels_read(sq, w, h, cut_side)
    local = FaceSquare(sq.cx - x0, sq.cy - y0, sq.side, sq.angle)
    region = rgb[y0:y1, x0:x1]
    out = np.stack([cut(np.ascontiguousarray(region[:, :, c]), local, cut_side) for c in range(3)], axis=2)
    if out.shape[0] != MESH_INPUT:  # a face smaller than the input is cut at its own size, a larger one at cut_side
        shrink = out.shape[0] > MESH_INPUT
        out = cv2.resize(out, (MESH_INPUT, MESH_INPUT), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out


class FaceMesh:
    """Owns one ONNX Runtime session of the converted face mesh; ``run`` and ``mesh`` are the API."""

    def __init__(self, model_path: str | os.PathLike | None = None, threads: int = 1, session: Any = None):
        if session is None:
            if model_path is None:
                raise ValueError("give a model path or a session")
            session = cpu_session(model_path, threads)
        self.session = session
        self.input_name = session.get_inputs()[0].name
        sizes = [int(np.prod([d for d in o.shape if isinstance(d, int)])) for o in session.get_outputs()]
        if sorted(sizes) != [1, N_POINTS * 3]:
            raise ValueError(f"not a {N_POINTS}-point face mesh: outputs of {sizes} values")
        self._points_out = sizes.index(N_POINTS * 3)

    def run(self, region: np.ndarray) -> tuple[np.ndarray, float]:
        """(192, 192, 3) uint8 RGB -> points (468, 3) in region pixels and the face score in [0, 1]."""
        x = np.ascontiguousarray(region.astype(np.float32).transpose(2, 0, 1)[None]) * np.float32(1.0 / 255.0)
        outs = self.session.run(None, {self.input_name: x})
        flag = float(np.asarray(outs[1 - self._points_out]).reshape(-1)[0])
        score = 1.0 / (1.0 + math.exp(-min(max(flag, -80.0), 80.0)))
        return np.asarray(outs[self._points_out], np.float32).reshape(N_POINTS, 3), score

    def mesh(self, rgb: np.ndarray, det: Detection | None) -> MeshResult:
        """The mesh of a frame's face (BlazeFace's detection; ``None``: the centre square)."""
        sq = mesh_square(det, rgb.shape[1], rgb.shape[0])
        points, score = self.run(mesh_input(rgb, sq))
        return MeshResult(points, score, sq)
