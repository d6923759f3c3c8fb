"""BlazeFace (MediaPipe face detection) run by ONNX Runtime, decoded in plain numpy.

The network (``face_detection_short_range`` / ``face_detection_full_range``, Apache-2.0,
converted once from MediaPipe's ``.tflite`` by ``infantino-export detector``) predicts,
for each of a fixed grid of SSD anchors, a score and 16 numbers: box centre, box size and
six keypoints (eyes, nose tip, mouth, ear tragions) as offsets from the anchor in input
pixels. Everything after the network is here: anchors (MediaPipe's
``ssd_anchors_calculator``), decoding (``tensors_to_detections``), weighted NMS and
letterbox removal. The device needs onnxruntime and numpy only, never mediapipe.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .onnx_session import cpu_session

# Keypoint order of the model's output (subject's right eye appears on the image's left).
KEYPOINTS = ("right_eye", "left_eye", "nose_tip", "mouth", "right_ear_tragion", "left_ear_tragion")


@dataclass(frozen=True)
class BlazeFaceSettings:
    """Anchor grid and decoding settings of one BlazeFace model; stored in the manifest."""

    input_size: int = 128
    strides: tuple[int, ...] = (8, 16, 16, 16)
    anchor_offset: float = 0.5
    interpolated_scale_aspect_ratio: float = 1.0
    score_threshold: float = 0.5
    nms_threshold: float = 0.3
    raw_score_limit: float = 80.0
    input_range: tuple[float, float] = (-1.0, 1.0)
    layout: str = "NCHW"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["strides"], d["input_range"] = list(self.strides), list(self.input_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BlazeFaceSettings":
        known = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in known}
        if "strides" in kw:
            kw["strides"] = tuple(int(s) for s in kw["strides"])
        if "input_range" in kw:
            kw["input_range"] = tuple(float(v) for v in kw["input_range"])
        return cls(**kw)


SHORT_RANGE = BlazeFaceSettings()
FULL_RANGE = BlazeFaceSettings(input_size=192, strides=(4,), interpolated_scale_aspect_ratio=0.0)
VARIANTS = {"short_range": SHORT_RANGE, "full_range": FULL_RANGE}


@dataclass
class Detection:
    """One face in frame pixels: box (x, y, w, h), six keypoints (x, y) and the score."""

    box: tuple[float, float, float, float]
    keypoints: np.ndarray  # float32 (6, 2), frame pixels, order KEYPOINTS
    score: float
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- pure math


def ssd_anchors(s: BlazeFaceSettings) -> np.ndarray:
    """Anchor centres (N, 2) in [0, 1], in the order the network emits them.

    Consecutive layers with the same stride share one feature map; each cell then holds two
    anchors per such layer (one when the interpolated aspect ratio is off), as in MediaPipe.
    """
    centres, i = [], 0
    while i < len(s.strides):
        j, repeats = i, 0
        while j < len(s.strides) and s.strides[j] == s.strides[i]:
            repeats += 2 if s.interpolated_scale_aspect_ratio == 1.0 else 1
            j += 1
        side = s.input_size // s.strides[i]
        grid = (np.arange(side, dtype=np.float32) + s.anchor_offset) / side
        yy, xx = np.meshgrid(grid, grid, indexing="ij")
        cell = np.stack([xx.ravel(), yy.ravel()], axis=1)
        centres.append(np.repeat(cell, repeats, axis=0))
        i = j
    return np.concatenate(centres).astype(np.float32)


def decode(raw_boxes: np.ndarray, raw_scores: np.ndarray, anchors: np.ndarray, s: BlazeFaceSettings
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw outputs (N, 16), (N, 1) -> boxes (N, 4) xmin, ymin, xmax, ymax, keypoints (N, 6, 2), scores (N,).

    All coordinates are in [0, 1] of the (letterboxed) network input. Scores are the sigmoid
    of the raw logits clipped to +-raw_score_limit (float32 overflows beyond that).
    """
    pts = np.asarray(raw_boxes, np.float32).reshape(len(anchors), -1, 2) / np.float32(s.input_size)
    centre = pts[:, 0] + anchors
    half = pts[:, 1] / 2.0
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    keypoints = pts[:, 2:] + anchors[:, None, :]
    return boxes, keypoints, scores_of(raw_scores, s)


