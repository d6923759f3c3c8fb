"""The state folder's writer lock: re-entrant, one per folder per process, exclusive across processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import REPO
from infantino.edge_runtime.state_lock import StateLock, StateLockTimeout

HOLDER = textwrap.dedent("""
    import sys, time
    from infantino.edge_runtime.state_lock import StateLock
    with StateLock.of(sys.argv[1]).hold():
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _holder(folder, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_one_lock_per_folder_and_re_entrant(tmp_path):
    (tmp_path / "state").mkdir()
    os.symlink(tmp_path / "state", tmp_path / "alias")
    lock = StateLock.of(tmp_path / "state")
    assert StateLock.of(tmp_path / "alias") is lock and StateLock.of(tmp_path / "other") is not lock
    with lock.hold():
        with StateLock.of(tmp_path / "alias").hold(timeout_s=0.1):  # nested: no deadlock
            assert lock.held
        assert lock.held
    assert not lock.held


def test_another_process_waits_for_the_lock_and_times_out_with_one_line(tmp_path):
    proc = _holder(tmp_path, 1.5)
    try:
        start = time.monotonic()
        with pytest.raises(StateLockTimeout, match="is busy: another process has held its lock for over 0.3 s"):
            with StateLock.of(tmp_path).hold(timeout_s=0.3):
                pass
        assert 0.3 <= time.monotonic() - start < 1.2
        with StateLock.of(tmp_path).hold(timeout_s=30):  # granted once the holder lets go
            assert proc.poll() == 0 or proc.wait(timeout=5) == 0
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_killed_holder_never_leaves_the_folder_locked(tmp_path):
    proc = _holder(tmp_path, 600)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    with StateLock.of(tmp_path).hold(timeout_s=2):
        pass


def test_threads_take_turns(tmp_path):
    lock, inside, overlaps = StateLock.of(tmp_path), [0], []

    def work():
        for _ in range(20):
            with lock.hold():
                inside[0] += 1
                overlaps.append(inside[0])
                time.sleep(0.001)
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(overlaps) == 80 and set(overlaps) == {1}


def test_a_forked_child_does_not_inherit_a_held_lock(tmp_path):
    lock = StateLock.of(tmp_path)
    with lock.hold():
        pid = os.fork()
        if pid == 0:  # the child: unlocked, and the parent still holds the file lock
            code = 0 if not lock.held else 1
            try:
                with lock.hold(timeout_s=0.2):
                    code = 2
            except StateLockTimeout:
                pass
            os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
