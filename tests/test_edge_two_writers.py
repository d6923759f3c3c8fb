"""Two processes on one state folder: every acknowledged label survives, an adopted head is kept.

Real processes throughout: a long-running device process, ``infantino-edge learn``,
``infantino-edge annotate`` (the caregiver page, over HTTP) and ``infantino-edge sync``
against a real sync server.
"""
from __future__ import annotations

import http.cookiejar
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TESTS
from edge_helpers import face, open_device
from infantino.edge_runtime.core import wire
from infantino.edge_runtime.device import Device, DeviceConfig
from infantino.edge_runtime.state import StateConflict
from infantino.edge_runtime.sync.state import SyncState

CLI_CONFIG = DeviceConfig(threads=1, detect_faces=False)  # what `infantino-edge ... --no-face-detect --threads 1` opens
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

DEVICE_LOOP = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import numpy as np
    from edge_helpers import open_device

    device = open_device({package!r}, {state!r})
    stop = Path({stop!r})
    rng = np.random.default_rng(0)
    acked = 0
    while True:
        last = stop.exists()
        y = int(rng.integers(0, 7))
        device.learn((rng.normal(size=16) + y).astype(np.float32), y)
        acked += 1
        print(acked, flush=True)
        if last:
            break
        time.sleep(0.02)
