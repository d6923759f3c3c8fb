"""Decoding, face crop and normalisation: the one preprocessing path of device and training."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import require_data
from infantino.edge_runtime.core import preprocess as pp
from infantino.edge_runtime.core.facefinder import prepare
from infantino.edge_runtime.core.preprocess import DEFAULT_SPEC, ImageError, crop_face, decode_gray, normalize, resize_face


def _gradient(w: int = 80, h: int = 60) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float32)
    y = np.linspace(0, 255, h, dtype=np.float32)
    r = np.broadcast_to(x[None, :], (h, w))
    g = np.broadcast_to(y[:, None], (h, w))
    b = np.full((h, w), 128, np.float32)
    return np.stack([r, g, b], -1).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("WEBP", "RGB"), ("BMP", "RGB")])
def test_decodes_common_formats_to_gray(fmt, mode):
    img = Image.fromarray(_gradient()).convert(mode)
    gray = decode_gray(_encode(img, fmt))
    assert gray.dtype == np.uint8 and gray.shape == (60, 80)
    expected = np.asarray(Image.fromarray(_gradient()).convert("L"), dtype=np.int16)
    tolerance = 12 if fmt in ("JPEG", "WEBP") else 1
    assert np.abs(gray.astype(np.int16) - expected).mean() < tolerance


def test_alpha_is_composited_on_white():
    rgba = np.zeros((10, 10, 4), np.uint8)  # fully transparent black
    gray = decode_gray(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert np.all(gray == 255)


def test_exif_orientation_is_applied():
    img = Image.fromarray(_gradient(80, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    gray = decode_gray(_encode(img, "JPEG", exif=exif.tobytes()))
    assert gray.shape == (80, 60)


def test_paths_pil_images_and_arrays_agree(tmp_path):
    rgb = _gradient()
    path = tmp_path / "frame.png"
    Image.fromarray(rgb).save(path)
    from_path = decode_gray(path)
    np.testing.assert_array_equal(from_path, decode_gray(Image.fromarray(rgb)))
    np.testing.assert_array_equal(from_path, decode_gray(rgb))
    np.testing.assert_array_equal(decode_gray(rgb.astype(np.float32) / 255.0), from_path)


def test_truncated_file_is_a_one_line_error():
    data = _encode(Image.fromarray(_gradient(200, 200)), "JPEG")
    with pytest.raises(ImageError, match="corrupt, truncated") as err:
        decode_gray(data[: len(data) // 2])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("payload", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_garbage_bytes_are_refused(payload):
    with pytest.raises(ImageError, match="not a readable image"):
        decode_gray(payload)


def test_decompression_bomb_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(pp, "MAX_PIXELS", 100 * 100)
    big = _encode(Image.new("L", (200, 200)), "PNG")
    with pytest.raises(ImageError, match="pixel limit"):
        decode_gray(big)


def test_huge_file_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(pp, "MAX_BYTES", 1000)
    path = tmp_path / "big.png"
    path.write_bytes(b"\0" * 5000)
    with pytest.raises(ImageError, match="byte limit"):
        decode_gray(path)


def test_missing_file_and_bad_arrays():
    with pytest.raises(ImageError, match="no such image"):
        decode_gray("/nonexistent/x.jpg")
    with pytest.raises(ImageError, match=r"shape \(4, 4, 7\) is not"):
        decode_gray(np.zeros((4, 4, 7), np.uint8))
    with pytest.raises(ImageError, match="non-finite"):
        decode_gray(np.full((4, 4), np.nan, np.float32))


def test_no_face_falls_back_to_centre_square_and_says_so():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (120, 200), dtype=np.uint8)
    face = crop_face(noise)
    assert not face.face_found
    assert face.box == (40, 0, 120, 120)
    assert face.pixels.shape == (120, 120)


def test_square_box_grows_by_margin_and_stays_inside():
    assert pp.square_box((10, 10, 20, 20), 0.25, 100, 100) == (5, 5, 30, 30)
    x, y, w, h = pp.square_box((90, 90, 20, 20), 0.5, 100, 100)
    assert x + w <= 100 and y + h <= 100 and w == h == 40


def test_real_infant_photo_finds_a_face():
    folder = require_data("infant", "happy")
    found = 0
    for path in sorted(folder.iterdir())[:10]:
        p = prepare(path)
        assert p.tensor.shape == (1, 1, 64, 64) and p.tensor.dtype == np.float32
        found += p.face_found
    assert found >= 5


def test_prepare_tensor_matches_manual_pipeline():
    rgb = _gradient(64, 48)
    p = prepare(rgb, detect=False)
    manual = normalize(resize_face(decode_gray(rgb)))[None]
    np.testing.assert_array_equal(p.tensor, manual)
    assert p.tensor.min() >= (0 - DEFAULT_SPEC.mean) / DEFAULT_SPEC.std - 1e-6


def test_training_and_device_paths_agree_bit_for_bit():
    """FER faces as training loads them == the device's prepare() of the same face."""
    torch = pytest.importorskip("torch")
    from infantino.export.augment import normalize_torch, to_unit
    from infantino.export.data import load_fer

    fer = load_fer(require_data("fer2013", "fer2013_train.npz"), limit=32)
    with np.load(require_data("fer2013", "fer2013_train.npz")) as data:
        raw = data["images"][:32]
    device = np.concatenate([prepare(img, detect=False).tensor for img in raw])
    training_eval = normalize(fer.pixels)
    np.testing.assert_array_equal(device, training_eval)
    training_aug_path = normalize_torch(to_unit(torch.from_numpy(fer.pixels))).numpy()
    np.testing.assert_allclose(training_aug_path, device, atol=1e-6)


