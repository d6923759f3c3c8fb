"""A one-frame hand-over between the reader thread and the frame loop: the newest frame wins.

A queue between a camera and a slower analyser grows without bound or serves stale frames;
one slot that the reader overwrites keeps memory flat and the loop always on the latest
frame. For a file played ``--fast`` the reader waits instead (``wait_empty``, then ``put``): every sampled
frame is analysed, as fast as the loop goes.
"""
from __future__ import annotations

import threading
from typing import Generic, Optional, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """Holds at most one item; ``close`` tells the taker that no more will come."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Optional[T] = None
        self._closed = False
        self.dropped = 0  # items overwritten before anyone took them

    def put(self, item: T) -> bool:
        """Store ``item``, replacing one not yet taken (counted in ``dropped``); never blocks."""
        with self._cond:
            replaced = self._item is not None
            self.dropped += int(replaced)
            self._item = item
            self._cond.notify_all()
            return replaced

    def wait_empty(self, stop: threading.Event, poll_s: float = 0.1) -> bool:
        """Wait until the slot is empty; False if ``stop`` was set or the slot closed first."""
        with self._cond:
            while self._item is not None and not self._closed and not stop.is_set():
                self._cond.wait(poll_s)
            return not (self._closed or stop.is_set())

    def take(self, timeout_s: Optional[float] = None) -> Optional[T]:
        """The item (emptying the slot), or None after ``timeout_s`` or once closed and empty."""
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout_s)
            item, self._item = self._item, None
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """No more items; a waiting ``take`` returns what is left, then None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        """Closed and empty: the taker is done."""
        with self._cond:
            return self._closed and self._item is None
