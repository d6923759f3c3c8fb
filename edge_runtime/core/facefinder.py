"""The one face-finding path: device, training, evaluation and the gate all call ``FaceFinder``.

A package's manifest names the detector (BlazeFace, shipped in the package as
``detector.onnx``, or OpenCV's Haar cascade for older packages), its score threshold, the
crop margin, eye levelling and the fallback when no face is found. ``FaceFinder`` turns
that spec plus the detector file into the crop the extractor is trained and run on.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .blazeface import VARIANTS, BlazeFace, BlazeFaceSettings, Detection
from .facecrop import FaceSquare, cut, face_square, pixels_read
from .haar import detect_faces
from .preprocess import (DEFAULT_SPEC, FaceCrop, ImageSource, Prepared, PreprocessSpec, centre_square, decode_gray,
                         decode_rgb, normalize, resize_face, rgb_to_gray, square_box)

HAAR = "opencv-haar-frontalface-default"
BLAZEFACE_PREFIX = "blazeface-"


DETECTOR_FILE = "detector.onnx"
DETECTOR_INFO = "detector.json"  # variant, anchor settings, origin and licence, next to the .onnx


def detector_file(folder: str | os.PathLike) -> Path:
    """The converted detector in a folder written by ``infantino-export detector``."""
    path = Path(folder) / DETECTOR_FILE
    if not path.is_file():
        raise ValueError(f"no {DETECTOR_FILE} in {folder}: convert one with `infantino-export detector`")
    return path


def detector_info(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / DETECTOR_INFO
    if not path.is_file():
        raise ValueError(f"no {DETECTOR_INFO} in {folder}")
    return json.loads(path.read_text(encoding="utf-8"))


def detector_spec(folder: str | os.PathLike, base: PreprocessSpec | None = None) -> PreprocessSpec:
    """``base`` (default: the device defaults) with the folder's detector and its chosen crop settings."""
    info = detector_info(folder)
    spec = base or PreprocessSpec()
    return PreprocessSpec.from_dict({**spec.to_dict(), "face_detector": BLAZEFACE_PREFIX + info["variant"],
                                     **info.get("preprocess", {})})


def uses_blazeface(spec: PreprocessSpec) -> bool:
    return spec.face_detector.startswith(BLAZEFACE_PREFIX)


def blazeface_settings(spec: PreprocessSpec, settings: dict[str, Any] | None = None) -> BlazeFaceSettings:
    """The anchor/decoding settings for the spec's variant (manifest values win), with the spec's threshold."""
    variant = spec.face_detector[len(BLAZEFACE_PREFIX):]
    if settings:
        base = BlazeFaceSettings.from_dict(settings)
    elif variant in VARIANTS:
        base = VARIANTS[variant]
    else:
        raise ValueError(f"unknown face detector {spec.face_detector!r}")
    return replace(base, score_threshold=spec.detector_score)


