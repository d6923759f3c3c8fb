"""Device sync against a real server process (gunicorn, 2 workers, loopback) with real devices."""
from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

from infantino.edge_runtime.device import Device
from infantino.edge_runtime.core.package import open_package
from infantino.edge_runtime.sync.client import DeviceLearner, sync_device
from infantino.edge_runtime.sync.merge import MergePolicy, adopt_and_replay
from infantino.edge_runtime.sync.state import SyncState, managed_model_dir
from infantino.edge_runtime.sync.transport import Http, SyncError
from server_helpers import CONFIG, Server, free_port, new_device, teach
from infantino.sync_server.models import promote_package
from infantino.export.tiny_package import build_tiny_package, synthetic_face

@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_package_dir):
    with Server(tmp_path_factory.mktemp("sync-server"), tiny_package_dir) as srv:
        yield srv


def sync(learner: DeviceLearner, server: Server, name: str, **kw):
    report = sync_device(learner, server.url, server.token(name), **kw)
    return report


def test_first_sync_installs_a_verified_package_and_sets_the_reference(server, tmp_path, tiny_package_dir):
    dev = new_device(tmp_path, tiny_package_dir, "first")
    report = sync(dev, server, "first")
    assert report.error is None, report
    assert report.package_changed and report.head_changed and report.pushed == 0
    managed = managed_model_dir(dev.device.state_dir)
    assert managed is not None and open_package(managed).version == "tiny-1"
    assert SyncState(dev.device.state_dir).reference().base_head_version == report.head_version
    again = sync(dev, server, "first")  # nothing new: a 304, nothing pushed
    assert again.error is None and not again.head_changed and again.pushed == 0 and not again.queued


def test_local_learning_goes_up_once_and_the_aggregated_head_comes_back(server, tmp_path, tiny_package_dir):
    # Prepare: a synced device learns 6 labels
    dev = new_device(tmp_path, tiny_package_dir, "learner")
    first = sync(dev, server, "learner")
    teach(dev, [0, 1, 2, 3, 4, 5], seed=1)
    local = [w.copy() for w in dev.head().weights()]
    # Execute
    pushed = sync(dev, server, "learner")
    result = server.aggregate()
    pulled = sync(dev, server, "learner")
    # Assert: one delta with n=6 went up; the new global head came back and was adopted
    assert pushed.queued and pushed.pushed == 1 and pushed.error is None
    assert result["aggregated"] and "learner" in result["devices"]
    assert pulled.head_changed and pulled.head_version == result["head_version"] > first.head_version
    assert pulled.replayed == 6 and pulled.pushed == 0  # replay is not uploaded again
    assert not any(np.allclose(a, b) for a, b in zip(local, dev.head().weights()))
    assert SyncState(dev.device.state_dir).reference().base_head_version == result["head_version"]


def test_updates_wait_in_the_outbox_while_the_server_is_down(tmp_path, tiny_package_dir):
    srv = Server(tmp_path, tiny_package_dir)
    try:
        srv.process.start()
        dev = new_device(tmp_path, tiny_package_dir, "offline")
        token = srv.token("offline")
        sync_device(dev, srv.url, token)
        teach(dev, [1, 2, 3], seed=2)
        srv.process.kill()
        # Execute: sync while the server is down (fast retries)
        report = sync_device(dev, srv.url, token, retries=2, timeout_s=2)
        # Assert: queued, kept, reported
        assert report.queued and report.pushed == 0 and report.pending == 1
        assert "unreachable after 3 tries" in report.error
        srv.process.start()
        report = sync_device(dev, srv.url, token)
        assert report.error is None and report.pushed == 1 and report.pending == 0
        # a lost acknowledgement: the same outbox entry sent again is counted once
        state = SyncState(dev.device.state_dir)
        sent = sorted((state.root / "sent").glob("*.npz"))[-1]
        shutil.copyfile(sent, state.root / "outbox" / sent.name)
        report = sync_device(dev, srv.url, token)
        assert report.pushed == 1 and report.duplicates == 1
        assert srv.store.counts() == {"buffered": 1}
    finally:
        srv.close()


def test_retries_back_off_and_give_up(tmp_path):
    delays: list[float] = []
    http = Http(f"http://127.0.0.1:{free_port()}", "t", retries=3, backoff_s=0.5, timeout_s=1, sleep=delays.append)
    with pytest.raises(SyncError, match="unreachable after 4 tries"):
        http.request("GET", "/v1/model")
    assert http.attempts == 4 and len(delays) == 3
    assert all(0.25 <= d <= 0.5 * 2 ** i for i, d in enumerate(delays)) and delays[2] >= 1.0


