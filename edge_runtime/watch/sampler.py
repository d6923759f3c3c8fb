"""Which frames to analyse: ``fps`` samples per second of the source's own clock.

Pure and drift-free: the next sample time advances by exactly one period per sample (so
2 fps over a 25 fps video takes frames 0, 12/13, 25 ... and never slides), but never falls
more than a period behind the source (a stall or a slow source does not cause a burst).
"""
from __future__ import annotations

from typing import Optional


class Sampler:
    """``due(t)`` for each frame's time ``t`` (seconds, any origin, non-decreasing)."""

    def __init__(self, fps: float, tolerance_s: float = 0.0):
        if not fps > 0:
            raise ValueError("--fps must be above 0")
        self.period = 1.0 / fps
        self.tolerance = max(0.0, min(tolerance_s, self.period / 2))  # half a source frame absorbs timestamp rounding
        self._next: Optional[float] = None

    def due(self, t: float) -> bool:
        """Whether the frame at ``t`` is sampled (and, if so, move on to the next one)."""
        if self._next is not None and t < self._next - self.tolerance:
            return False
        base = t if self._next is None else self._next
        self._next = max(base + self.period, t + self.period - self.tolerance)
        return True

    def reset(self) -> None:
        """Forget the schedule (a reopened stream restarts its clock)."""
        self._next = None
