"""A network camera that drops is reopened with backoff, and the watch carries on when it is back."""
from __future__ import annotations

import io
import subprocess
import sys
import threading

from edge_helpers import open_device

from conftest import TESTS
from infantino.edge_runtime.watch.loop import Watch, WatchSettings
from infantino.edge_runtime.watch.sources import open_source, parse_source
from infantino.sync_server.process import free_port
from watch_helpers import frame_lines, wait_for


def _camera(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TESTS / "mjpeg_server.py"), str(port)])


def test_a_stream_that_drops_is_reopened_and_the_watch_carries_on(tiny_package_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/stream.mjpg"
    cam = _camera(port)
    try:
        wait_for(lambda: _opens(url), 30, "the camera to serve")
        state = tmp_path / "state"
        watch = Watch(open_device(tiny_package_dir, state), open_source(parse_source(url), timeout_s=3),
                      WatchSettings(fps=4, status_every_s=60), out=io.StringIO())
        result: list = []
        thread = threading.Thread(target=lambda: result.append(watch.run()), daemon=True)
        thread.start()
        wait_for(lambda: len(frame_lines(state)) >= 4, 30, "frames from the stream")
        # Execute: the camera goes away for a while, then comes back on the same address
        cam.kill()
        cam.wait()
        wait_for(lambda: not _opens(url), 10, "the camera to be gone")
        during = len(frame_lines(state))
        cam = _camera(port)
        wait_for(lambda: watch.reader.stats.reconnects >= 1, 60, "the reader to reconnect")
        wait_for(lambda: len(frame_lines(state)) >= during + 4, 30, "frames after the reconnect")
        watch.stop.set()
        thread.join(30)
        # Assert: one watch run throughout, a clean end, frames before and after the outage
        assert result == [0] and watch.reader.error is None and watch.reader.stats.reconnects >= 1
    finally:
        cam.kill()


def _opens(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.read(10) != b""
    except OSError:
        return False