def test_several_devices_sync_concurrently(tmp_path, tiny_package_dir):
    srv = Server(tmp_path, tiny_package_dir, aggregate_k=3)
    try:
        srv.process.start()
        names = [f"cam{i}" for i in range(4)]
        devices = {n: new_device(tmp_path, tiny_package_dir, n) for n in names}
        tokens = {n: srv.token(n) for n in names}
        errors: list[str] = []

        def life(name: str, seed: int):
            dev = devices[name]
            rng = np.random.default_rng(seed)
            for round_ in range(3):
                teach(dev, rng.integers(0, 7, 4), seed=seed * 10 + round_)
                report = sync_device(dev, srv.url, tokens[name])
                if report.error or report.rejected:
                    errors.append(f"{name}: {report.error or report.rejected}")

        threads = [threading.Thread(target=life, args=(n, i)) for i, n in enumerate(names)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        srv.aggregate()  # what is left below K
        counts = srv.store.counts()
        assert counts == {"aggregated": 12}  # 4 devices x 3 rounds, each update exactly once
        for n in names:  # every device ends on the newest head after one more pull
            sync_device(devices[n], srv.url, tokens[n])
        assert {SyncState(devices[n].device.state_dir).reference().base_head_version for n in names} == {srv.store.serving().head_version}
    finally:
        srv.close()


def test_a_new_extractor_is_installed_and_kept_samples_are_reembedded(tmp_path, tiny_package_dir):
    srv = Server(tmp_path, tiny_package_dir)
    try:
        srv.process.start()
        dev = new_device(tmp_path, tiny_package_dir, "upgrade")
        token = srv.token("upgrade")
        sync_device(dev, srv.url, token)
        labels = np.repeat(np.arange(7), 3)
        teach(dev, labels, seed=3)
        assert len(dev.device.kept_samples()[1]) == 21
        new_pkg = build_tiny_package(tmp_path / "pkg2", version="tiny-2", seed=7)
        promote_package(srv.store, srv.data, new_pkg)
        original = dev.device
        # Execute
        report = sync_device(dev, srv.url, token, policy=MergePolicy(replay_epochs=60, batch_size=8))
        device = dev.device  # the same object, switched in place
        assert device is original and dev.device is original  # switched in place: every holder runs the new package
        # Assert: the queued update for the old package was refused, the new package is current
        assert report.error is None, report.error
        assert report.rejected and report.rejected[0][0] == 409
        assert report.package_changed and report.package_version == "tiny-2" and report.replayed == 21
        assert device.package.version == "tiny-2" and open_package(managed_model_dir(device.state_dir)).version == "tiny-2"
        # the replay buffer now holds the kept crops embedded by the *new* extractor
        from infantino.edge_runtime.core.extractor import Extractor
        from infantino.edge_runtime.core.preprocess import faces_tensor

        crops, kept = dev.device.kept_samples()
        expected = Extractor(new_pkg / "extractor.onnx")(faces_tensor(crops))
        x, y = device.replay.all()
        assert len(y) == 21
        order = np.lexsort(x.T[::-1])
        np.testing.assert_allclose(x[order], expected[np.lexsort(expected.T[::-1])], rtol=1e-4, atol=1e-5)
        # and the previous package stays for rollback
        assert SyncState(device.state_dir).package_dir("previous") is not None
        # local learning survived: the adopted head knows this nursery's faces (at least as well as the new bootstrap head)
        from infantino.edge_runtime.core.head import OnlineHead

        bootstrap = OnlineHead.load(new_pkg / "head.npz")
        before = (bootstrap.predict_proba(x).argmax(1) == y).mean()
        after = (device.head.predict_proba(x).argmax(1) == y).mean()
        assert after >= 0.95 and after >= before, (before, after)
    finally:
        srv.close()


def test_a_tampered_download_is_refused_and_the_current_package_kept(tmp_path, tiny_package_dir):
    srv = Server(tmp_path, tiny_package_dir)
    try:
        new_pkg = build_tiny_package(tmp_path / "pkg3", version="tiny-3", seed=9)
        srv.process.start()
        dev = new_device(tmp_path, tiny_package_dir, "careful")
        token = srv.token("careful")
        sync_device(dev, srv.url, token)
        before = SyncState(dev.device.state_dir).package_dir("current")
        promote_package(srv.store, srv.data, new_pkg)
        served = next(p / "extractor.onnx" for p in (srv.data / "packages").iterdir()
                      if open_package(p, verify=False).version == "tiny-3")
        served.write_bytes(served.read_bytes()[:-10] + b"0123456789")  # bit rot on the server's disk
        report = sync_device(dev, srv.url, token)
        device = dev.device  # the same object, switched in place
        assert "sha256" in report.error
        assert SyncState(device.state_dir).package_dir("current") == before and device.package.version == "tiny-1"
        assert not list((SyncState(device.state_dir).root / "packages").glob(".incoming-*"))
    finally:
        srv.close()


def test_a_device_offline_for_days_syncs_cleanly(tmp_path, tiny_package_dir):
    srv = Server(tmp_path, tiny_package_dir, env={"INFANTINO_MAX_STALENESS": "2"})
    try:
        srv.process.start()
        away, busy = new_device(tmp_path, tiny_package_dir, "away"), new_device(tmp_path, tiny_package_dir, "busy")
        sync_device(away, srv.url, srv.token("away"))
        teach(away, [0, 1, 2], seed=4)  # learned while offline, then the world moved on
        for day in range(4):
            sync_device(busy, srv.url, srv.token("busy"))
            teach(busy, [3, 4, day], seed=10 + day)
            sync_device(busy, srv.url, srv.token("busy"))
            srv.aggregate()
        report = sync_device(away, srv.url, srv.token("away"))
        assert report.error is None
        assert report.rejected and "behind" in report.rejected[0][1]  # too stale: refused, not retried forever
        assert report.head_changed and report.head_version == srv.store.serving().head_version
        assert report.pending == 0 and report.replayed == 3  # its own samples were replayed into the new head
        teach(away, [5, 6], seed=5)
        assert sync_device(away, srv.url, srv.token("away")).pushed == 1
    finally:
        srv.close()


def test_merge_policy_keeps_the_global_head_and_fits_local_samples(tiny_package_dir):
    from infantino.edge_runtime.core.head import OnlineHead
    from infantino.edge_runtime.core.preprocess import faces_tensor
    from infantino.edge_runtime.core.extractor import Extractor

    global_head = OnlineHead.load(tiny_package_dir / "head.npz")
    rng = np.random.default_rng(11)
    labels = np.array([2, 2, 2, 5, 5, 5, 2, 5])
    faces = [synthetic_face(int(y), rng) for y in labels]
    x = Extractor(tiny_package_dir / "extractor.onnx")(faces_tensor(faces))
    flipped = (labels == 2) * 5 + (labels == 5) * 2  # this nursery labels them the other way round
    merged = adopt_and_replay(global_head, x, flipped, MergePolicy(replay_epochs=40, batch_size=8))
    before = (global_head.predict_proba(x).argmax(1) == flipped).mean()
    after = (merged.predict_proba(x).argmax(1) == flipped).mean()
    assert after > before and after >= 0.75
    assert merged.version == global_head.version  # still based on that global version
    unchanged = adopt_and_replay(global_head, None, None)
    for a, b in zip(unchanged.weights(), global_head.weights()):
        np.testing.assert_array_equal(a, b)


def test_the_edge_cli_syncs_and_refuses_a_revoked_token(server, tmp_path, tiny_package_dir):
    import json
    import subprocess
    import sys

    from server_helpers import REPO

    model = tmp_path / "cli-model"
    shutil.copytree(tiny_package_dir, model)
    state = tmp_path / "cli-state"
    token = server.token("cli-cam")
    base = [sys.executable, "-m", "infantino.edge_runtime.cli", "sync", "--server", server.url, "--state-dir", str(state),
            "--no-face-detect", "--threads", "1"]
    run = subprocess.run(base + ["--model-dir", str(model), "--token", token, "--json"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["package_changed"] and report["error"] is None
    # from now on the device runs the package sync installed (no --model-dir needed)
    assert Device(None, state, CONFIG).package.folder.resolve() == SyncState(state).package_dir("current")
    server.store.revoke("cli-cam")
    run = subprocess.run(base + ["--token", token], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 1 and "revoked" in run.stderr and run.stderr.count("\n") == 1


def test_5xx_and_429_are_retried_other_answers_are_final():
    import http.server

    answers = [(503, {}), (429, {"Retry-After": "2"}), (200, {}), (404, {})]
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            seen.append(self.path)
            status, headers = answers[min(len(seen), len(answers)) - 1]
            body = b'{"error": "busy"}' if status != 200 else b'{"ok": true}'
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        delays: list[float] = []
        client = Http(f"http://127.0.0.1:{srv.server_address[1]}", "t", retries=4, backoff_s=0.1, sleep=delays.append)
        assert client.request("GET", "/v1/model").json() == {"ok": True}
        assert len(seen) == 3 and delays[1] == 2.0  # Retry-After honoured
        r = client.request("GET", "/v1/model")
        assert r.status == 404 and r.reason == "busy" and len(seen) == 4  # a 4xx is an answer, not retried
    finally:
        srv.shutdown()
        srv.server_close()
