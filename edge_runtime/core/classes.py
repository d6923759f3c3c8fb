"""The seven expressions in FER2013 order: the class layout of every package trained here.

A module of its own (no imports) so that numpy-only code (the head, the learner) can name the
classes without importing the image code that ``preprocess`` needs (Pillow).
"""
from __future__ import annotations

CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
