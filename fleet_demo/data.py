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
