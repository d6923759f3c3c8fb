"""``infantino-export data import``: our data layout (README "Data") from a checkout of the public
InfantinO repository, for a machine that has no ``../shared/data``.

The InfantinO repository keeps
  ``modeling/src/data/online_raw/<class>/*``  the infant photos, one folder per expression;
  ``modeling/src/data/processed/train/A_<i>.npy``  FER2013 training faces, int (3, 48, 48), the
      grey face stacked three times (its ``modeling/explore.ipynb`` wrote them from train.csv);
  ``modeling/src/data/processed/train_lb.npy``  the labels, ``train_df['emotion']``: int, FER order,
      index ``i`` for ``A_<i>.npy``.
We write ``OUT/fer2013/fer2013_train.npz`` (``images`` uint8 N x 48 x 48, ``labels`` int64,
``classes``) and ``OUT/infant/<class>/<file>``. Duplicates (the same bytes, or the same face
pixels, under the same label) are kept once; the same bytes under two labels stay in both, as
real label ambiguity (the shared data keeps three such photos on purpose). Anything that does
not match the layout is refused with one line naming the file, before anything is written.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infantino.edge_runtime.core.preprocess import CLASSES

PHOTOS = ("modeling", "src", "data", "online_raw")
FACES = ("modeling", "src", "data", "processed", "train")
LABELS = ("modeling", "src", "data", "processed", "train_lb.npy")
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
FACE_NAME = re.compile(r"A_(\d+)\.npy")
FACE_SIDE = 48


class ImportRefused(ValueError):
    """The checkout does not have the InfantinO layout; the message names what and where."""


@dataclass
class ImportReport:
    faces: int = 0
    face_duplicates: int = 0
    photos: dict[str, int] = field(default_factory=dict)
    photo_duplicates: int = 0

    def line(self, out: Path) -> str:
        per_class = ", ".join(f"{c} {n}" for c, n in self.photos.items())
        return (f"wrote {self.faces} FER faces ({self.face_duplicates} duplicates dropped) and "
                f"{sum(self.photos.values())} infant photos ({per_class}; {self.photo_duplicates} duplicates dropped) to {out}")


def import_infantino(checkout: str | os.PathLike, out: str | os.PathLike) -> ImportReport:
    """Convert ``checkout`` into ``out``; refuses (``ImportRefused``) before writing when anything is off."""
    checkout, out = Path(checkout), Path(out)
    if not checkout.is_dir():
        raise ImportRefused(f"{checkout}: not a folder (give a checkout of the InfantinO repository)")
    fer_target, infant_target = out / "fer2013" / "fer2013_train.npz", out / "infant"
    for target in (fer_target, infant_target):
        if target.exists():
            raise ImportRefused(f"{target} exists already; remove it or give another --out")
    report = ImportReport()
    images, labels = read_faces(checkout, report)
    photos = read_photos(checkout, report)
    _write_faces(fer_target, images, labels)
    _write_photos(infant_target, photos)
    return report


def _load_npy(path: Path) -> np.ndarray:
    """One ``.npy`` file, no pickles; anything else is refused in one line naming the file."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ImportRefused(f"{path}: not a numpy array file ({str(exc).splitlines()[0]})") from None


def read_labels(path: Path) -> np.ndarray:
    """``train_lb.npy`` as int64 class indices: integer labels, or one-hot rows (both seen in copies of FER)."""
    raw = _load_npy(path)
    if raw.ndim == 2 and raw.shape[1] == len(CLASSES) and np.isin(raw, (0, 1)).all() and (raw.sum(axis=1) == 1).all():
        return raw.argmax(axis=1).astype(np.int64)
    if raw.ndim != 1 or raw.dtype.kind not in "iuf" or (raw.dtype.kind == "f" and not np.all(np.mod(raw, 1) == 0)):
        raise ImportRefused(f"{path}: labels must be integers 0-{len(CLASSES) - 1} (N,) or one-hot (N, {len(CLASSES)}), "
                            f"not {raw.dtype} {raw.shape}")
    labels = raw.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ImportRefused(f"{path}: label {int(labels.min() if labels.min() < 0 else labels.max())} is outside 0-{len(CLASSES) - 1}")
    return labels