# --------------------------------------------------------------------------- deep, float and huge images (issue 14)


def _ramp(w: int = 64, h: int = 48) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))


def test_a_16_bit_png_decodes_to_its_gray_levels_not_a_white_frame():
    eight = _ramp()
    sixteen = Image.fromarray(eight.astype(np.uint16) * 257)  # the same picture at 16 bits
    assert sixteen.mode == "I;16"
    np.testing.assert_array_equal(decode_gray(_encode(sixteen, "PNG")), eight)
    np.testing.assert_array_equal(pp.decode_rgb(_encode(sixteen, "PNG"))[:, :, 0], eight)
    np.testing.assert_array_equal(decode_gray(eight.astype(np.uint16) * 257), eight)  # a 16-bit camera array too


def test_a_float_tiff_is_scaled_by_its_range_not_a_black_frame():
    eight = _ramp()
    unit = Image.fromarray(eight.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(decode_gray(_encode(unit, "TIFF")), eight)
    wide = decode_gray(_encode(Image.fromarray(eight.astype(np.float32) * 40.0 - 3000.0), "TIFF"))  # any other range
    assert wide.min() == 0 and wide.max() == 255 and np.abs(wide.astype(int) - eight).max() <= 1
    with pytest.raises(ImageError, match="non-finite"):
        decode_gray(_encode(Image.fromarray(np.full((8, 8), np.nan, np.float32)), "TIFF"))


def test_a_large_jpeg_is_decoded_reduced_to_what_detection_and_cropping_need():
    small = _gradient(700, 700)
    big = Image.fromarray(small).resize((7000, 7000), Image.BILINEAR)
    data = _encode(big, "JPEG", quality=40)
    gray = decode_gray(data)
    rgb = pp.decode_rgb(data)
    assert gray.shape == rgb.shape[:2] == (1750, 1750)  # 1/4: the longer side keeps >= DECODE_SIDE
    assert pp.DECODE_SIDE <= max(gray.shape) < 2 * pp.DECODE_SIDE
    expected = np.asarray(big.convert("L").resize((1750, 1750), Image.BILINEAR), dtype=np.int16)
    assert np.abs(gray.astype(np.int16) - expected).mean() < 3
    small_jpeg = _encode(Image.fromarray(_gradient(640, 480)), "JPEG")  # camera frames are decoded as before
    assert decode_gray(small_jpeg).shape == (480, 640)


def test_the_pixel_limit_follows_the_memory_budget():
    assert pp.MAX_PIXELS == pp.DECODE_MEMORY // pp.DECODE_BYTES_PER_PIXEL < 5_000_000
    with pytest.raises(ImageError, match=r"over the \d+ pixel limit \(a 48 MB decode budget\)"):
        decode_gray(_encode(Image.new("RGB", (2400, 2400), (9, 99, 199)), "PNG"))
    assert pp.draft_scale(2559, 1919) == 2  # a JPEG over the limit is reduced until it fits
    assert max(decode_gray(_encode(Image.new("RGB", (2559, 1919), (9, 99, 199)), "JPEG")).shape) == 1280


RSS_PROBE = """
import sys
from infantino.edge_runtime.core import preprocess

def peak_kb():  # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's over exec)
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1])

data = open(sys.argv[1], "rb").read()
base = peak_kb()
getattr(preprocess, sys.argv[2])(data)
print((peak_kb() - base) / 1024)
"""


@pytest.mark.parametrize("decode", ["decode_gray", "decode_rgb"])
def test_decoding_a_7000_px_jpeg_stays_inside_the_decode_budget(tmp_path, decode):
    import subprocess
    import sys

    from conftest import REPO

    path = tmp_path / "big.jpg"
    Image.new("RGB", (7000, 7000), (120, 130, 140)).save(path, quality=30)  # 0.8 MB on disk, 49 MP
    run = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path), decode], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    peak_mb = float(run.stdout.split()[-1])
    assert peak_mb < pp.DECODE_MEMORY / 2**20, peak_mb  # before: ~380 MB
