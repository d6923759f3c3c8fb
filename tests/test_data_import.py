"""``infantino-export data import``: the public InfantinO repository's layout in, our data layout
out (deduplicated), and every malformed input refused in one line before anything is written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_helpers import face
from infantino.edge_runtime.core.datasets import fer_file, infant_folder
from infantino.edge_runtime.core.imagefolder import list_image_folder
from infantino.edge_runtime.core.preprocess import CLASSES
from infantino.export.data import load_fer
from infantino.export.data_import import ImportRefused, import_infantino

PROCESSED = ("modeling", "src", "data", "processed")
RAW = ("modeling", "src", "data", "online_raw")


def _checkout(root: Path, *, one_hot: bool = False) -> Path:
    """A small tree shaped like the InfantinO repository: 6 faces (one repeated with its label,
    one missing index) and 5 photos (one repeated in its folder, one under two labels)."""
    rng = np.random.default_rng(0)
    train = root.joinpath(*PROCESSED, "train")
    train.mkdir(parents=True)
    faces = [rng.integers(0, 256, (48, 48)) for _ in range(5)]
    labels = np.array([0, 3, 6, 2, 3, 5, 4])  # index 5 has no file (the public tree skips some)
    for i, grey in enumerate([*faces[:4], faces[1], None, faces[4]]):
        if grey is not None:
            np.save(train / f"A_{i}.npy", np.stack([grey, grey, grey]))  # int64, as explore.ipynb wrote them
    np.save(root.joinpath(*PROCESSED, "train_lb.npy"), np.eye(7, dtype=np.int64)[labels] if one_hot else labels)
    raw = root.joinpath(*RAW)
    for label, name, seed in [("happy", "1.jpeg", 1), ("happy", "2.png", 2), ("sad", "001.jpg", 3), ("angry", "x.webp", 4)]:
        (raw / label).mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(face(CLASSES.index(label), seed=seed))
        img.save(raw / label / name)
    (raw / "happy" / "9-copy.jpeg").write_bytes((raw / "happy" / "1.jpeg").read_bytes())  # a duplicate: kept once
    (raw / "sad" / "also-happy.jpeg").write_bytes((raw / "happy" / "1.jpeg").read_bytes())  # two labels: kept in both
    return root


@pytest.mark.parametrize("one_hot", [False, True])
def test_the_import_writes_our_layout_without_duplicates(tmp_path, one_hot):
    checkout = _checkout(tmp_path / "InfantinO", one_hot=one_hot)
    out = tmp_path / "data"

    report = import_infantino(checkout, out)

    with np.load(out / "fer2013" / "fer2013_train.npz") as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (5, 48, 48)
        assert z["labels"].dtype == np.int64 and z["labels"].tolist() == [0, 3, 6, 2, 4]  # A_4 repeated A_1 and its label
        assert tuple(z["classes"]) == CLASSES
        first = np.load(checkout.joinpath(*PROCESSED, "train", "A_0.npy"))[0]
        np.testing.assert_array_equal(z["images"][0], first)
    assert (report.faces, report.face_duplicates, report.photo_duplicates) == (5, 1, 1)
    photos = sorted(p.relative_to(out / "infant").as_posix() for p in (out / "infant").rglob("*") if p.is_file())
    assert photos == ["angry/x.webp", "happy/1.jpeg", "happy/2.png", "sad/001.jpg", "sad/also-happy.jpeg"]
    # what the commands read: the loaders accept it where INFANTINO_DATA points
    assert len(load_fer(fer_file(out / "fer2013" / "fer2013_train.npz")).labels) == 5
    assert len(list_image_folder(infant_folder(out / "infant"))) == 5


def _refusal(tmp_path: Path, spoil) -> str:
    checkout = _checkout(tmp_path / "InfantinO")
    spoil(checkout)
    out = tmp_path / "data"
    with pytest.raises(ImportRefused) as info:
        import_infantino(checkout, out)
    assert not out.exists()  # refused before anything was written
    assert "\n" not in str(info.value)
    return str(info.value)


def _faces(c: Path) -> Path:
    return c.joinpath(*PROCESSED, "train")


@pytest.mark.parametrize("spoil, says", [
    (lambda c: np.save(_faces(c) / "A_0.npy", np.zeros((3, 64, 64))), "A_0.npy: a face must be a (3, 48, 48) or (48, 48)"),
    (lambda c: np.save(_faces(c) / "A_0.npy", np.full((48, 48), 300)), "A_0.npy: face pixels must be whole numbers 0-255"),
    (lambda c: np.save(_faces(c) / "A_9.npy", np.zeros((48, 48))), "A_9.npy: index 9 has no label"),
    (lambda c: (_faces(c) / "notes.txt").write_text("x"), "notes.txt: unexpected file among the faces"),
    (lambda c: np.save(c.joinpath(*PROCESSED, "train_lb.npy"), np.array([0, 9])), "label 9 is outside 0-6"),
    (lambda c: np.save(c.joinpath(*PROCESSED, "train_lb.npy"), np.array([[0.5, 0.5]])), "labels must be integers"),
    (lambda c: c.joinpath(*PROCESSED, "train_lb.npy").unlink(), "no modeling/src/data/processed/train_lb.npy"),
    (lambda c: c.joinpath(*RAW, "sleepy").mkdir(), "sleepy: not a class folder"),
    (lambda c: c.joinpath(*RAW, "happy", "README.md").write_text("x"), "README.md: not a photo"),
    (lambda c: c.joinpath(*RAW, "happy", "broken.jpg").write_bytes(b"not a jpeg"), "broken.jpg: not a readable image"),
])
def test_malformed_input_is_refused_in_one_line_naming_the_file(tmp_path, spoil, says):
    assert says in _refusal(tmp_path, spoil)


def test_the_command_refuses_a_folder_that_is_not_a_checkout_and_an_existing_target(tmp_path):
    cmd = [sys.executable, "-m", "infantino.export.cli", "data", "import"]
    r = subprocess.run([*cmd, str(tmp_path), "--out", str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "no modeling/src/data/processed/train/" in r.stderr and "InfantinO checkout" in r.stderr
    checkout = _checkout(tmp_path / "InfantinO")
    ok = subprocess.run([*cmd, str(checkout), "--out", str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "wrote 5 FER faces" in ok.stdout, ok.stderr
    again = subprocess.run([*cmd, str(checkout), "--out", str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "exists already" in again.stderr
