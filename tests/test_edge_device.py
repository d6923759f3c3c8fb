"""Device: predict any kind of frame, learn with replay and a guard, keep state, refuse bad input."""
from __future__ import annotations

import json
import logging
import shutil
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_helpers import face, head_weights, open_device, png_bytes

from infantino.edge_runtime.annotation_queue import AnnotationQueue
from infantino.edge_runtime.device import Device, InputError, Prediction
from infantino.edge_runtime.core.onnx_session import cpu_session
from infantino.edge_runtime.core.head import OnlineHead
from infantino.edge_runtime.core.package import Manifest, PackageError, read_manifest, write_manifest
from infantino.edge_runtime.core.preprocess import CLASSES


class CountingSession:
    """A real ONNX Runtime session that counts how often it runs."""

    def __init__(self, path: Path):
        self.inner = cpu_session(path, threads=1)
        self.runs = 0

    def get_inputs(self):
        return self.inner.get_inputs()

    def get_outputs(self):
        return self.inner.get_outputs()

    def run(self, names, feeds):
        self.runs += 1
        return self.inner.run(names, feeds)


@pytest.fixture
def device(tiny_package_dir, tmp_path) -> Device:
    return open_device(tiny_package_dir, tmp_path / "state")


def test_predict_takes_a_path_bytes_a_pil_image_or_an_array(device, tmp_path):
    pixels = face(3)
    path = tmp_path / "frame.png"
    path.write_bytes(png_bytes(pixels))
    label, uncertainty = device.predict(path)  # the seed's usage
    preds = [device.predict(src) for src in (path, str(path), png_bytes(pixels), Image.fromarray(pixels), pixels,
                                              np.stack([pixels] * 3, axis=-1))]
    for p in preds:
        assert p.label == label and p.uncertainty == pytest.approx(uncertainty, abs=1e-6)
        np.testing.assert_allclose(p.probabilities, preds[0].probabilities, atol=1e-6)
    assert label in CLASSES and 0.0 <= uncertainty <= 1.0
    assert preds[0].probabilities.shape == (7,) and abs(float(preds[0].probabilities.sum()) - 1) < 1e-5
    assert json.dumps(preds[0].to_dict())


def test_batch_prediction_equals_one_by_one(device):
    frames = [face(c, seed=c) for c in range(7)]
    batch = device.predict_batch(frames)
    for f, b in zip(frames, batch):
        np.testing.assert_allclose(device.predict(f).probabilities, b.probabilities, atol=1e-5)
    assert len(batch) == 7 and device.predict_batch([]) == []


def test_learn_after_predict_does_not_extract_again(tiny_package_dir, tmp_path):
    session = CountingSession(tiny_package_dir / "extractor.onnx")
    dev = Device(tiny_package_dir, tmp_path / "state", open_device(tiny_package_dir, tmp_path / "s0").config, session=session)
    frame = face(2)
    pred = dev.predict(frame)
    dev.learn(frame, "fear")
    dev.learn(pred, "fear")
    dev.learn(pred.embedding, "fear")
    assert session.runs == 1
    dev.learn(face(2, seed=9), "fear")  # a frame never predicted is extracted once
    assert session.runs == 2


def test_learning_from_caregivers_fixes_what_the_package_head_gets_wrong(device):
    # The tiny package's head mislabels most synthetic stripe "faces"; caregivers teach the right names.
    probe = [(face(c, seed=1000 + i), c) for c in range(7) for i in range(4)]

    def accuracy() -> float:
        preds = device.predict_batch([f for f, _ in probe], enqueue=False)
        return float(np.mean([p.index == c for p, (_, c) in zip(preds, probe)]))

    before = accuracy()
    for i in range(140):
        device.learn(face(i % 7, seed=i), CLASSES[i % 7], save=False)
    after = accuracy()
    assert before < 0.6 and after >= 0.9
    assert device.counters["updates"] > 100 and len(device.replay) > 0 and len(device.holdout) > 0


