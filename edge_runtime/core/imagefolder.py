"""ImageFolder trees (one sub-folder per class): listing and seeded, leak-free splits.

The infant set holds the same photo under two labels in places; a split keeps every copy
of the same bytes on one side, so a test photo never also sits in the training stream.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .preprocess import CLASSES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_image_folder(root: str | Path) -> list[tuple[Path, int]]:
    """(path, class index) pairs of an ImageFolder tree whose sub-folders are class names."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist")
    items = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name not in CLASSES:
            raise ValueError(f"{sub}: folder name is not one of {', '.join(CLASSES)}")
        label = CLASSES.index(sub.name)
        items += [(f, label) for f in sorted(sub.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise ValueError(f"{root}: no images in class sub-folders")
    return items


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_items(items: list[tuple[Path, int]], fractions: dict[str, float], seed: int) -> dict[str, list[tuple[Path, int]]]:
    """Assign items to named parts by fraction, stratified by label, duplicates kept together.

    Groups of identical files go to one part; a group is stratified by its first label.
    """
    groups: dict[str, list[tuple[Path, int]]] = {}
    for path, label in items:
        groups.setdefault(_digest(path), []).append((path, label))
    by_label: dict[int, list[list[tuple[Path, int]]]] = {}
    for key in sorted(groups):
        members = groups[key]
        by_label.setdefault(members[0][1], []).append(members)
    rng = np.random.default_rng(seed)
    names = list(fractions)
    cuts = np.cumsum([fractions[n] for n in names])
    parts: dict[str, list[tuple[Path, int]]] = {n: [] for n in names}
    for label in sorted(by_label):
        bucket = by_label[label]
        order = rng.permutation(len(bucket))
        bounds = np.round(cuts / cuts[-1] * len(bucket)).astype(int)
        start = 0
        for name, stop in zip(names, bounds):
            for i in order[start:stop]:
                parts[name].extend(bucket[i])
            start = stop
    return parts


def write_split(parts: dict[str, list[tuple[Path, int]]], out: str | Path) -> dict[str, Path]:
    """Materialise each part as an ImageFolder tree of symbolic links under ``out/<part>``."""
    out = Path(out)
    roots = {}
    for name, members in parts.items():
        root = out / name
        for path, label in members:
            dest = root / CLASSES[label] / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            os.symlink(path.resolve(), dest)
        roots[name] = root
    return roots


def split_image_folder(root: str | Path, out: str | Path, fractions: dict[str, float], seed: int = 0) -> dict[str, Path]:
    return write_split(split_items(list_image_folder(root), fractions, seed), out)
