"""Alerts leave the frame loop in two ways that cannot slow it down.

``EventLog``: ``<state>/watch/events.jsonl``, one fsync'd line per event (alerts are rare;
each must survive a power cut). Bounded: past ``max_bytes`` it becomes ``events.1.jsonl``.

``AlertHook``: the operator's ``--on-alert CMD`` (split like a shell would, no shell; use
``sh -c '...'`` for pipes), run in its own thread with the event as JSON on stdin and a
timeout. A caregiver would rather be told than read a log, so a hook that fails is logged
and the next alert tries again; hooks that pile up past ``max_pending`` are dropped (and
counted), never queued without bound.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shlex
import subprocess
import threading
from pathlib import Path
from typing import Optional

from .jsonl import AppendLog, read_records

log = logging.getLogger("infantino.edge_runtime.watch")
EVENTS = "events.jsonl"


class EventLog:
    def __init__(self, folder: str | os.PathLike, max_bytes: int = 1 << 20):
        self.path = Path(folder) / EVENTS
        self.max_bytes = max_bytes

    def append(self, event: dict) -> None:
        if self.path.exists() and self.path.stat().st_size > self.max_bytes:
            os.replace(self.path, self.path.with_name("events.1.jsonl"))
        log_file = AppendLog(self.path, fsync_every_s=0.0)
        try:
            log_file.append(event)
        finally:
            log_file.close()

    def recent(self, since: float) -> list[dict]:
        """Events at or after ``since`` (epoch seconds), oldest first."""
        rows = list(read_records(self.path.with_name("events.1.jsonl"))) + list(read_records(self.path))
        return [e for e in rows if isinstance(e.get("t"), (int, float)) and e["t"] >= since]


class AlertHook:
    """Runs ``command`` once per event, off the caller's thread."""

    def __init__(self, command: str, timeout_s: float = 10.0, max_pending: int = 8):
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("--on-alert needs a command")
        self.timeout_s = timeout_s
        self._queue: "queue.Queue[Optional[dict]]" = queue.Queue(maxsize=max_pending)
        self.ran = self.failed = self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="watch-alert-hook", daemon=True)
        self._thread.start()

    def fire(self, event: dict) -> None:
        """Queue the hook for ``event``; never blocks."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            log.error("alert hook: %d runs waiting already, this alert's hook was dropped", self._queue.qsize())

    def close(self, timeout_s: Optional[float] = None) -> None:
        """Run what is queued (up to ``timeout_s`` in all), then stop."""
        try:
            self._queue.put(None, timeout=1.0)
        except queue.Full:
            pass
        self._thread.join(self.timeout_s * 2 if timeout_s is None else timeout_s)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            self._call(event)

    def _call(self, event: dict) -> None:
        data = (json.dumps(event) + "\n").encode()
        try:
            done = subprocess.run(self.argv, input=data, capture_output=True, timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            self.failed += 1
            log.error("alert hook %s: killed after %g s", self.argv[0], self.timeout_s)
            return
        except OSError as exc:
            self.failed += 1
            log.error("alert hook %s: %s", self.argv[0], exc)
            return
        self.ran += 1
        if done.returncode != 0:
            self.failed += 1
            tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            log.error("alert hook %s exited %d %s", self.argv[0], done.returncode, tail[0][:200])
