"""One writer per state folder: a process lock around every read-modify-write of the state.

Several processes may use one device's state folder at once: the camera loop, the caregiver
page, ``infantino-edge learn`` and ``infantino-edge sync``. A change of the state reads the
snapshot it starts from, changes it and writes the next one; two changes interleaved write
over each other and a label is lost. ``StateLock`` serialises them:

* across processes with ``fcntl.flock`` on ``<state>/.lock`` (the kernel drops it when a
  process dies, so a killed writer never leaves the folder locked);
* across threads with an ``RLock``; the lock is re-entrant, and every object of one process
  naming the same folder shares one ``StateLock`` (``StateLock.of``), so a change that
  saves, or a sync that switches the device to a new package inside its change, never deadlocks.

The writer's half of the protocol (``Device.change``): take the lock, reload when the
folder's newest generation is newer than the one this object last loaded or wrote, apply
the change, save, release. Hold it for the change only, never while decoding a camera frame
or waiting on the network: other processes wait for it.

    lock = StateLock.of(state_dir)
    with lock.hold():
        ...  # reload if stale, change, save
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import IO, Iterator, Optional

LOCK_NAME = ".lock"
DEFAULT_TIMEOUT_S = 60.0  # a change takes milliseconds; a minute means a stuck process, not a busy one


class StateLockTimeout(TimeoutError):
    """Another process held the state folder's lock for longer than the timeout; nothing was changed."""


class StateLock:
    """The writer lock of one state folder; use ``StateLock.of(folder)``, not the constructor."""

    _registry: dict[str, "StateLock"] = {}
    _registry_lock = threading.Lock()

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fh: Optional[IO[bytes]] = None

    @classmethod
    def of(cls, folder: str | os.PathLike) -> "StateLock":
        """The process's one lock for ``folder`` (same real path, same lock)."""
        key = os.path.realpath(folder)
        with cls._registry_lock:
            lock = cls._registry.get(key)
            if lock is None:
                lock = cls._registry[key] = cls(Path(folder))
            return lock

    @property
    def held(self) -> bool:
        """Whether some thread of this process holds the lock now."""
        return self._depth > 0

    @contextlib.contextmanager
    def hold(self, timeout_s: Optional[float] = DEFAULT_TIMEOUT_S) -> Iterator[None]:
        """Hold the lock (re-entrant); ``StateLockTimeout`` after ``timeout_s`` (None: wait forever)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if not self._thread_lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
            raise self._timeout(timeout_s)
        try:
            if self._depth == 0:
                self._fh = self._lock_file(deadline, timeout_s)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._unlock_file()
        finally:
            self._thread_lock.release()

    def _lock_file(self, deadline: Optional[float], timeout_s: Optional[float]) -> IO[bytes]:
        """flock the lock file, polling with a short backoff so a timeout can be honoured."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+b")
        delay = 0.001
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fh
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    fh.close()
                    raise self._timeout(timeout_s) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
            except BaseException:
                fh.close()
                raise

    def _unlock_file(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fcntl.flock(fh, fcntl.LOCK_UN)
            finally:
                fh.close()

    def _timeout(self, timeout_s: Optional[float]) -> StateLockTimeout:
        return StateLockTimeout(f"state folder {self.folder} is busy: another process has held its lock for over {timeout_s:g} s")

    def _forget_after_fork(self) -> None:
        """A forked child does not hold its parent's lock: start it unlocked (never unlock the parent's)."""
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fh = None

    @classmethod
    def _after_fork_in_child(cls) -> None:
        cls._registry_lock = threading.Lock()
        for lock in cls._registry.values():
            lock._forget_after_fork()


os.register_at_fork(after_in_child=StateLock._after_fork_in_child)