def test_the_guard_rolls_back_an_update_that_wrecks_the_held_back_labels(tiny_package_dir, tmp_path):
    dev = open_device(tiny_package_dir, tmp_path / "state", holdout_every=2, holdout_per_class=2, guard_min_holdout=7)
    for i in range(98):  # correct labels: every second one is held back for the guard
        dev.learn(face(i % 7, seed=i), CLASSES[i % 7], save=False)
    assert len(dev.holdout) >= 7 and dev.counters["rollbacks"] == 0
    saved, version = head_weights(dev), dev.head.version
    # One mislabel pushed hard (a runaway learning rate, nothing mixed in) must not wreck the head.
    dev.config = replace(dev.config, learning_rate=0.5, learn_steps=30, replay_mix=0, anchor_strength=0.0)
    assert dev.counters["labels"] % 2 == 0  # the next label trains (it is not held back)
    result = dev.learn(face(3, seed=99), "disgust")
    assert result.rolled_back and not result.updated
    assert result.holdout_loss_after > result.holdout_loss_before
    assert dev.counters["rollbacks"] == 1 and dev.head.version == version
    for a, b in zip(head_weights(dev), saved):
        np.testing.assert_array_equal(a, b)
    # An ordinary update is accepted.
    dev.config = replace(dev.config, learning_rate=None, learn_steps=1, replay_mix=8, anchor_strength=None)
    dev.learn(face(4, seed=98), "sad")  # (held back: odd count)
    assert dev.learn(face(5, seed=97), "surprise").updated


