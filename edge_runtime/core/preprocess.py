"""Image preprocessing shared by training and the device.

This module is the single definition of what the extractor sees: decode any image a
user hands us, find the face, resize and normalise it. ``export`` imports it for
training, so a face on the camera goes through exactly the numbers the model was
trained on. It depends on numpy, Pillow and (for face detection only) OpenCV.
"""
from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .classes import CLASSES  # noqa: F401  (preprocess.CLASSES, as everybody imports it)
from .haar import HAAR_MAX_SIDE, detect_faces

# Memory. A device runs in 150 MB RSS, ~100 MB of it the running device (ONNX Runtime, the
# package, the detector), so one decode may use DECODE_MEMORY. Decoding peaks at about
# DECODE_BYTES_PER_PIXEL bytes per decoded pixel (Pillow's 4-byte RGB(A) buffer, alpha
# compositing, the gray and numpy copies; measured up to 11 for RGBA PNG), which sets MAX_PIXELS
# (4.6 MP):
# a larger file is refused before its pixels are decoded (decompression bomb). A JPEG is
# decoded reduced first (Pillow's ``draft``: the DCT scales 1/2, 1/4, 1/8) to the smallest
# size whose longer side keeps DECODE_SIDE px; detection looks at <= 320 px and a face crop
# ends at 64 px, so nothing a detector can find is lost (a face Haar finds is >= 6 % of the
# frame: >= 77 px at 1280).
DEVICE_MEMORY = 150 * 2**20
DECODE_MEMORY = 48 * 2**20
DECODE_BYTES_PER_PIXEL = 11
MAX_PIXELS = DECODE_MEMORY // DECODE_BYTES_PER_PIXEL
MAX_ARRAY_PIXELS = 50_000_000  # a camera frame handed over as an array is in memory already: only absurd sizes are refused
DECODE_SIDE = 1280
MAX_BYTES = 64 * 1024 * 1024
# A face crop with less contrast than this (std of its gray levels) is blank: a covered lens, a
# flat frame, a misdecoded file. Real crops: infant photos >= 19, FER faces >= 9 (bar 11 blank ones).
MIN_CROP_STD = 3.0
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


class ImageError(ValueError):
    """An image that cannot be used; the message is one line, fit for a user."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How a face crop becomes the extractor's input tensor; written into the manifest."""

    size: tuple[int, int] = (64, 64)
    channels: int = 1
    mean: float = 0.5
    std: float = 0.25
    layout: str = "NCHW"
    pixel_scale: str = "uint8/255"
    resize: str = "pillow-bilinear"
    color: str = "grayscale-ITU-R-601-2 (Pillow 'L'); alpha composited on white"
    face_margin: float = 0.25
    face_detector: str = "opencv-haar-frontalface-default"  # or "blazeface-short_range" / "blazeface-full_range"
    detect_max_side: int = HAAR_MAX_SIDE  # Haar runs on a copy this size (BlazeFace has its own input size)
    detect_coarse_side: int = 0  # Haar looks at a copy this size first (0: one pass at detect_max_side)
    fallback: str = "centre-square"  # "opencv-haar,centre-square": Haar when BlazeFace finds nothing
    detector_score: float = 0.5  # BlazeFace score threshold
    align_eyes: bool = False  # rotate so the eyes are level before the square crop (BlazeFace keypoints)
    flip_average: bool = False  # embed the crop and its mirror in one call and average the embeddings

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "size" in kwargs:
            kwargs["size"] = tuple(int(v) for v in kwargs["size"])
        return cls(**kwargs)


DEFAULT_SPEC = PreprocessSpec()


@dataclass
class FaceCrop:
    """A grayscale face crop and where it came from."""

    pixels: np.ndarray  # uint8, (H, W)
    face_found: bool
    box: tuple[int, int, int, int] = field(default=(0, 0, 0, 0))  # x, y, w, h in the frame
    angle: float = 0.0  # degrees the crop was turned to level the eyes
    score: float | None = None  # detector confidence, when the detector gives one


# --------------------------------------------------------------------------- decoding


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite transparency on white: one RGB buffer pasted through the alpha (the same pixels as
    ``Image.alpha_composite``, 55 instead of 79 MB for 5 MP)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img if img.mode in ("RGBA", "LA") else img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba)
        return background
    return img


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > MAX_BYTES:
            raise ImageError(f"image is {len(data)} bytes, over the {MAX_BYTES} byte limit")
        return Image.open(io.BytesIO(data))
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"no such image file: {path}")
    if path.stat().st_size > MAX_BYTES:
        raise ImageError(f"{path.name}: file is over the {MAX_BYTES} byte limit")
    return Image.open(io.BytesIO(path.read_bytes()))


