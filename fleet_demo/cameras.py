"""How one camera's scene changes a photo: the camera profiles of the demo and of bench/personalization.py.

Each profile turns a decoded RGB photo (uint8, H x W x 3) into the frame that camera would
hand the device, seeded per photo so a run is repeatable. The photo is first brought to a
camera's size (longer side 640 px): a nursery camera never sends a 4,000 px frame.

* ``day``: the photo as it is.
* ``night_ir``: a night-vision camera: dark, flat, noisy, a little soft, grayscale.
* ``low_light``: a dim room in colour: crushed exposure plus strong sensor noise.
* ``jpeg_lowres``: a cheap camera over a thin link: 160 px, JPEG quality 15.
* ``overhead``: a camera above the crib: the scene turned by 50 degrees (face rotated) and
  seen a little from above (vertical squash).

The demo's cameras (``plan_cameras``) each take one profile and one class mix.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

CAMERA_SIDE = 640


def camera_size(rgb: np.ndarray, side: int = CAMERA_SIDE) -> np.ndarray:
    """The photo with its longer side at most ``side`` px (Pillow bilinear)."""
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR))


def night_ir(gray: np.ndarray, seed: int) -> np.ndarray:
    """A grayscale frame as a night-vision camera sees it: dark, flat, noisy, a little soft."""
    rng = np.random.default_rng(seed)
    x = (gray.astype(np.float32) / 255.0) ** 1.6  # low light crushes the shadows
    x = 0.12 + 0.45 * x  # IR flattens contrast
    img = Image.fromarray(np.clip(x * 255, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))
    x = np.asarray(img, np.float32) + rng.normal(0, 10.0, gray.shape)  # sensor noise
    return np.clip(x, 0, 255).astype(np.uint8)


def _gray(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def day(rgb: np.ndarray, seed: int) -> np.ndarray:
    return rgb


def night(rgb: np.ndarray, seed: int) -> np.ndarray:
    return np.repeat(night_ir(_gray(rgb), seed)[:, :, None], 3, axis=2)


def low_light(rgb: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = 0.35 * (rgb.astype(np.float32) / 255.0) ** 1.3
    x = x * 255 + rng.normal(0, 9.0, rgb.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def jpeg_lowres(rgb: np.ndarray, seed: int) -> np.ndarray:
    small = camera_size(rgb, 160)
    buf = io.BytesIO()
    Image.fromarray(small).save(buf, "JPEG", quality=15)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def overhead(rgb: np.ndarray, seed: int) -> np.ndarray:
    img = Image.fromarray(rgb).rotate(50, resample=Image.BILINEAR, expand=True, fillcolor=(40, 40, 40))
    w, h = img.size
    return np.asarray(img.resize((w, max(1, int(h * 0.8))), Image.BILINEAR))


PROFILES: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "day": day, "night_ir": night, "low_light": low_light, "jpeg_lowres": jpeg_lowres, "overhead": overhead,
}


def render(rgb: np.ndarray, profile: str, seed: int) -> np.ndarray:
    """The frame camera ``profile`` sends for photo ``rgb`` (already decoded)."""
    return PROFILES[profile](camera_size(rgb), seed)


# ------------------------------------------------------------------ the demo's cameras
DEMO_PROFILES = ("day", "night_ir", "low_light", "overhead", "jpeg_lowres")


@dataclass(frozen=True)
class Camera:
    """One simulated camera: its baby's class mix, its scene, the frames it streams and its own
    held-out frames (later frames of the same kind: other photos, the same mix and profile)."""

    name: str
    profile: str
    mix: tuple[float, ...]
    stream: list[tuple[Path, int]]
    test: list[tuple[Path, int]]


def class_mix(alpha: float, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """One baby's class mix: Dirichlet(``alpha``) over the classes; ``alpha`` <= 0, the uniform mix."""
    return np.full(n_classes, 1.0 / n_classes) if alpha <= 0 else rng.dirichlet(np.full(n_classes, alpha))


def draw(items: list[tuple[Path, int]], mix: np.ndarray, n: int, rng: np.random.Generator) -> list[tuple[Path, int]]:
    """``n`` frames from ``items`` (with repeats: one baby is filmed many times) whose classes follow ``mix``."""
    by_class = [[it for it in items if it[1] == c] for c in range(len(mix))]
    m = np.array([mix[c] if by_class[c] else 0.0 for c in range(len(mix))])
    classes = rng.choice(len(mix), size=n, p=m / m.sum())
    return [by_class[c][int(rng.integers(len(by_class[c])))] for c in classes]


def plan_cameras(shards: list[list[tuple[Path, int]]], test: list[tuple[Path, int]], n_classes: int, alpha: float,
                 seed: int, frames_per_photo: int = 2, test_frames: int = 60) -> list[Camera]:
    """One camera per shard: a Dirichlet(``alpha``) class mix (0: the uniform mix), a profile in turn
    from ``DEMO_PROFILES``; its stream drawn from its own shard, its held-out frames from ``test``."""
    cams = []
    for i, shard in enumerate(shards):
        rng = np.random.default_rng([seed, i])
        mix = class_mix(alpha, n_classes, rng)
        cams.append(Camera(f"camera-{i + 1}", DEMO_PROFILES[i % len(DEMO_PROFILES)], tuple(float(v) for v in mix),
                           draw(shard, mix, frames_per_photo * len(shard), rng), draw(test, mix, test_frames, rng)))
    return cams


def frame(path: str | Path, profile: str, seed: int) -> np.ndarray:
    """The frame a camera with ``profile`` sends for the photo at ``path`` (``ImageError`` when unreadable)."""
    from infantino.edge_runtime.core.preprocess import decode_rgb

    return render(decode_rgb(path), profile, seed)
