"""The reader thread: source -> sampled RGB frames in the slot, never waiting on inference.

Live sources (camera, stream) are read as fast as they deliver, so the capture buffer never
holds stale frames; a frame is decoded into an array only when the sampler wants it. A live
source that stops delivering is closed and reopened with exponential backoff until it comes
back or the watch stops. Files and folders are played on their own clock: in real time
(sleeping until each sampled frame's moment) or, with ``fast``, as fast as the loop takes
frames; at the end they stop the watch, or start over with ``loop``.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..core.backoff import Backoff
from .sampler import Sampler
from .slot import LatestSlot
from .sources import FrameSource, SourceError

log = logging.getLogger("infantino.edge_runtime.watch")


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # RGB uint8 (H, W, 3)
    t: float  # epoch seconds: the wall clock for a live source; start + position for a file
    grabbed: float  # time.monotonic() when it was read, for frame-to-timeline latency
    index: int  # sample number since the start


@dataclass
class ReaderStats:
    grabbed: int = 0  # frames the source delivered
    sampled: int = 0  # frames handed to the loop
    undecodable: int = 0  # sampled frames that could not be read (unreadable, truncated, oversized)
    reconnects: int = 0
    passes: int = 0  # times a file or folder was played to its end
    ended_early: Optional[str] = None  # a file that delivered fewer frames than its header states


WARN_FIRST = 10  # skipped frames logged one by one; after that every ``WARN_EVERY``-th, with the count
WARN_EVERY = 100


class Reader(threading.Thread):
    """Fills ``slot`` from ``source`` until the source ends or ``stop`` is set; then closes both."""

    def __init__(self, source: FrameSource, slot: LatestSlot, fps: float, stop: threading.Event, *, fast: bool = False,
                 loop: bool = False, backoff: Optional[Backoff] = None):
        super().__init__(name="watch-reader", daemon=True)
        self.source, self.slot, self.fps, self.stop = source, slot, fps, stop
        self.fast, self.loop = fast, loop
        self.backoff = backoff or Backoff(base_s=1.0, max_s=60.0)
        self.stats = ReaderStats()
        self.error: Optional[BaseException] = None
        self.skips: collections.deque[tuple[float, str]] = collections.deque(maxlen=1024)  # (t, why) for the timeline

    def run(self) -> None:
        try:
            self._live() if self.source.spec.live else self._playback()
        except Exception as exc:  # noqa: BLE001 - reported by the loop, which owns the exit code
            self.error = exc
        finally:
            self.slot.close()
            self.source.close()

    def _hand_over(self, image: np.ndarray, t: float, grabbed: float) -> None:
        self.slot.put(Frame(image, t, grabbed, self.stats.sampled))
        self.stats.sampled += 1

    def _decoded(self, t: float) -> Optional[np.ndarray]:
        image = self.source.retrieve()
        if image is None:
            self.stats.undecodable += 1
            why = getattr(self.source, "last_error", None) or "frame cannot be decoded"
            self.skips.append((t, why))
            n = self.stats.undecodable
            if n <= WARN_FIRST or n % WARN_EVERY == 0:
                log.warning("frame skipped (%d so far): %s", n, why)
        return image

    # ------------------------------------------------------------ files and folders
    def _playback(self) -> None:
        src_fps = self.source.fps or 25.0
        sampler = Sampler(self.fps, tolerance_s=0.5 / src_fps)
        wall0, mono0, offset, last = time.time(), time.monotonic(), 0.0, 0.0
        in_pass = 0
        while not self.stop.is_set():
            if not self.source.grab():
                if in_pass == 0:
                    raise SourceError(f"{self.source.spec.describe()} holds no frame that can be read")
                if self.stats.passes == 0:
                    self._check_complete(in_pass)
                self.stats.passes += 1
                if not self.loop:
                    return
                offset, in_pass = offset + last + 1.0 / src_fps, 0
                self.source.close()
                self.source.open()
                continue
            in_pass += 1
            self.stats.grabbed += 1
            last = self.source.position_s() or 0.0
            pos = offset + last
            if not sampler.due(pos):
                continue
            if self.fast:
                if not self.slot.wait_empty(self.stop):  # every sampled frame is analysed: wait for the loop
                    return
            elif self.stop.wait(max(0.0, mono0 + pos - time.monotonic())):  # real time: until the frame's moment
                return
            grabbed = time.monotonic()
            image = self._decoded(wall0 + pos)
            if image is not None:
                self._hand_over(image, wall0 + pos, grabbed)

    def _check_complete(self, delivered: int) -> None:
        """A video file that stops before the frame count its header states is truncated or damaged:
        say so (the watch then exits non-zero). A 2 % margin for containers that estimate the count."""
        expected = getattr(self.source, "expected_frames", lambda: None)() if self.source.spec.kind == "file" else None
        if expected and delivered + max(1, expected // 50) < expected:
            self.stats.ended_early = f"{self.source.spec.describe()} ended after {delivered} of the {expected} frames it states"
            log.warning("%s (truncated or damaged)", self.stats.ended_early)

    # ------------------------------------------------------------ cameras and streams
    def _live(self) -> None:
        sampler = Sampler(self.fps, tolerance_s=0.1 / self.fps)
        while not self.stop.is_set():
            if not self.source.grab():
                self._reopen()
                sampler.reset()
                continue
            self.stats.grabbed += 1
            now = time.monotonic()
            if not sampler.due(now):
                continue
            image = self._decoded(time.time())
            if image is not None:
                self._hand_over(image, time.time(), now)

    def _reopen(self) -> None:
        """The stream dropped: close it and retry with backoff until it is back or the watch stops."""
        what = self.source.spec.describe()
        self.source.close()
        lost = time.monotonic()
        while not self.stop.is_set():
            delay = self.backoff.next_delay()
            log.warning("%s: no frame; reopening in %.1f s", what, delay)
            if self.stop.wait(delay):
                return
            try:
                self.source.open()
            except SourceError:
                continue
            self.backoff.reset()
            self.stats.reconnects += 1
            log.warning("%s: back after %.0f s", what, time.monotonic() - lost)
            return
