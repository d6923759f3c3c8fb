"""A generic outbox worker: hand the store's pending outbox rows, in order, to a recorder.

Promotions, rounds and publish decisions write a ``tracking_outbox`` row inside their own
transaction; one background thread per process drains them. A lease in the store lets
only one process drain at a time; the first failure stops a pass (order matters), keeps
the error on the row and the worker retries with jittered exponential backoff
(``infantino.edge_runtime.core.backoff``), unless the recorder's ``permanent(exc)`` says the row
itself can never be recorded (MLflow refusing a value, a row whose data is gone): that row
is set aside as a dead letter (done, its error kept, counted in ``status`` and ``/metrics``)
and the pass carries on, so one poison row delays the others by nothing but itself. The worker knows nothing of what recording means:
``record(item)`` does it (``tracking.MlflowRecorder``), ``after_pass()`` runs after a pass
that recorded something.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

from infantino.edge_runtime.core.backoff import backoff_delay

from . import store as st

log = logging.getLogger("infantino.server")

Record = Callable[[dict], None]


def never(_exc: BaseException) -> bool:
    return False


def _dead(n: int) -> dict:
    """``{"dead": n}`` for a pass that set rows aside, nothing otherwise."""
    return {"dead": n} if n else {}


@dataclass(frozen=True)
class WorkerSettings:
    lease: str = "tracking"  # the store lease that makes one process the drainer
    poll_s: float = 5.0  # between passes while all is well
    max_backoff_s: float = 120.0  # the longest wait after failures
    max_items: int = 100  # rows per pass
    lease_s: float = 300.0
    what: str = "MLflow logging"  # what recording is called in the log lines


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


class OutboxWorker:
    def __init__(self, store: st.Store, record: Record, *, after_pass: Optional[Callable[[], None]] = None,
                 settings: WorkerSettings = WorkerSettings(), permanent: Callable[[BaseException], bool] = never):
        self.store = store
        self.record = record
        self.permanent = permanent  # whether a recorder's error is the row's own (set aside) rather than the backend's
        self.after_pass = after_pass
        self.settings = settings
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.last_error: Optional[str] = None
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pid: Optional[int] = None
        self._drain_lock = threading.Lock()
        self._stop = False

    # ------------------------------------------------------------ background
    def start(self) -> None:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._thread = threading.Thread(target=self._loop, name="infantino-tracking", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    def next_wait(self, failures: int) -> float:
        """``poll_s`` while all is well; after failures, backoff from ``poll_s`` up to ``max_backoff_s``."""
        if failures == 0:
            return self.settings.poll_s
        return backoff_delay(failures, self.settings.poll_s, max(self.settings.poll_s, self.settings.max_backoff_s),
                             spread=(0.8, 1.2))

    def _loop(self) -> None:
        failures = 0
        while not self._stop:
            try:
                result = self.drain()
                failures = failures + 1 if result.get("error") else 0
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                failures += 1
                self.last_error = one_line(exc)
            self._wake.wait(self.next_wait(failures))
            self._wake.clear()

    # ------------------------------------------------------------ draining
    def drain(self, max_items: Optional[int] = None, lease_s: Optional[float] = None) -> dict:
        """Record pending outbox rows in order; stops at the first failure. Returns counts."""
        if not self._drain_lock.acquire(blocking=False):
            return {"logged": 0, "skipped": "busy in this process"}
        try:
            lease_s = self.settings.lease_s if lease_s is None else lease_s
            try:
                if not self.store.pending_outbox(1):
                    return {"logged": 0}  # nothing to do: no lease, no write
                if not self.store.acquire_lease(self.settings.lease, self.owner, lease_s):
                    return {"logged": 0, "skipped": "another process holds the tracking lease"}
            except st.StoreBusy as exc:
                return {"logged": 0, "error": one_line(exc)}
            try:
                return self._pass(self.settings.max_items if max_items is None else max_items, lease_s)
            finally:
                try:
                    self.store.release_lease(self.settings.lease, self.owner)
                except st.StoreError:
                    pass
        finally:
            self._drain_lock.release()

    def _pass(self, max_items: int, lease_s: float) -> dict:
        """One pass under the lease: each pending row recorded and marked done, the lease renewed."""
        logged = dead = 0
        try:
            pending = self.store.pending_outbox(max_items)
            for item in pending:
                try:
                    self.record(item)
                except Exception as exc:  # noqa: BLE001 - a recorder's errors are many and varied
                    error = one_line(exc)
                    if self._is_permanent(exc):
                        log.warning("%s of %s %s set aside (it can never succeed; dead letter): %s", self.settings.what,
                                    item["kind"], item["ref"], error)
                        self.store.outbox_dead(item["id"], error)
                        dead += 1
                        continue
                    self.last_error = error
                    log.warning("%s of %s %s failed (will retry): %s", self.settings.what, item["kind"], item["ref"], error)
                    self.store.outbox_failed(item["id"], error)
                    return {"logged": logged, **_dead(dead), "error": error, "pending": len(pending) - logged - dead}
                self.store.outbox_done(item["id"])
                logged += 1
                self.store.acquire_lease(self.settings.lease, self.owner, lease_s)
            if logged and self.after_pass is not None:  # only after a change on the server
                self.after_pass()
            self.last_error = None
            return {"logged": logged, **_dead(dead)}
        except Exception as exc:  # noqa: BLE001
            self.last_error = one_line(exc)
            return {"logged": logged, **_dead(dead), "error": self.last_error}

    def _is_permanent(self, exc: BaseException) -> bool:
        try:
            return bool(self.permanent(exc))
        except Exception:  # noqa: BLE001 - a classifier that fails: treat as the backend's, retry
            return False

    def status(self) -> dict:
        pending = self.store.pending_outbox(1000)
        return {"pending": len(pending), "dead": self.store.dead_outbox(),
                "last_error": self.last_error or (pending[0]["last_error"] if pending else None)}
