"""The demo's photos: a seeded held-out part and one disjoint shard per device."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from infantino.edge_runtime.core.datasets import ENV, INFANT, data_path
from infantino.edge_runtime.core.imagefolder import list_image_folder, split_items


def find_images(arg: str | None) -> Path:
    """``--images``, else the infant photos under ``$INFANTINO_DATA``; without it, ../shared/data/infant
    next to the repository, then next to the working folder."""
    candidates = [Path(arg)] if arg else [data_path(*INFANT)]
    if not arg and not os.environ.get(ENV):
        candidates += [Path.cwd().parent / "shared" / "data" / "infant"]
    candidates = list(dict.fromkeys(candidates))
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"no image folder at {' or '.join(map(str, candidates))}: pass --images DIR or set {ENV} "
                            "(the infant photos, README 'Data': an ImageFolder tree, one sub-folder per expression)")


DEMO_PACKAGE = Path("data") / "models-demo"


def demo_model_dir() -> Path:
    """``$INFANTINO_MODEL_DIR``, else ``./data/models-demo``, else the device's default package.

    The release learns from every labelled infant photo, the demo's held-out ones too, so the
    demo runs its own package: the release's recipe fine-tuned only on the photos its cameras
    stream (``bench/demo_split.py``), which the held-out check below lets through."""
    from infantino.edge_runtime.paths import ENV_MODEL_DIR, default_model_dir

    if not os.environ.get(ENV_MODEL_DIR) and DEMO_PACKAGE.is_dir():
        return DEMO_PACKAGE
    return default_model_dir()


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
    """How many held-out photos (by content) the package's manifest says it was trained on: a
    package scored on photos it learned from would flatter itself. Only exact files are caught;
    re-encoded crops of a held-out photo (``crops export``) are not, unless the manifest names
    the photos they were cut from (the release package does)."""
    from infantino.edge_runtime.core.datasets import file_key
    from infantino.edge_runtime.core.package import open_package

    seen = trained_keys(open_package(package, verify=False).manifest.trained_on.get("images"))
    return sum(file_key(p) in seen for p, _ in test)


def trained_keys(images: dict | list | None) -> set[str]:
    """The content keys of the photos a manifest's ``trained_on.images`` names: the record's
    ``file_keys`` (``image_set_record``), or, from manifests written before records, the
    images in those folders that still exist on this machine."""
    from infantino.edge_runtime.core.datasets import image_folders_record

    if isinstance(images, dict):
        return set(images.get("file_keys") or [])
    folders = [f for f in images or [] if Path(f).is_dir()]
    return set(image_folders_record(folders)["file_keys"])


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