class FaceFinder:
    """Finds the face in a frame and cuts the square crop the spec describes."""

    def __init__(self, spec: PreprocessSpec, blazeface: BlazeFace | None = None):
        if uses_blazeface(spec) and blazeface is None:
            raise ValueError(f"the spec's detector {spec.face_detector!r} needs its model file: "
                             "use FaceFinder.for_package or FaceFinder.from_file")
        self.spec, self.blazeface = spec, blazeface

    @classmethod
    def haar(cls, spec: PreprocessSpec) -> "FaceFinder":
        """A finder for a spec whose detector needs no model file (Haar ships with OpenCV)."""
        return _haar_finder(spec)

    @classmethod
    def from_file(cls, spec: PreprocessSpec, detector: str | os.PathLike | None, settings: dict[str, Any] | None = None,
                  threads: int = 1) -> "FaceFinder":
        if not uses_blazeface(spec):
            return cls(spec)
        if detector is None:
            raise ValueError(f"the spec's detector {spec.face_detector!r} needs a detector .onnx file")
        info = Path(detector).with_name(DETECTOR_INFO)
        if settings is None and info.is_file():
            settings = json.loads(info.read_text(encoding="utf-8")).get("settings")
        return cls(spec, BlazeFace(detector, blazeface_settings(spec, settings), threads=threads))

    @classmethod
    def for_package(cls, package: Any, spec: PreprocessSpec | None = None, threads: int = 1) -> "FaceFinder":
        """The finder of an opened ``ModelPackage`` (its detector file and manifest settings)."""
        spec = spec or package.manifest.preprocess
        if not uses_blazeface(spec):
            return cls(spec)
        settings = package.manifest.detector.get("settings") if package.manifest.detector else None
        return cls.from_file(spec, package.path("detector"), settings, threads)

    # ------------------------------------------------------------ cropping
    def crop(self, source: ImageSource, detect: bool = True) -> FaceCrop:
        """Decode ``source`` and cut its face (``detect=False``: the image already is a face crop)."""
        if not detect:
            gray = decode_gray(source)
            h, w = gray.shape
            return FaceCrop(gray, True, (0, 0, w, h))
        if self.blazeface is None:
            return self.crop_gray(decode_gray(source))
        rgb = decode_rgb(source)
        found = self.blazeface.detect(rgb)
        if found:
            det = _largest(found)
            sq = self._square(det)
            return self._cut_square(_gray_near(rgb, sq), sq, det)
        return self._fallback(rgb_to_gray(rgb))

    def crop_arrays(self, rgb: np.ndarray | None, gray: np.ndarray) -> FaceCrop:
        """The face of one decoded frame: BlazeFace on colour (or gray), then the fallbacks."""
        if self.blazeface is not None:
            found = self.blazeface.detect(rgb if rgb is not None else gray)
            if found:
                return self._cut_detection(gray, _largest(found))
        return self._fallback(gray)

    def _fallback(self, gray: np.ndarray) -> FaceCrop:
        """No BlazeFace face: Haar when the spec names it, else the centre square."""
        return self.crop_gray(gray, haar=self.blazeface is None or "opencv-haar" in self.spec.fallback)

    def crop_gray(self, gray: np.ndarray, haar: bool = True) -> FaceCrop:
        """Haar (largest face + margin, unrotated) and then the centre square."""
        h, w = gray.shape
        boxes = self._haar(gray) if haar else []
        if boxes:
            x, y, s, _ = square_box(boxes[0], self.spec.face_margin, w, h)
            return FaceCrop(gray[y : y + s, x : x + s], True, (x, y, s, s))
        x, y, s, _ = centre_square(w, h)
        return FaceCrop(gray[y : y + s, x : x + s], False, (x, y, s, s))

    def _haar(self, gray: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Coarse to fine: a face that fills a good part of the frame is found on a small copy
        at a quarter of the cost; only when none is, the full-size pass runs."""
        coarse, full = self.spec.detect_coarse_side, self.spec.detect_max_side
        if coarse and coarse < full:
            boxes = detect_faces(gray, coarse)
            if boxes:
                return boxes
        return detect_faces(gray, full)

    def _square(self, det: Detection) -> FaceSquare:
        return face_square(det.box, self.spec.face_margin, det.keypoints, self.spec.align_eyes)

    def _cut_detection(self, gray: np.ndarray, det: Detection) -> FaceCrop:
        return self._cut_square(gray, self._square(det), det)

    @staticmethod
    def _cut_square(gray: np.ndarray, sq: FaceSquare, det: Detection) -> FaceCrop:
        h, w = gray.shape
        return FaceCrop(cut(gray, sq), True, sq.box(w, h), sq.angle, det.score)


def _largest(found: list[Detection]) -> Detection:
    return max(found, key=lambda d: d.box[2] * d.box[3])


def _gray_near(rgb: np.ndarray, sq: FaceSquare) -> np.ndarray:
    """A frame-sized gray array whose pixels ``cut`` reads for ``sq`` are ``rgb_to_gray``'s (the rest
    is never read): converting a camera frame whole costs more than the crop resize."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = pixels_read(sq, w, h)
    gray = np.zeros((h, w), np.uint8)
    gray[y0:y1, x0:x1] = rgb_to_gray(rgb[y0:y1, x0:x1])
    return gray


@lru_cache(maxsize=16)
def _haar_finder(spec: PreprocessSpec) -> FaceFinder:
    return FaceFinder(spec)


def prepare(source: ImageSource, spec: PreprocessSpec = DEFAULT_SPEC, detect: bool = True, finder: "FaceFinder | None" = None) -> Prepared:
    """Decode, crop and normalise one image: the whole device input path.

    ``finder`` is the package's face finder (``FaceFinder.for_package``); without one the
    spec's detector must be Haar, which needs no model file.
    """
    finder = finder if finder is not None else FaceFinder.haar(spec)
    face = finder.crop(source, detect=detect)
    small = resize_face(face.pixels, spec)
    return Prepared(normalize(small, spec)[None], small, face.face_found, face.box)