""")


def _edge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infantino.edge_runtime.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=ENV, timeout=timeout)


def _invariants(device: Device) -> None:
    c = device.counters
    assert device.head.version == c["updates"] and int(device.replay.seen.sum()) == c["updates"]
    assert c["labels"] == c["updates"] + c["rollbacks"] + len(device.holdout)


def test_infantino_edge_learn_next_to_a_running_device_loses_no_label(tiny_package_dir, tmp_path):
    # Prepare: a device process that learns a label every 20 ms until told to stop
    state, stop = tmp_path / "state", tmp_path / "stop"
    script = tmp_path / "device.py"
    script.write_text(DEVICE_LOOP.format(tests=str(TESTS), package=str(tiny_package_dir), state=str(state), stop=str(stop)))
    loop = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
    frames = []
    for i in range(4):
        frames.append(tmp_path / f"frame{i}.png")
        Image.fromarray(face(i, seed=i)).save(frames[-1])
    try:
        assert loop.stdout.readline(), loop.stderr.read()[-2000:]
        # Execute: four `infantino-edge learn` runs while the device keeps learning
        cli_acks = 0
        for i, frame in enumerate(frames):
            run = _edge("learn", str(frame), "--label", "happy", "--model-dir", str(tiny_package_dir), "--state-dir", str(state),
                        "--no-face-detect", "--threads", "1")
            assert run.returncode == 0, run.stderr
            cli_acks += 1
        stop.touch()
        out, err = loop.communicate(timeout=120)
        assert loop.returncode == 0, err[-2000:]
        device_acks = int(out.split()[-1])
    finally:
        loop.kill()
        loop.wait(timeout=30)
    # Assert: every acknowledged label is in the state, and the state agrees with itself
    device = open_device(tiny_package_dir, state)
    assert device_acks > 10
    assert device.counters["labels"] == device_acks + cli_acks
    _invariants(device)


def _page_post(opener, base: str, path: str, body: dict, csrf: str) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "X-CSRF-Token": csrf})
    with opener.open(req, timeout=60) as resp:
        return json.loads(resp.read())


def _start_page(state: Path, port: int, log: Path) -> tuple[subprocess.Popen, str]:
    with open(log, "wb") as out:  # a file, not a pipe: a full pipe would stall the page's request log
        page = subprocess.Popen([sys.executable, "-m", "infantino.edge_runtime.cli", "annotate", "--state-dir", str(state), "--port", str(port),
                                 "--no-face-detect", "--threads", "1"], stdout=out, stderr=out, cwd=REPO, env=ENV)
    base = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(base + "api/state", timeout=2).read()
            return page, base
        except OSError:
            assert page.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
    page.kill()
    raise AssertionError("the annotation page did not come up")


def _csrf(opener, base: str) -> str:
    html = opener.open(base, timeout=30).read().decode()
    return html.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]


def _flat(layers) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in layers])


@pytest.fixture()
def sync_server(tmp_path, tiny_package_dir):
    from server_helpers import Server

    with Server(tmp_path, tiny_package_dir) as srv:
        yield srv


def test_the_page_keeps_the_head_sync_adopted_and_sync_never_uploads_its_undoing(sync_server, tmp_path, tiny_package_dir):
    from server_helpers import free_port, new_device, teach

    from infantino.edge_runtime.sync.client import sync_device

    # Prepare: a synced device with three queued frames, its caregiver page in its own process
    model, state = tmp_path / "model", tmp_path / "state"
    shutil.copytree(tiny_package_dir, model)
    token = sync_server.token("nursery")
    setup = Device(model, state, CLI_CONFIG)
    report = sync_device(setup, sync_server.url, token)
    assert report.error is None, report
    queued = [setup.queue.add(face(k, seed=40 + k), predicted="neutral", uncertainty=0.9, probabilities=[1 / 7] * 7,
                              face_found=True) for k in range(3)]
    page, base = _start_page(state, free_port(), tmp_path / "page.log")
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    try:
        csrf = _csrf(opener, base)
        assert _page_post(opener, base, "api/label", {"id": queued[0], "label": "happy"}, csrf)["outcome"] == "learned"
        seen = Device(None, state, CLI_CONFIG)
        before_sync, adoptions = seen.head.weights(), seen.counters["adopted"]
        # another camera's learning becomes the next global head
        other = new_device(tmp_path, tiny_package_dir, "other")
        sync_device(other, sync_server.url, sync_server.token("other"))
        teach(other, [0, 1, 2, 3, 4, 5], seed=7)
        sync_device(other, sync_server.url, sync_server.token("other"))
        assert sync_server.aggregate()["aggregated"]
        # Execute: `infantino-edge sync` in its own process adopts it, then the page labels again
        run = _edge("sync", "--server", sync_server.url, "--token", token, "--state-dir", str(state), "--no-face-detect",
                    "--threads", "1", "--json")
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["head_changed"]
        adopted = SyncState(state).reference().layers
        second = _page_post(opener, base, "api/label", {"id": queued[1], "label": "sad"}, csrf)
        assert second["outcome"] in ("learned", "kept for the guard")
        assert second["status"]["counters"]["adopted"] == adoptions + 1  # the page's device saw the adoption
    finally:
        page.terminate()
        page.wait(timeout=30)
    # Assert: the state kept the adopted head (learning continues from it), and no label was lost
    device = Device(None, state, CLI_CONFIG)
    assert device.counters["labels"] == 2 and device.counters["from_queue"] == 2 and device.counters["adopted"] == adoptions + 1
    for anchor, ref in zip(device.anchor_weights, adopted):
        np.testing.assert_allclose(anchor, ref, atol=1e-6)
    # the next upload is the page's one new label, not the undoing of everyone else's learning
    report = sync_device(device, sync_server.url, token)
    assert report.error is None and report.pushed == 1, report
    sent = sorted((SyncState(state).root / "sent").glob("*.npz"))[-1]
    meta, arrays = wire.decode(SyncState.body(sent))
    delta = _flat(wire.dict_to_layers(arrays, len(adopted) // 2))  # coefs and intercepts per layer
    undo = _flat(before_sync) - _flat(adopted)
    cosine = float(delta @ undo / (np.linalg.norm(delta) * np.linalg.norm(undo)))
    assert meta["n_samples"] == 1 and cosine < 0.5, cosine
    assert np.linalg.norm(delta) < np.linalg.norm(undo)


def test_an_idle_device_sees_what_another_process_saved(tiny_package_dir, tmp_path):
    # Prepare: a device opened long ago; another process learns twice meanwhile
    state = tmp_path / "state"
    idle = open_device(tiny_package_dir, state)
    frame = tmp_path / "frame.png"
    Image.fromarray(face(2, seed=2)).save(frame)
    for label in ("fear", "sad"):
        run = _edge("learn", str(frame), "--label", label, "--model-dir", str(tiny_package_dir), "--state-dir", str(state),
                    "--no-face-detect", "--threads", "1")
        assert run.returncode == 0, run.stderr
    saved = open_device(tiny_package_dir, state)
    # Execute: the idle device predicts, then learns
    idle.predict(face(3, seed=3), enqueue=False)
    seen, head = dict(idle.counters), [w.copy() for w in idle.head.weights()]
    idle.learn(face(4, seed=4), "happy")
    # Assert: it predicted with the newest head and learned on top of it
    assert seen["labels"] == 2 and seen["predictions"] == 1
    for a, b in zip(head, saved.head.weights()):
        np.testing.assert_array_equal(a, b)
    after = open_device(tiny_package_dir, state)
    assert idle.counters["labels"] == after.counters["labels"] == 3
    assert after.counters["predictions"] == 1  # its unsaved prediction count was kept


def test_unsaved_changes_are_never_written_over_another_process_s_save(tiny_package_dir, tmp_path):
    state = tmp_path / "state"
    offline = open_device(tiny_package_dir, state, autosave=False)
    offline.learn(face(1), "sad")  # learned, not saved
    other = open_device(tiny_package_dir, state)
    other.learn(face(2), "fear")  # saved
    with pytest.raises(StateConflict, match="unsaved changes"):
        offline.save()
    with pytest.raises(StateConflict, match="unsaved changes"):
        offline.learn(face(3), "happy")
    assert open_device(tiny_package_dir, state).counters["labels"] == 1  # the saved label is intact


def test_a_device_on_an_older_package_refuses_after_another_process_moved_the_folder(tiny_package_dir, tmp_path):
    from infantino.edge_runtime.core.package import Manifest, read_manifest, write_manifest

    state = tmp_path / "state"
    old = open_device(tiny_package_dir, state)
    old.learn(face(1), "sad")
    pkg = tmp_path / "pkg2"
    shutil.copytree(tiny_package_dir, pkg)
    write_manifest(pkg, Manifest(**{**read_manifest(pkg).__dict__, "version": "tiny-2"}))
    new = open_device(pkg, state)
    new.learn(face(2), "fear")
    with pytest.raises(StateConflict, match="model package tiny-2"):
        old.learn(face(3), "happy")
    assert open_device(pkg, state).counters["labels"] == 1 and open_device(pkg, state).package.version == "tiny-2"