def draft_scale(width: int, height: int) -> int:
    """The JPEG DCT reduction (1, 2, 4 or 8) to decode at: the longer side keeps ``DECODE_SIDE``
    px, and more reduction when the frame would still exceed ``MAX_PIXELS``."""
    scale = 1
    while scale < 8 and max(width, height) // (scale * 2) >= DECODE_SIDE:
        scale *= 2
    while scale < 8 and -(-width // scale) * -(-height // scale) > MAX_PIXELS:
        scale *= 2
    return scale


def _reduce_jpeg(img: Image.Image, mode: str) -> None:
    """Decode a large JPEG reduced (and straight to gray for ``mode`` "L"): 7000x7000 peaks at
    ~30 MB instead of ~400 MB. Small JPEGs and other formats are left as they are."""
    if img.format != "JPEG":
        return
    w, h = img.size
    scale = draft_scale(w, h)
    if scale > 1:
        img.draft(mode, (w // scale, h // scale))


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Pixels of any depth as uint8 gray levels, without clipping them to white or black.

    uint8 as is; 16-bit by its depth (the high byte); float in [0, 1] x 255; other values in [0, 255]
    as is; anything else (wider ints, floats of other ranges) stretched by its own range.
    """
    if a.dtype == np.uint8:
        return a
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating) or not np.all(np.isfinite(a)):
        raise ImageError("frame holds non-finite or non-numeric values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if a.dtype == np.uint16 or (np.issubdtype(a.dtype, np.integer) and lo >= 0 and 255 < hi <= 65535):
        return np.right_shift(a.astype(np.uint16, copy=False), 8).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating) and lo >= 0 and hi <= 1.0:
        return np.clip(a * 255.0, 0, 255).round().astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.asarray(a).round().astype(np.uint8)
    span = hi - lo
    return np.zeros(a.shape, np.uint8) if span <= 0 else ((a.astype(np.float64) - lo) * (255.0 / span)).round().astype(np.uint8)


_DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit and float images as 8-bit gray (Pillow's own ``convert("L")`` clips them to 0/255:
    a 16-bit PNG became a white frame, a float TIFF a black one)."""
    if img.mode not in _DEEP_MODES:
        return img
    return Image.fromarray(_to_uint8(np.asarray(img)), "L")


def _decode_pil(source: ImageSource, mode: str = "L") -> Image.Image:
    """Open and fully decode one image for ``mode`` ("L" or "RGB"): reduced when it is a large
    JPEG, 8-bit, upright (EXIF) and with alpha composited on white.

    Refuses truncated files and decompression bombs with an ``ImageError`` instead of a
    traceback; both ``decode_gray`` and ``decode_rgb`` go through here.
    """
    name = Path(source).name if isinstance(source, (str, os.PathLike)) else "image"
    try:
        img = _open(source)
        _reduce_jpeg(img, mode)
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImageError(f"{name}: {w}x{h} pixels is over the {MAX_PIXELS} pixel limit (a {DECODE_MEMORY >> 20} MB decode budget)")
        if w < 1 or h < 1:
            raise ImageError(f"{name}: empty image")
        img.load()
        img = _eight_bit(ImageOps.exif_transpose(img))
        return _flatten_alpha(img)
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: not a readable image ({exc.__class__.__name__})") from exc
    except (OSError, SyntaxError, ValueError, TypeError) as exc:
        raise ImageError(f"{name}: corrupt, truncated or unsupported image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc


def decode_gray(source: ImageSource) -> np.ndarray:
    """Decode a path, bytes, PIL image or array into a uint8 grayscale (H, W) array."""
    if isinstance(source, np.ndarray):
        return array_to_gray(source)
    return np.asarray(_decode_pil(source, "L").convert("L"), dtype=np.uint8)


def decode_rgb(source: ImageSource) -> np.ndarray:
    """Decode into uint8 RGB (H, W, 3): what the face detector sees (colour finds more faces:
    99.6 % against 96.5 % of the infant photos in grayscale, BlazeFace short range)."""
    if isinstance(source, np.ndarray):
        a = np.asarray(source)
        if a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8:
            return np.ascontiguousarray(a)
        return np.repeat(array_to_gray(a)[:, :, None], 3, axis=2)
    return np.asarray(_decode_pil(source, "RGB").convert("RGB"), dtype=np.uint8)


def contrast_of(pixels: np.ndarray) -> float:
    """Standard deviation of a crop's gray levels."""
    return float(np.asarray(pixels, np.float32).std()) if np.size(pixels) else 0.0


def has_contrast(pixels: np.ndarray) -> bool:
    """Whether a crop could be a face at all (``MIN_CROP_STD``): blank frames are neither queued nor learned."""
    return contrast_of(pixels) >= MIN_CROP_STD


def require_contrast(pixels: np.ndarray, what: str = "face crop") -> None:
    """Refuse a blank or near-constant crop (``MIN_CROP_STD``): learning from it teaches the
    head that a flat frame is an expression, and a consented upload would share it."""
    std = contrast_of(pixels)
    if std < MIN_CROP_STD:
        raise ImageError(f"the {what} is blank or nearly uniform (contrast {std:.1f} < {MIN_CROP_STD:g} gray levels): nothing learned")


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, exactly as Pillow's ``convert("L")`` computes it."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("L"), dtype=np.uint8)


def array_to_gray(frame: np.ndarray) -> np.ndarray:
    """A camera frame (H, W), (H, W, 3) RGB or (H, W, 4) RGBA: uint8, 16-bit, or float in
    [0, 1] (other ranges are scaled by their own, see ``_to_uint8``)."""
    a = np.asarray(frame)
    if a.ndim not in (2, 3) or a.size == 0 or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise ImageError(f"frame of shape {a.shape} is not (H, W), (H, W, 3) or (H, W, 4)")
    if a.shape[0] * a.shape[1] > MAX_ARRAY_PIXELS:
        raise ImageError(f"frame of {a.shape[1]}x{a.shape[0]} pixels is over the pixel limit")
    a = _to_uint8(a)
    if a.ndim == 2:
        return np.ascontiguousarray(a)
    if a.shape[2] == 1:
        return np.ascontiguousarray(a[:, :, 0])
    mode = "RGB" if a.shape[2] == 3 else "RGBA"
    img = _flatten_alpha(Image.fromarray(np.ascontiguousarray(a), mode))
    return np.asarray(img.convert("L"), dtype=np.uint8)


# --------------------------------------------------------------------------- face crop

def square_box(box: tuple[int, int, int, int], margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Grow a box by ``margin`` on each side into a square, clipped to the frame."""
    x, y, w, h = box
    side = int(round(max(w, h) * (1.0 + 2.0 * margin)))
    side = max(1, min(side, width, height))
    cx, cy = x + w / 2.0, y + h / 2.0
    x0 = int(round(min(max(cx - side / 2.0, 0), width - side)))
    y0 = int(round(min(max(cy - side / 2.0, 0), height - side)))
    return x0, y0, side, side


def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def crop_face(gray: np.ndarray, spec: PreprocessSpec = DEFAULT_SPEC, detect: bool = True) -> FaceCrop:
    """The largest face with a margin, or the centre square when no face is found.

    ``detect=False`` is for inputs that are already face crops (FER): the whole image
    is used and ``face_found`` is True.
    """
    h, w = gray.shape
    if not detect:
        return FaceCrop(gray, True, (0, 0, w, h))
    boxes = detect_faces(gray, spec.detect_max_side)
    if boxes:
        x, y, s, _ = square_box(boxes[0], spec.face_margin, w, h)
        return FaceCrop(gray[y : y + s, x : x + s], True, (x, y, s, s))
    x, y, s, _ = centre_square(w, h)
    return FaceCrop(gray[y : y + s, x : x + s], False, (x, y, s, s))


# --------------------------------------------------------------------------- tensors


def resize_face(crop: np.ndarray, spec: PreprocessSpec = DEFAULT_SPEC) -> np.ndarray:
    """uint8 (H, W) crop -> uint8 spec.size, Pillow bilinear (antialiased when shrinking)."""
    th, tw = spec.size
    if crop.shape == (th, tw):
        return np.ascontiguousarray(crop, dtype=np.uint8)
    img = Image.fromarray(np.ascontiguousarray(crop, dtype=np.uint8), "L")
    return np.asarray(img.resize((tw, th), Image.BILINEAR), dtype=np.uint8)


def normalize(pixels: np.ndarray, spec: PreprocessSpec = DEFAULT_SPEC) -> np.ndarray:
    """uint8 (..., H, W) -> float32 (..., 1, H, W): x / 255, minus mean, over std."""
    x = np.asarray(pixels, dtype=np.float32) * np.float32(1.0 / 255.0)
    x = (x - np.float32(spec.mean)) / np.float32(spec.std)
    return np.expand_dims(x, axis=-3)


def face_tensor(crop: np.ndarray, spec: PreprocessSpec = DEFAULT_SPEC) -> np.ndarray:
    """One grayscale crop -> float32 (1, C, H, W), the extractor's input for one face."""
    return normalize(resize_face(crop, spec), spec)[None]


def faces_tensor(crops: list[np.ndarray] | np.ndarray, spec: PreprocessSpec = DEFAULT_SPEC) -> np.ndarray:
    """Many grayscale crops -> float32 (N, C, H, W)."""
    resized = np.stack([resize_face(c, spec) for c in crops]) if len(crops) else np.zeros((0, *spec.size), np.uint8)
    return normalize(resized, spec)


@dataclass
class Prepared:
    """An image ready for the extractor, with the crop kept for the annotation queue."""

    tensor: np.ndarray  # float32 (1, C, H, W)
    crop: np.ndarray  # uint8 resized face crop (H, W)
    face_found: bool
    box: tuple[int, int, int, int]