def read_face(path: Path) -> np.ndarray:
    """One ``A_<i>.npy``: (3, 48, 48) or (48, 48), whole numbers 0-255, as uint8 48 x 48 grey."""
    raw = _load_npy(path)
    if raw.shape not in ((3, FACE_SIDE, FACE_SIDE), (FACE_SIDE, FACE_SIDE)) or raw.dtype.kind not in "iuf":
        raise ImportRefused(f"{path}: a face must be a (3, 48, 48) or (48, 48) number array, not {raw.dtype} {raw.shape}")
    if raw.min() < 0 or raw.max() > 255 or (raw.dtype.kind == "f" and not np.all(np.mod(raw, 1) == 0)):
        raise ImportRefused(f"{path}: face pixels must be whole numbers 0-255")
    grey = raw if raw.ndim == 2 else raw[0]
    if raw.ndim == 3 and not (raw == raw[:1]).all():  # not the stacked grey face: convert as Pillow's "L" does
        grey = np.rint(0.299 * raw[0] + 0.587 * raw[1] + 0.114 * raw[2])
    return grey.astype(np.uint8)


def read_faces(checkout: Path, report: ImportReport) -> tuple[np.ndarray, np.ndarray]:
    folder, label_path = checkout.joinpath(*FACES), checkout.joinpath(*LABELS)
    if not folder.is_dir():
        raise ImportRefused(f"{checkout}: no {'/'.join(FACES)}/ (the FER faces A_<i>.npy); is this an InfantinO checkout?")
    if not label_path.is_file():
        raise ImportRefused(f"{checkout}: no {'/'.join(LABELS)} (the labels of the A_<i>.npy faces)")
    labels = read_labels(label_path)
    indexed = []
    for path in folder.iterdir():
        if path.name.startswith("."):
            continue
        match = FACE_NAME.fullmatch(path.name)
        if match is None:
            raise ImportRefused(f"{path}: unexpected file among the faces (only A_<i>.npy)")
        i = int(match.group(1))
        if i >= len(labels):
            raise ImportRefused(f"{path}: index {i} has no label ({label_path.name} holds {len(labels)})")
        indexed.append((i, path))
    if not indexed:
        raise ImportRefused(f"{folder}: no A_<i>.npy faces")
    seen: set[tuple[bytes, int]] = set()
    images, kept = [], []
    for i, path in sorted(indexed):
        face = read_face(path)
        key = (hashlib.sha256(face.tobytes()).digest(), int(labels[i]))
        if key in seen:
            report.face_duplicates += 1
            continue
        seen.add(key)
        images.append(face)
        kept.append(labels[i])
    report.faces = len(images)
    return np.stack(images), np.asarray(kept, dtype=np.int64)


def read_photos(checkout: Path, report: ImportReport) -> dict[str, list[Path]]:
    """The photos per class, each decodable, duplicates within a class dropped."""
    from PIL import Image, UnidentifiedImageError

    root = checkout.joinpath(*PHOTOS)
    if not root.is_dir():
        raise ImportRefused(f"{checkout}: no {'/'.join(PHOTOS)}/ (the infant photos, one folder per class)")
    photos: dict[str, list[Path]] = {}
    for folder in sorted(root.iterdir()):
        if folder.name.startswith("."):
            continue
        if not folder.is_dir() or folder.name not in CLASSES:
            raise ImportRefused(f"{folder}: not a class folder (expected one of {', '.join(CLASSES)})")
        seen: set[str] = set()
        kept = []
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            if not path.is_file() or path.suffix.lower() not in PHOTO_SUFFIXES:
                raise ImportRefused(f"{path}: not a photo ({', '.join(sorted(PHOTO_SUFFIXES))})")
            try:
                with Image.open(path) as im:
                    im.verify()
            except (OSError, UnidentifiedImageError, SyntaxError) as exc:
                raise ImportRefused(f"{path}: not a readable image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in seen:
                report.photo_duplicates += 1
                continue
            seen.add(digest)
            kept.append(path)
        photos[folder.name] = kept
    if not any(photos.values()):
        raise ImportRefused(f"{root}: no photos in any class folder")
    report.photos = {c: len(photos[c]) for c in CLASSES if c in photos}
    return photos


def _write_faces(target: Path, images: np.ndarray, labels: np.ndarray) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fer2013_train.", suffix=".npz", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, images=images, labels=labels, classes=np.array(CLASSES))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_photos(target: Path, photos: dict[str, list[Path]]) -> None:
    """Through a temp folder and a rename: a half-written infant/ is never left behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".infant.", dir=target.parent))
    try:
        for label, paths in photos.items():
            (tmp / label).mkdir()
            for path in paths:
                shutil.copyfile(path, tmp / label / path.name)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
