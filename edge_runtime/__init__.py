"""Device side of InfantinO Edge: CPU-only inference and on-device learning.

The device core imports numpy, Pillow, onnxruntime, scikit-learn and OpenCV only.
"""
from .preprocess import CLASSES, ImageError, PreprocessSpec

__all__ = ["CLASSES", "ImageError", "PreprocessSpec"]
