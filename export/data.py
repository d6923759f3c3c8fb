"""Training data: FER2013 faces and ImageFolder photos, through the device's preprocessing.

Every image becomes a uint8 face crop of the model's size by ``infantino.edge_runtime.core.preprocess``
(the exact code the device runs); augmentation then works on batches of those crops in
torch, and the last step is the device's own normalisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from infantino.edge_runtime.core.facefinder import FaceFinder
from infantino.edge_runtime.core.imagefolder import list_image_folder
from infantino.edge_runtime.core.preprocess import CLASSES, DEFAULT_SPEC, ImageError, PreprocessSpec, resize_face


@dataclass
class FaceSet:
    """Face crops at model size (uint8 N x H x W) with integer labels into ``CLASSES``."""

    pixels: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "FaceSet":
        return FaceSet(self.pixels[idx], self.labels[idx])

    @staticmethod
    def concat(parts: list["FaceSet"]) -> "FaceSet":
        return FaceSet(np.concatenate([p.pixels for p in parts]), np.concatenate([p.labels for p in parts]))


def load_fer(path: str | Path, spec: PreprocessSpec = DEFAULT_SPEC, limit: int | None = None) -> FaceSet:
    """FER2013 npz (images uint8 N x 48 x 48, labels, classes) resized by the device code."""
    with np.load(path, allow_pickle=False) as data:
        classes = tuple(str(c) for c in data["classes"])
        if classes != CLASSES:
            raise ValueError(f"{path}: classes {classes} are not in the expected order {CLASSES}")
        images, labels = data["images"], data["labels"].astype(np.int64)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    pixels = np.stack([resize_face(img, spec) for img in images])
    return FaceSet(pixels, labels)


def load_image_folder(root: str | Path, spec: PreprocessSpec = DEFAULT_SPEC, detect: bool = True,
                      finder: FaceFinder | None = None) -> FaceSet:
    """Decode, face-crop and resize every photo of an ImageFolder tree; unreadable ones are skipped.

    An image already at the model's input size is taken as a face crop (what devices upload,
    ``infantino-server crops export``) and is not searched for a face again. ``finder`` is
    the device's face finder for ``spec`` (Haar when not given).
    """
    finder = finder or FaceFinder.haar(spec)
    pixels, labels = [], []
    for path, label in list_image_folder(root):
        try:
            with Image.open(path) as img:
                is_crop = img.size == tuple(spec.size)[::-1]
            face = finder.crop(path, detect=detect and not is_crop)
        except (ImageError, OSError):
            continue
        pixels.append(resize_face(face.pixels, spec))
        labels.append(label)
    return FaceSet(np.stack(pixels), np.asarray(labels, dtype=np.int64))
