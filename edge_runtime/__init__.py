"""Device side of InfantinO Edge: CPU-only inference and on-device learning.

    from infantino.edge_runtime import Device, DeviceConfig
    device = Device("data/models", "state", DeviceConfig(threads=1))
    label, uncertainty = device.predict("frame.jpg")   # a Prediction; it unpacks to these two
    device.learn("frame.jpg", "happy")

The device core imports numpy, Pillow, onnxruntime, scikit-learn and OpenCV only.
Every name here is loaded on first use, so that importing a light module
(``infantino.edge_runtime.core.wire``, ``infantino.edge_runtime.core.package``, the numpy-only
``learner``) neither starts ONNX Runtime nor imports Pillow.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.classes import CLASSES
    from .device import Device, DeviceConfig, Prediction
    from .core.preprocess import ImageError, PreprocessSpec

_LAZY = {"Device": "device", "DeviceConfig": "device", "Prediction": "device", "CLASSES": "classes",
         "ImageError": "preprocess", "PreprocessSpec": "preprocess"}

__all__ = ["CLASSES", "Device", "DeviceConfig", "ImageError", "Prediction", "PreprocessSpec"]


def __getattr__(name: str) -> Any:
    """``from infantino.edge_runtime import Device`` imports ``infantino.edge_runtime.device`` only then (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
