"""A frame at the cost of its models: the cheap parts of ``Device.predict`` still answer right.

The frame key fingerprints an array instead of hashing it, the state check stats the folder
instead of listing it, the crop converts only the pixels it reads to gray, and the detector
decodes only the candidates over its threshold; each is checked here against what it replaces.
"""
from __future__ import annotations

import numpy as np
import pytest

from edge_helpers import face, open_device
from infantino.edge_runtime import state as state_mod
from infantino.edge_runtime.core.onnx_session import cpu_session
from infantino.edge_runtime.core.facecrop import FaceSquare, cut, pixels_read
from infantino.edge_runtime.core.package import open_package
from infantino.edge_runtime.prediction import frame_key
from infantino.edge_runtime.state import StateStore


def camera_frame(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (480, 640, 3), dtype=np.uint8)


def test_an_array_keeps_its_key_and_any_changed_byte_or_layout_gets_another():
    frame = camera_frame()
    assert frame_key(frame) == frame_key(frame.copy())
    one_byte = frame.copy()
    one_byte[123, 457, 1] ^= 1
    assert frame_key(one_byte) != frame_key(frame)
    swapped = frame.copy()  # the same bytes, two rows exchanged: the sum alone would not see it
    swapped[[10, 300]] = swapped[[300, 10]]
    assert frame_key(swapped) != frame_key(frame)
    assert frame_key(frame.reshape(640, 480, 3)) != frame_key(frame)
    assert frame_key(frame[:, :, 0]) != frame_key(np.ascontiguousarray(frame[:, :, 0]).astype(np.uint16))
    odd = np.arange(7 * 5, dtype=np.uint8).reshape(7, 5)  # not a whole number of 64-bit words
    changed = odd.copy()
    changed[-1, -1] += 1
    assert frame_key(odd) != frame_key(changed)


class CountingSession:
    """The real ONNX Runtime session, counting its runs."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


def test_learning_a_frame_just_predicted_reuses_its_embedding_and_a_changed_frame_is_embedded(tiny_package_dir, tmp_path):
    session = CountingSession(cpu_session(open_package(tiny_package_dir).path("extractor"), 1))
    device = open_device(tiny_package_dir, tmp_path / "state")
    device.switch_package(tiny_package_dir, session=session)
    frame = face(3, seed=1)
    prediction = device.predict(frame, enqueue=False)
    assert session.runs == 1
    device.learn(frame.copy(), "happy")  # another array, the same frame
    assert session.runs == 1
    changed = frame.copy()
    changed[0, 0] ^= 1
    device.learn(changed, "happy")
    assert session.runs == 2
    assert device.queue_frame(prediction) is not None  # the crop kept under the prediction's key


def test_the_stamp_check_sees_another_writer_at_once_and_lists_only_after_a_change(tmp_path, monkeypatch):
    camera, writer = StateStore(tmp_path), StateStore(tmp_path)
    listings = []
    listed = camera.generations
    monkeypatch.setattr(camera, "generations", lambda: listings.append(1) or listed())
    # a folder changed just now is listed every time (two changes within one timestamp tick look alike)
    writer.save({"w": np.zeros(2)}, {})
    assert camera.latest_generation(by_stamp=True) == 1
    assert camera.latest_generation(by_stamp=True) == 1
    assert len(listings) == 2
    # once its stamp has settled, one stat answers until the folder changes
    monkeypatch.setattr(state_mod, "SETTLED_NS", 0)
    assert camera.latest_generation(by_stamp=True) == 1
    assert camera.latest_generation(by_stamp=True) == 1
    assert len(listings) == 3
    writer.save({"w": np.ones(2)}, {})
    assert camera.latest_generation(by_stamp=True) == 2
    assert len(listings) == 4
    assert camera.latest_generation() == 2 and len(listings) == 5  # without by_stamp: always the listing


def test_an_idle_camera_picks_up_a_label_saved_by_another_device_object(tiny_package_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(state_mod, "SETTLED_NS", 0)  # trust the stamp at once: the stricter case
    camera = open_device(tiny_package_dir, tmp_path / "state")
    page = open_device(tiny_package_dir, tmp_path / "state")
    camera.predict(face(1), enqueue=False)
    page.learn(face(2, seed=5), "sad")
    camera.predict(face(1), enqueue=False)
    assert camera.counters["labels"] == 1 and camera.generation == page.generation


@pytest.mark.parametrize("side", [40.0, 150.7, 300.0, 900.0])  # warped as is, and area-averaged first
@pytest.mark.parametrize("angle", [0.0, 12.5, -37.0])
@pytest.mark.parametrize("centre", [(320.4, 240.2), (15.0, 470.0), (630.5, 8.3)])  # inside, at the corners
def test_cut_reads_no_pixel_outside_the_box_it_names(side, angle, centre):
    gray = np.random.default_rng(1).integers(0, 256, (480, 640), dtype=np.uint8)
    sq = FaceSquare(centre[0], centre[1], side, angle)
    x0, y0, x1, y1 = pixels_read(sq, 640, 480)
    assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
    garbage = np.full_like(gray, 255)
    garbage[y0:y1, x0:x1] = gray[y0:y1, x0:x1]
    np.testing.assert_array_equal(cut(garbage, sq), cut(gray, sq))
