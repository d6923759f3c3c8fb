"""A full disk leaves the device consistent (issue 20): a label whose snapshot cannot be written
is reported as failed and is neither counted nor learned, not then, not after space returns, not
after a restart; a queued frame's label is taken back so the caregiver can give it again.

Runs on a real, small tmpfs (root, as in CI); skipped only where mounting is not permitted."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_helpers import face, head_weights, open_device


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "4m"):
    folder.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {res.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write zeros until the file system says ENOSPC; returns the filler file."""
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.fixture()
def package(tiny_package_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_package_dir, tmp_path / "model"))


def test_a_label_that_cannot_be_saved_is_neither_counted_nor_learned_later(package, tmp_path):
    with small_disk(tmp_path / "card") as card:
        # Prepare: a device on the small disk with two labels learned and one frame queued
        device = open_device(package, card / "state", holdout_every=0)
        device.learn(face(3, seed=1), "happy")
        device.learn(face(4, seed=2), "sad")
        queued = device.queue_frame(device.predict(face(5, seed=3), enqueue=False), source="test")
        assert queued is not None
        before = {"counters": dict(device.counters), "weights": head_weights(device), "replay": len(device.replay),
                  "seen": device.samples.seen.copy(), "generation": device.generation}
        filler = fill(card)
        # Execute: a label and a queued frame's label on the full disk
        with pytest.raises(OSError) as failed:
            device.learn(face(0, seed=4), "angry")
        with pytest.raises(OSError):
            device.resolve(queued, "surprise")
        # Assert: both reported as failed, and memory is as it was
        assert failed.value.errno == errno.ENOSPC
        assert device.counters == before["counters"] and device.generation == before["generation"]
        for a, b in zip(head_weights(device), before["weights"]):
            np.testing.assert_array_equal(a, b)
        assert len(device.replay) == before["replay"]
        np.testing.assert_array_equal(device.samples.seen, before["seen"])
        assert device.queue.get(queued).label is None  # back in the queue, to be labelled again
        # Execute: space returns; the caregiver's next label is saved
        filler.unlink()
        device.learn(face(2, seed=5), "fear")
        # Assert: three labels, not four: the failed ones were not saved along with it
        assert device.counters["labels"] == before["counters"]["labels"] + 1 == 3
        reopened = open_device(package, card / "state", holdout_every=0)  # recover() learns resolved queue labels
        assert reopened.counters["labels"] == 3 and reopened.counters["from_queue"] == 0
        assert reopened.queue.get(queued).label is None
        assert reopened.resolve(queued, "surprise") is not None and reopened.counters["labels"] == 4
