"""`infantino-edge watch` says what it skipped (issue 20): a truncated video exits non-zero with a
warning, and a folder's unreadable, empty and oversized images are counted in the status and
the timeline, each with a warning line."""
from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infantino.edge_runtime.cli import main
from infantino.edge_runtime.watch.loop import INCOMPLETE_EXIT
from watch_helpers import frame_lines, records, synthetic_frames, write_video


@pytest.fixture()
def package(tiny_package_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_package_dir, tmp_path / "model"))


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header (with a correct CRC) claims ``width`` x ``height`` pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 150)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def test_a_truncated_video_ends_with_a_warning_and_a_non_zero_exit(package, tmp_path, capsys, caplog):
    # Prepare: a 30-frame MJPG AVI cut in half (its header still says 30 frames)
    whole = write_video(tmp_path / "whole.avi", synthetic_frames([i % 7 for i in range(30)], seed=4), fps=10, size=(64, 64))
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    args = ["--fast", "--fps", "10", "--no-face-detect", "--model-dir", str(package), "--status-every", "60", "--json"]
    # Execute
    rc_whole = main(["watch", str(whole), "--state-dir", str(tmp_path / "s1"), *args])
    capsys.readouterr()
    rc_cut = main(["watch", str(cut), "--state-dir", str(tmp_path / "s2"), *args])
    out, err = capsys.readouterr()
    # Assert: the whole file is a clean end; the cut one says how far it got and exits 3
    assert rc_whole == 0
    assert rc_cut == INCOMPLETE_EXIT, err
    assert "of the 30 frames it states (truncated or damaged)" in caplog.text
    status = json.loads((tmp_path / "s2" / "watch" / "status.json").read_text())
    assert 0 < status["frames"] < 30 and status["frames"] == len(frame_lines(tmp_path / "s2"))


def test_unreadable_empty_and_oversized_images_are_counted_in_status_and_timeline(package, tmp_path, capsys, caplog):
    # Prepare: four good frames, a 0-byte JPEG, a PNG claiming 20000 x 20000 pixels, a cut-off PNG
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(synthetic_frames([3, 4, 6, 0], seed=5)):
        Image.fromarray(frame).save(folder / f"f{i}0.png")
    (folder / "f05.jpg").write_bytes(b"")
    (folder / "f15.png").write_bytes(_png_claiming(20000, 20000))
    good = (folder / "f20.png").read_bytes()
    (folder / "f25.png").write_bytes(good[: len(good) // 2])
    state = tmp_path / "state"
    # Execute
    rc = main(["watch", str(folder), "--fast", "--fps", "2", "--no-face-detect", "--model-dir", str(package),
               "--state-dir", str(state), "--status-every", "60", "--json"])
    out, err = capsys.readouterr()
    # Assert: a folder that was played to its end exits 0, but nothing was skipped silently
    assert rc == 0
    status = json.loads((state / "watch" / "status.json").read_text())
    assert status["frames"] == 4 and status["skipped"] == 3
    skipped = [r for r in frame_lines(state) if "skipped" in r]
    assert sorted(r["skipped"].split(":")[0] for r in skipped) == ["f05.jpg", "f15.png", "f25.png"]
    assert "DecompressionBombError" in " ".join(r["skipped"] for r in skipped)  # refused before decoding 400 MP
    assert caplog.text.count("frame skipped") == 3
    minutes = [r for p in (state / "watch").glob("minutes-*.jsonl") for r in records(p)]
    assert sum(m.get("skipped", 0) for m in minutes) == 3 and sum(m["frames"] for m in minutes) == 4
    assert np.all([isinstance(r["t"], float) for r in skipped])