def test_state_survives_a_restart(tiny_package_dir, tmp_path):
    dev = open_device(tiny_package_dir, tmp_path / "state")
    for i in range(12):
        dev.learn(face(i % 7, seed=i), CLASSES[(i + 1) % 7])
    again = open_device(tiny_package_dir, tmp_path / "state")
    for a, b in zip(head_weights(again), head_weights(dev)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert again.counters == dev.counters and again.head.version == dev.head.version == dev.counters["updates"]
    np.testing.assert_array_equal(again.replay.x, dev.replay.x)
    np.testing.assert_array_equal(again.holdout.all()[0], dev.holdout.all()[0])
    status = again.status()
    assert status["package_version"] == "tiny-1" and status["generation"] == again.generation == 12


def test_a_new_package_version_starts_from_its_own_head(tiny_package_dir, tmp_path, caplog):
    dev = open_device(tiny_package_dir, tmp_path / "state")
    dev.learn(face(1), "sad")
    pkg = tmp_path / "pkg2"
    shutil.copytree(tiny_package_dir, pkg)
    m = read_manifest(pkg)
    write_manifest(pkg, Manifest(**{**m.__dict__, "version": "tiny-2"}))
    with caplog.at_level(logging.WARNING):
        new = open_device(pkg, tmp_path / "state")
    assert "tiny-1" in caplog.text and new.head.version == 0 and new.counters["labels"] == 0
    boot = OnlineHead.load(pkg / "head.npz")
    for a, b in zip(new.head.weights(), boot.weights()):
        np.testing.assert_array_equal(a, b)


def test_uncertain_frames_are_queued_and_a_label_counts_once(tiny_package_dir, tmp_path):
    dev = open_device(tiny_package_dir, tmp_path / "state", uncertainty_threshold=0.0)
    pred = dev.predict(face(2))
    assert pred.queued_id is not None
    assert dev.predict(face(2)).queued_id is None  # the same frame is not queued twice
    labels_before = dev.counters["labels"]
    assert dev.resolve(pred.queued_id, "fear") is not None
    assert dev.resolve(pred.queued_id, "sad") is None
    assert dev.counters["labels"] == labels_before + 1 and dev.counters["from_queue"] == 1
    assert len(dev.queue) == 0 and dev.queue.resolved() == []
    confident = open_device(tiny_package_dir, tmp_path / "state2", uncertainty_threshold=1.0)
    assert confident.predict(face(2)).queued_id is None


def test_a_label_given_just_before_a_crash_is_learned_on_restart(tiny_package_dir, tmp_path):
    dev = open_device(tiny_package_dir, tmp_path / "state", uncertainty_threshold=0.0)
    item_id = dev.predict(face(5)).queued_id
    AnnotationQueue(tmp_path / "state" / "queue").resolve(item_id, "surprise")  # labelled; the device died before learning
    again = open_device(tiny_package_dir, tmp_path / "state")
    assert again.counters["from_queue"] == 1 and again.queue.resolved() == []
    assert open_device(tiny_package_dir, tmp_path / "state").counters["from_queue"] == 1  # not learned twice


def _huge_png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + b"\x00" * 64


def _jpeg(pixels: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


BAD_FRAMES = {  # kind: (make the frame in a folder, what the one-line error says)
    "truncated jpeg": (lambda d: d.joinpath("t.jpg").write_bytes(_jpeg(face(1))[:300]) and d / "t.jpg",
                       r"t\.jpg: corrupt, truncated or unsupported image"),
    "huge image": (lambda d: d.joinpath("h.png").write_bytes(_huge_png_header(20000, 20000)) and d / "h.png",
                   r"h\.png: not a readable image"),
    "not an image": (lambda d: d.joinpath("n.jpg").write_bytes(b"hello, not a picture") and d / "n.jpg",
                     r"n\.jpg: not a readable image"),
    "missing file": (lambda d: d / "nope.png", r"no such image file: .*nope\.png"),
    "bad array": (lambda d: np.zeros((8, 8, 5), np.uint8), r"frame of shape \(8, 8, 5\) is not"),
    "nan array": (lambda d: np.full((8, 8), np.nan), "non-finite"),
    "not an image object": (lambda d: 42, "cannot read an image from a int"),
}


@pytest.mark.parametrize("kind", list(BAD_FRAMES))
def test_a_bad_frame_is_a_one_line_error_and_changes_nothing(device, tmp_path, kind):
    device.learn(face(0), "angry")
    make, message = BAD_FRAMES[kind]
    frame = make(tmp_path)
    weights, counters, generation = head_weights(device), dict(device.counters), device.generation
    with pytest.raises(ValueError, match=message) as err:
        device.predict(frame)
    with pytest.raises(ValueError, match=message):
        device.learn(frame, "happy")
    assert "\n" not in str(err.value) and len(str(err.value)) < 200
    assert device.counters == counters and device.generation == generation == device.store.load().generation
    for a, b in zip(head_weights(device), weights):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("label, embedding, message", [
    ("joyful", np.zeros(16), "unknown label"),
    (7, np.zeros(16), "unknown label"),
    (True, np.zeros(16), "unknown label"),
    ("happy", np.zeros(5), "does not match"),
    ("happy", np.full(16, np.inf), "NaN or infinite"),
])
def test_bad_labels_and_embeddings_change_nothing(device, label, embedding, message):
    weights = head_weights(device)
    with pytest.raises(InputError, match=message):
        device.learn(embedding, label)
    assert device.counters["labels"] == 0 and device.store.load() is None
    for a, b in zip(head_weights(device), weights):
        np.testing.assert_array_equal(a, b)


def test_a_package_that_does_not_match_its_manifest_is_refused(tiny_package_dir, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package_dir, pkg)
    data = bytearray((pkg / "extractor.onnx").read_bytes())
    data[-5] ^= 0x01
    (pkg / "extractor.onnx").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="sha256"):
        open_device(pkg, tmp_path / "state")
    assert not (tmp_path / "state").exists()


def test_adopting_a_head_of_another_shape_is_refused(device, tiny_package_dir):
    wrong = OnlineHead.fit(np.random.default_rng(0).normal(size=(14, 8)), np.arange(14) % 7, max_iter=2)
    with pytest.raises(InputError, match="does not match this package's classes or embedding size"):
        device.adopt_head(wrong)
    good = OnlineHead.load(tiny_package_dir / "head.npz")
    device.adopt_head(good)
    assert device.head is good and device.counters["adopted"] == 1


def test_prediction_unpacks_like_the_seed():
    p = Prediction("sad", 4, np.eye(7, dtype=np.float32)[4], 0.1, 0.0, 1.0, True, (0, 0, 1, 1), "k")
    label, uncertainty = p
    assert (label, uncertainty) == ("sad", 0.1)


def _package_with_replay_seed(tiny_package_dir, folder, per_class=10):
    """The tiny package plus a ``replay_seed`` role: embeddings of correctly labelled source faces."""
    from infantino.edge_runtime.core.extractor import Extractor
    from infantino.edge_runtime.core.package import describe_files
    from infantino.edge_runtime.core.preprocess import faces_tensor

    shutil.copytree(tiny_package_dir, folder)
    labels = np.repeat(np.arange(7), per_class)
    ex = Extractor(folder / "extractor.onnx", threads=1)
    x = ex(faces_tensor([face(int(c), seed=3000 + i) for i, c in enumerate(labels)]))
    np.savez(folder / "replay_seed.npz", x=x, y=labels)
    m = read_manifest(folder)
    roles = {r: e["path"] for r, e in m.files.items()} | {"replay_seed": "replay_seed.npz"}
    write_manifest(folder, Manifest(**{**m.__dict__, "files": describe_files(folder, roles)}))
    return folder, x, labels


def test_source_replay_from_the_package_keeps_old_knowledge_through_a_flood_of_one_label(tiny_package_dir, tmp_path):
    pkg, sx, sy = _package_with_replay_seed(tiny_package_dir, tmp_path / "pkg")
    with_source = open_device(pkg, tmp_path / "a")
    without = open_device(tiny_package_dir, tmp_path / "b", anchor_strength=0.0)
    assert len(with_source.source) == 70 and with_source.anchor_strength == 0.0 and without.anchor_strength == 0.0
    for i in range(60):  # a caregiver who answers "happy" to everything
        frame = face(i % 7, seed=i)
        with_source.learn(frame, "happy", save=False)
        without.learn(frame, "happy", save=False)

    def source_accuracy(dev):
        return float(np.mean(dev.head.predict_proba(sx).argmax(1) == sy))

    assert source_accuracy(with_source) > source_accuracy(without) + 0.3


def test_a_replay_seed_of_the_wrong_size_is_refused(tiny_package_dir, tmp_path):
    np.savez(tmp_path / "seed.npz", x=np.zeros((7, 3), np.float32), y=np.arange(7))
    with pytest.raises(PackageError, match="does not fit"):
        open_device(tiny_package_dir, tmp_path / "s", replay_seed=str(tmp_path / "seed.npz"))
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(PackageError, match="replay seed bad.npz"):
        open_device(tiny_package_dir, tmp_path / "s", replay_seed=str(tmp_path / "bad.npz"))


def test_a_camera_loop_queues_at_most_one_frame_per_interval(tiny_package_dir, tmp_path):
    dev = open_device(tiny_package_dir, tmp_path / "state", uncertainty_threshold=0.0, queue_min_interval_s=3600)
    assert dev.predict(face(1, seed=1)).queued_id is not None
    assert dev.predict(face(2, seed=2)).queued_id is None
    assert len(dev.queue) == 1 and dev.counters["queued"] == 1


def test_detection_size_can_be_set_per_device(tiny_package_dir, tmp_path):
    dev = open_device(tiny_package_dir, tmp_path / "state", detect_faces=True, detect_max_side=240)
    assert dev.spec.detect_max_side == 240 and dev.package.manifest.preprocess.detect_max_side == 320
    frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    p = dev.predict(frame)
    assert not p.face_found and p.box == (80, 0, 480, 480)  # no face in noise: the centre square


def test_coarse_to_fine_detection_crops_like_the_single_pass(tiny_package_dir, tmp_path):
    from conftest import require_data
    from infantino.edge_runtime.core.imagefolder import list_image_folder
    from infantino.edge_runtime.core.facefinder import prepare

    noise = np.random.default_rng(0).integers(0, 255, (480, 640), dtype=np.uint8)
    dev = open_device(tiny_package_dir, tmp_path / "s", detect_faces=True)
    single = open_device(tiny_package_dir, tmp_path / "t", detect_faces=True, detect_coarse_side=None)
    np.testing.assert_array_equal(single.prepare(noise).tensor, prepare(noise, single.spec).tensor)
    np.testing.assert_array_equal(dev.prepare(noise).tensor, prepare(noise, dev.spec).tensor)  # no face: the same fallback
    photos = [p for p, _ in list_image_folder(require_data("infant"))[:40]]
    agree = found = 0
    for photo in photos:
        a, b = dev.prepare(photo), single.prepare(photo)
        if a.face_found and b.face_found:
            found += 1
            (ax, ay, aw, _), (bx, by, bw, _) = a.box, b.box
            inter = max(0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0, min(ay + aw, by + bw) - max(ay, by))
            agree += inter / (aw * aw + bw * bw - inter) > 0.7
    assert found >= 10 and agree >= 0.85 * found
