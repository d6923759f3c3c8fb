"""One log line per database outage, not a traceback per request.

With PostgreSQL down, every request of every device fails the same way (532 tracebacks in
15 s, issue 20). Each answer is a 503 with ``Retry-After``; the log says it once when the
store becomes unavailable, then at most once every ``every_s`` with how many requests were
refused meanwhile, and once more when a request finds it back.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

log = logging.getLogger("infantino.server")

RETRY_AFTER_S = 5  # what a 503 tells the client to wait; the device's own backoff takes over after that


class OutageLog:
    """Rate-limited warnings about an unavailable store, per process."""

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self.clock = clock
        self.refused = 0  # since the last line
        self.since: Optional[float] = None  # when this outage was first seen
        self._last_line = float("-inf")
        self._lock = threading.Lock()

    def failed(self, reason: str) -> bool:
        """Count one refused request; True when this call wrote a log line."""
        with self._lock:
            now = self.clock()
            self.refused += 1
            first = self.since is None
            if first:
                self.since = now
            if not first and now - self._last_line < self.every_s:
                return False
            self._last_line = now
            n, self.refused = self.refused, 0
        if first:
            log.warning("store unavailable, answering 503 until it is back: %s", reason)
        else:
            log.warning("store still unavailable (%d requests answered 503 in the last %.0f s): %s", n, self.every_s, reason)
        return True

    def ok(self) -> None:
        """A request reached the store: end the outage (one line if there was one)."""
        if self.since is None:
            return
        with self._lock:
            if self.since is None:
                return
            lasted, self.since, n, self.refused = self.clock() - self.since, None, self.refused, 0
        log.warning("store available again after %.1f s (%d more requests answered 503)", lasted, n)
