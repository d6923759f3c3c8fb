"""The demo's photos: a seeded held-out part and one disjoint shard per device."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.imagefolder import list_image_folder, split_items

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "infant"


def find_images(arg: str | None) -> Path:
    """``--images``, else ../shared/data/infant next to the repository or the working folder."""
    candidates = [Path(arg)] if arg else [DEFAULT_IMAGES, Path.cwd().parent / "shared" / "data" / "infant"]
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"no image folder at {' or '.join(map(str, candidates))}: pass --images DIR "
                            "(an ImageFolder tree: one sub-folder per expression)")


def plan_split(root: Path, devices: int, seed: int, test_fraction: float = 0.25,
               limit: int | None = None) -> tuple[list[list[tuple[Path, int]]], list[tuple[Path, int]]]:
    """(shards, test): duplicates stay on one side (``split_items``); shards are disjoint and
    each gets a mix of classes, in a seeded order."""
    items = list_image_folder(root)
    if limit is not None:
        rng = np.random.default_rng(seed)
        items = [items[i] for i in sorted(rng.choice(len(items), size=min(limit, len(items)), replace=False))]
    parts = split_items(items, {"stream": 1 - test_fraction, "test": test_fraction}, seed)
    stream = parts["stream"]
    order = np.random.default_rng(seed + 1).permutation(len(stream))
    shards = [[stream[j] for j in order[i::devices]] for i in range(devices)]
    if min(len(s) for s in shards) == 0 or not parts["test"]:
        raise ValueError(f"{len(items)} photos are too few for {devices} devices and a held-out part")
    return shards, parts["test"]


def trained_on_held_out(package: Path, test: list[tuple[Path, int]]) -> int:
    """How many held-out photos (by content) sit in the image folders the package's manifest says
    it was trained on: a package scored on photos it learned from would flatter itself. Only exact
    files are caught; re-encoded crops of a held-out photo (``crops export``) are not."""
    from edge_runtime.imagefolder import _digest  # the same content key the split keeps duplicates by
    from edge_runtime.package import open_package

    folders = [Path(f) for f in open_package(package, verify=False).manifest.trained_on.get("images") or []]
    seen = {_digest(p) for f in folders if f.is_dir() for p, _ in list_image_folder(f)}
    return sum(_digest(p) in seen for p, _ in test)


MARKER = ".infantino-demo"


def fresh_out(out: Path) -> Path:
    """Wipe and recreate the output folder, but only one this demo made (or an empty one), so
    that ``--out .`` or a typo never deletes someone's files."""
    import shutil

    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        if any(out.iterdir()) and not (out / MARKER).exists() and not (out / "summary.json").exists():
            raise ValueError(f"--out {out} holds files infantino-demo did not write; pass a new or empty folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by infantino-demo; recreated on every run\n")
    return out
