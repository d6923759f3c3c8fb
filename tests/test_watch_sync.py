"""The watch syncs in the background against a real server process: a server that is down then up
gets every update exactly once; a package promoted mid-run is adopted between two frames, no label lost."""
from __future__ import annotations

import contextlib
import io
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from infantino.edge_runtime.device import Device
from infantino.edge_runtime.sync.state import SyncState, managed_model_dir
from infantino.edge_runtime.watch.loop import Watch, WatchSettings
from infantino.edge_runtime.watch.sources import open_source, parse_source
from infantino.edge_runtime.watch.sync_worker import SyncSettings
from server_helpers import CONFIG, Server
from infantino.sync_server.models import promote_package
from infantino.sync_server.store import updates
from infantino.export.tiny_package import build_tiny_package, synthetic_face
from watch_helpers import frame_lines, synthetic_frames, wait_for, write_video


class Running:
    """A ``Watch`` over a looping video in a thread of this process, syncing every 0.3 s."""

    def __init__(self, model: Path, state: Path, video: Path, server: Server, name: str):
        settings = WatchSettings(fps=4, loop=True, status_every_s=0.5, exit_sync_timeout_s=20,
                                 sync=SyncSettings(server.url, server.token(name), every_s=0.3, timeout_s=3, retry_base_s=0.2))
        self.watch = Watch(Device(model, state, CONFIG), open_source(parse_source(str(video))), settings, out=io.StringIO())
        self.result: list = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.watch.run()), daemon=True)
        self.thread.start()

    @property
    def sync(self):
        return self.watch.sync.status

    def stop(self) -> None:
        self.watch.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive() and self.result == [0]


@contextlib.contextmanager
def watching(tmp_path: Path, package: Path, video: Path, name: str):
    """A real server serving ``package`` and a camera (device ``name``) watching ``video``,
    synced once; yields the camera's model folder, state folder, the server and the watch."""
    model = Path(shutil.copytree(package, tmp_path / "model"))
    state = tmp_path / "state"
    with Server(tmp_path, package) as srv:
        run = Running(model, state, video, srv, name)
        wait_for(lambda: run.sync.ok_at is not None, 60, "the first sync")
        yield model, state, srv, run


def _teach(device: Device, labels, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for y in labels:
        device.learn(synthetic_face(int(y), rng), int(y))


def _received(server: Server) -> list[tuple[str, str, int]]:
    with server.store.read() as conn:
        rows = conn.execute(select(updates.c.idempotency_key, updates.c.package_version, updates.c.n_samples)).all()
    return [tuple(r) for r in rows]


@pytest.fixture()
def video(tmp_path) -> Path:
    return write_video(tmp_path / "cam.avi", synthetic_frames(range(7), seed=4), fps=7, size=(64, 64))


def test_a_server_that_is_down_then_up_gets_every_update_exactly_once(tmp_path, tiny_package_dir, video):
    with watching(tmp_path, tiny_package_dir, video, "nursery") as (model, state, srv, run):
        caregiver = Device(managed_model_dir(state) or model, state, CONFIG)  # the page, in effect
        _teach(caregiver, [1, 2], seed=1)
        wait_for(lambda: run.sync.pushed >= 1, 60, "the first update to go up")
        # Execute: the server goes away; labels keep coming and wait in the outbox
        srv.process.kill()
        _teach(caregiver, [3, 4], seed=2)
        wait_for(lambda: run.sync.error is not None and run.sync.pending >= 1, 60, "a failed sync that queued an update")
        _teach(caregiver, [5], seed=3)
        failed = run.sync.attempts
        wait_for(lambda: run.sync.attempts >= failed + 2, 60, "two more failed attempts")
        assert run.sync.error is not None
        frames_while_down = len(frame_lines(state))
        srv.process.start()
        wait_for(lambda: run.sync.error is None and run.sync.pending == 0, 60, "the outbox to drain")
        run.stop()
        # Assert: every label went up once, in as many updates as were queued, none twice
        got = _received(srv)
        assert sum(n for _, _, n in got) == 5
        assert len({k for k, _, _ in got}) == len(got) == run.sync.pushed
        assert srv.store.counts() == {"buffered": len(got)}
        assert not SyncState(state).pending()
        assert frames_while_down > 0 and len(frame_lines(state)) > frames_while_down  # the camera never waited on the network


def test_a_package_promoted_mid_run_is_adopted_between_frames_with_no_label_lost(tmp_path, tiny_package_dir, video):
    with watching(tmp_path, tiny_package_dir, video, "upgrade") as (model, state, srv, run):
        _teach(Device(model, state, CONFIG), [0, 1, 2], seed=5)
        wait_for(lambda: run.sync.pushed >= 1, 60, "the labels to go up")
        before = len(frame_lines(state))
        # Execute: a new package is promoted while the camera runs
        promote_package(srv.store, srv.data, build_tiny_package(tmp_path / "pkg2", version="tiny-2", seed=7))
        # the device is switched in place by the sync thread; the loop notices between two frames
        wait_for(lambda: run.watch.device.package.version == "tiny-2" and run.watch.swaps >= 1, 60, "the watch to run the new package")
        assert run.thread.is_alive() and run.watch.swaps == 1
        wait_for(lambda: len(frame_lines(state)) >= before + 8, 60, "frames on the new package")
        # a label given on the new package reaches the server too
        _teach(Device(managed_model_dir(state), state, CONFIG), [3], seed=6)
        pushed = run.sync.pushed
        wait_for(lambda: run.sync.pushed > pushed, 60, "the new label to go up")
        run.stop()
        # Assert: 3 labels on tiny-1, 1 on tiny-2; the kept crops of all 4 were re-embedded into the new device's replay
        by_package = {}
        for _, version, n in _received(srv):
            by_package[version] = by_package.get(version, 0) + n
        assert by_package == {"tiny-1": 3, "tiny-2": 1}
        reopened = Device(managed_model_dir(state), state, CONFIG)
        assert reopened.package.version == "tiny-2" and len(reopened.samples) == 4 and len(reopened.replay) == 4
        lines = frame_lines(state)
        assert len(lines) > before and np.all(np.diff([r["t"] for r in lines]) > 0)  # no frame recorded twice or out of order
