"""Images a device must not learn from as they decode today: 16-bit, float, blank, and huge ones."""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from edge_helpers import face, open_device
from infantino.edge_runtime.annotation_queue import AnnotationQueue
from infantino.edge_runtime.core.preprocess import DEVICE_MEMORY, ImageError


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


def test_a_16_bit_png_and_a_float_tiff_are_learned_as_the_face_they_show(tiny_package_dir, tmp_path):
    # Prepare: one face as an 8-bit PNG, a 16-bit PNG and a float TIFF
    device = open_device(tiny_package_dir, tmp_path / "state")
    pixels = face(3, seed=1)
    eight = device.embed(_png(Image.fromarray(pixels)))
    # Execute
    sixteen = device.embed(_png(Image.fromarray(pixels.astype(np.uint16) * 257)))
    floating = device.embed(_tiff(Image.fromarray(pixels.astype(np.float32) / 255.0)))
    result = device.learn(_png(Image.fromarray(pixels.astype(np.uint16) * 257)), "happy")
    # Assert: the same embedding as the 8-bit picture (before: a white and a black frame)
    np.testing.assert_allclose(sixteen, eight, atol=1e-5)
    np.testing.assert_allclose(floating, eight, atol=1e-5)
    assert result.updated and device.counters["labels"] == 1


@pytest.mark.parametrize("frame", [
    np.zeros((64, 64), np.uint8),
    np.full((64, 64, 3), 200, np.uint8),
    np.full((64, 64), 128, np.uint8) + (np.arange(64) % 2).astype(np.uint8),  # near-constant: std 0.5
])
def test_a_blank_or_near_constant_frame_is_refused_and_nothing_is_stored(tiny_package_dir, tmp_path, frame):
    # Prepare: a device with consent, so a learned crop would also be queued for upload
    state = tmp_path / "state"
    device = open_device(tiny_package_dir, state, share_crops=True, uncertainty_threshold=0.0)
    weights = [w.copy() for w in device.head.weights()]
    # Execute / Assert: a one-line refusal, and no snapshot, kept sample, upload or queued frame
    with pytest.raises(ImageError, match="blank or nearly uniform") as err:
        device.learn(frame, "happy")
    assert "\n" not in str(err.value)
    prediction = device.predict(frame)  # it may be predicted, but it is not queued for a caregiver
    assert prediction.queued_id is None and len(device.queue) == 0
    with pytest.raises(ImageError, match="blank"):
        device.learn(prediction, "sad")
    assert device.counters["labels"] == 0 and device.store.load() is None
    assert len(device.samples) == 0 and len(device.outbox) == 0
    for a, b in zip(device.head.weights(), weights):
        np.testing.assert_array_equal(a, b)


def test_a_blank_frame_queued_before_the_upgrade_is_not_learned(tiny_package_dir, tmp_path):
    # Prepare: a flat crop in the queue, as an older device could leave it
    state = tmp_path / "state"
    queue = AnnotationQueue(state / "queue")
    blank = queue.add(np.full((64, 64), 90, np.uint8), predicted="sad", uncertainty=0.9, probabilities=[1 / 7] * 7, face_found=False)
    labelled = queue.add(np.full((64, 64), 91, np.uint8), predicted="sad", uncertainty=0.9, probabilities=[1 / 7] * 7, face_found=False)
    queue.resolve(labelled, "happy")  # labelled before the upgrade, not learned yet
    # Execute
    device = open_device(tiny_package_dir, state)
    with pytest.raises(ImageError, match="queued face crop is blank"):
        device.resolve(blank, "happy")
    # Assert: neither is learned, the refused one keeps no label, the other left the queue
    assert device.counters["labels"] == 0
    assert queue.get(blank).label is None and queue.resolved() == []


def test_the_page_answers_422_for_a_blank_queued_frame(tiny_package_dir, tmp_path):
    pytest.importorskip("flask")
    from infantino.edge_runtime.annotate import create_app

    device = open_device(tiny_package_dir, tmp_path / "state")
    blank = device.queue.add(np.zeros((64, 64), np.uint8), predicted="sad", uncertainty=0.9, probabilities=[1 / 7] * 7,
                             face_found=False)
    client = create_app(device).test_client()
    html = client.get("/").get_data(as_text=True)
    csrf = html.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    r = client.post("/api/label", json={"id": blank, "label": "happy"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 422 and "blank" in r.get_json()["error"]
    assert device.counters["labels"] == 0


DEVICE_RSS = textwrap.dedent("""
    import sys
    from infantino.edge_runtime.device import Device, DeviceConfig

    def peak_mb():  # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's over exec)
        line = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
        return int(line.split()[1]) / 1024

    device = Device(sys.argv[1], sys.argv[2], DeviceConfig(threads=1))
    device.predict(sys.argv[3])  # warm: a camera-sized frame
    warm = peak_mb()
    device.predict(sys.argv[4])
    print(warm, peak_mb())
""")


def test_a_device_predicting_a_7000_px_jpeg_stays_inside_its_memory_budget(tmp_path):
    # Prepare: the release package, a 640x480 frame and a 7000x7000 JPEG of a face (0.8 MB)
    model = REPO / "data" / "models"
    if not (model / "manifest.json").exists():
        pytest.skip("the release package is not in data/models")
    small, big = tmp_path / "small.jpg", tmp_path / "big.jpg"
    Image.fromarray(face(3)).convert("RGB").resize((640, 480)).save(small)
    Image.fromarray(face(3)).convert("RGB").resize((7000, 7000), Image.NEAREST).save(big, quality=30)
    # Execute
    run = subprocess.run([sys.executable, "-c", DEVICE_RSS, str(model), str(tmp_path / "state"), str(small), str(big)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    # Assert: the whole device process stays under 150 MB (before: ~480 MB)
    assert run.returncode == 0, run.stderr[-2000:]
    warm, peak = (float(v) for v in run.stdout.split()[-2:])
    assert peak < DEVICE_MEMORY / 2**20, (warm, peak)
