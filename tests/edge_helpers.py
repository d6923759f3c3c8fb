"""Shared pieces of the edge runtime tests: a device on the tiny package, synthetic frames."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from infantino.export.tiny_package import synthetic_face

from infantino.edge_runtime.device import Device, DeviceConfig

# Tests feed synthetic 64x64 faces: no Haar detection (it would only fall back to the centre).
FAST = DeviceConfig(threads=1, detect_faces=False)


def open_device(package: Path, state: Path, **overrides) -> Device:
    cfg = DeviceConfig(**{**FAST.__dict__, **overrides})
    return Device(package, state, cfg)


def face(label: int, seed: int = 0) -> np.ndarray:
    return synthetic_face(label, np.random.default_rng(seed))


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_image_folder(root: Path, per_class: int, seed: int, classes: tuple[str, ...]) -> Path:
    """An ImageFolder tree of synthetic faces (PNG), ``per_class`` per class."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(synthetic_face(c, rng)).save(root / name / f"{i:03d}.png")
    return root


def tree_digest(root: Path) -> str:
    """One hash over every file's name and bytes under ``root``."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def head_weights(device: Device) -> list[np.ndarray]:
    return [w.copy() for w in device.head.weights()]
