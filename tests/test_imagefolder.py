"""Seeded ImageFolder splits keep identical photos on one side."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from infantino.edge_runtime.core.imagefolder import list_image_folder, split_image_folder, split_items
from infantino.edge_runtime.core.preprocess import CLASSES


def _tree(root, per_class=8):
    rng = np.random.default_rng(0)
    for c in CLASSES[:3]:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / c / f"{i}.png")
    # The same bytes under two labels, as in the real infant set.
    (root / CLASSES[1] / "dup.png").write_bytes((root / CLASSES[0] / "0.png").read_bytes())
    return root


def test_split_is_stratified_seeded_and_keeps_duplicates_together(tmp_path):
    items = list_image_folder(_tree(tmp_path / "src"))
    assert len(items) == 25
    a = split_items(items, {"train": 0.75, "test": 0.25}, seed=3)
    b = split_items(items, {"train": 0.75, "test": 0.25}, seed=3)
    assert a == b
    assert len(a["train"]) + len(a["test"]) == 25
    for part in a.values():
        names = {(p.parent.name, p.name) for p, _ in part}
        assert ((CLASSES[0], "0.png") in names) == ((CLASSES[1], "dup.png") in names)
    test_labels = [label for _, label in a["test"]]
    assert sorted(set(test_labels)) == [0, 1, 2]


def test_split_writes_imagefolder_trees(tmp_path):
    roots = split_image_folder(_tree(tmp_path / "src"), tmp_path / "split", {"train": 0.5, "test": 0.5}, seed=0)
    total = sum(len(list_image_folder(r)) for r in roots.values())
    assert total == 25


def test_unknown_class_folder_is_refused(tmp_path):
    (tmp_path / "joy").mkdir()
    with pytest.raises(ValueError, match="not one of"):
        list_image_folder(tmp_path)