def scores_of(raw_scores: np.ndarray, s: BlazeFaceSettings) -> np.ndarray:
    """Sigmoid of the raw logits clipped to +-raw_score_limit, float32 (N,)."""
    logits = np.clip(np.asarray(raw_scores, np.float32).reshape(-1), -s.raw_score_limit, s.raw_score_limit)
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one (4,) box with (N, 4) boxes, corners format."""
    lo = np.maximum(box[:2], boxes[:, :2])
    hi = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0.0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, s: BlazeFaceSettings
                 ) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's weighted NMS: each kept face is the score-weighted mean of its overlapping
    candidates (box and keypoints); it keeps the best candidate's score. Best first."""
    valid = (scores >= s.score_threshold) & np.all(boxes[:, 2:] > boxes[:, :2], axis=1)
    order = np.flatnonzero(valid)[np.argsort(-scores[valid], kind="stable")]
    out = []
    while order.size:
        best = order[0]
        overlap = iou(boxes[best], boxes[order]) > s.nms_threshold
        members = order[overlap]
        w = scores[members][:, None]
        box = (boxes[members] * w).sum(0) / w.sum()
        kps = (keypoints[members] * w[:, :, None]).sum(0) / w.sum()
        out.append((box, kps, float(scores[best])))
        order = order[~overlap]
    return out


@dataclass(frozen=True)
class Letterbox:
    """How a frame was fitted into the square network input (for mapping detections back)."""

    scale: float  # input pixels per frame pixel
    pad_x: float  # input pixels of padding on the left
    pad_y: float  # and on top


def letterbox(rgb: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize (H, W, 3) uint8 keeping its aspect ratio into a size x size square, black padded."""
    import cv2

    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    px, py = (size - nw) // 2, (size - nh) // 2
    square = np.zeros((size, size, 3), np.uint8)
    square[py : py + nh, px : px + nw] = small
    return square, Letterbox(nw / w, float(px), float(py))


def to_frame(points: np.ndarray, lb: Letterbox, size: int) -> np.ndarray:
    """Points (..., 2) in [0, 1] of the network input -> frame pixels."""
    xy = np.asarray(points, np.float64) * size
    return ((xy - (lb.pad_x, lb.pad_y)) / lb.scale).astype(np.float32)


# ---------------------------------------------------------------- the detector


class BlazeFace:
    """Owns one ONNX Runtime session of a converted BlazeFace model; ``detect`` is the API."""

    def __init__(self, model_path: str | os.PathLike, settings: BlazeFaceSettings = SHORT_RANGE,
                 threads: int = 1, session: Any = None):
        if session is None:
            session = cpu_session(model_path, threads)
        self.session = session
        self.settings = settings
        self.input_name = session.get_inputs()[0].name
        self.anchors = ssd_anchors(settings)
        outs = session.get_outputs()
        n_out = [o.shape[1] for o in outs]
        if any(isinstance(n, int) and n != len(self.anchors) for n in n_out):
            raise ValueError(f"detector emits {n_out} candidates, its settings give {len(self.anchors)} anchors")
        # the regressor output is the one with 16 values per anchor
        self._box_out = 0 if outs[0].shape[-1] == 16 else 1

    def tensor(self, rgb: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """The network input for one frame: letterboxed, scaled to the input range, NCHW."""
        s = self.settings
        square, lb = letterbox(rgb, s.input_size)
        lo, hi = s.input_range
        x = square.astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), lb

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in a uint8 (H, W) gray or (H, W, 3) RGB frame, best first, in frame pixels."""
        rgb = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image
        x, lb = self.tensor(rgb)
        outs = self.session.run(None, {self.input_name: x})
        raw_boxes, raw_scores = outs[self._box_out][0], outs[1 - self._box_out][0]
        # only the candidates over the threshold are decoded: NMS drops the others anyway (same faces, a tenth of the work)
        keep = np.flatnonzero(scores_of(raw_scores, self.settings) >= self.settings.score_threshold)
        if not keep.size:
            return []
        raw_scores = np.asarray(raw_scores).reshape(-1)
        boxes, kps, scores = decode(raw_boxes[keep], raw_scores[keep], self.anchors[keep], self.settings)
        size = self.settings.input_size
        found = []
        for box, kp, score in weighted_nms(boxes, kps, scores, self.settings):
            (x0, y0), (x1, y1) = to_frame(box.reshape(2, 2), lb, size)
            found.append(Detection((float(x0), float(y0), float(x1 - x0), float(y1 - y0)), to_frame(kp, lb, size), score))
        return found
