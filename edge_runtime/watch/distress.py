"""Sustained distress -> one alert: a pure state machine with hysteresis (no clock, no I/O).

Frame by frame the expression model flickers (infant expressions sit between classes, and
the head is right on about half of them), so a single sad frame means nothing and a single
happy frame inside a crying fit must not end it. The monitor smooths the share of faces with
negative valence over a short window and runs a Schmitt trigger on it:

* calm -> **alert** once the share has been at or above ``enter_share`` and has not fallen
  below ``exit_share`` since, for ``alert_after_s`` seconds;
* alert -> **calm** once the share has stayed below ``exit_share`` (or no face was seen) for
  ``clear_after_s`` seconds.

Between the two thresholds nothing changes: that band is what keeps it from flapping.

``frame_negative`` turns one frame's prediction into the monitor's input; the watch loop and
``bench/distress_alerts.py`` (which measures these defaults) both call it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

from .summary import NEGATIVE, valence_of

START = "distress"
END = "distress_end"


@dataclass(frozen=True)
class DistressSettings:
    """Defaults chosen by ``bench/distress_alerts.py`` on day-long timelines of held-out infant photos
    (docs/distress-alerts.md): 94 % of fits of 60 s or more alerted, a median 66 s after they began,
    0.16 false alerts per calm day; the earlier 60 s / 10 s / 0.6 / 0.3 caught 66 %."""

    alert_after_s: float = 45.0  # sustained this long before an alert
    clear_after_s: float = 30.0  # calm this long before the alert ends
    window_s: float = 30.0  # the negative share is measured over this trailing window (its lag adds to alert_after_s)
    enter_share: float = 0.6
    exit_share: float = 0.4
    min_faces: int = 3  # fewer faces than this in the window: no judgement (counts as calm)

    def __post_init__(self) -> None:
        if not 0.0 <= self.exit_share < self.enter_share <= 1.0:
            raise ValueError("distress thresholds need 0 <= exit_share < enter_share <= 1")
        if min(self.alert_after_s, self.clear_after_s) < 0 or self.window_s <= 0 or self.min_faces < 1:
            raise ValueError("distress times must be >= 0, the window > 0 and min_faces >= 1")


def frame_negative(classes: tuple[str, ...], index: int, face_found: bool) -> Optional[bool]:
    """Whether a frame's predicted class (``classes[index]``) has negative valence; None without a face
    (a fallback crop says nothing about the expression)."""
    return valence_of(tuple(classes))[index] == NEGATIVE if face_found else None


@dataclass(frozen=True)
class DistressEvent:
    kind: str  # START or END
    t: float  # when the monitor decided
    since: float  # when the distress began (the share first reached enter_share)
    negative_share: Optional[float]  # over the window, at ``t``

    @property
    def duration_s(self) -> float:
        return self.t - self.since

    def to_dict(self) -> dict:
        share = None if self.negative_share is None else round(self.negative_share, 3)
        return {"type": self.kind, "t": round(self.t, 3), "since": round(self.since, 3),
                "duration_s": round(self.duration_s, 1), "negative_share": share}


class DistressMonitor:
    """Feed ``update(t, negative)`` per analysed frame (``negative=None``: no face)."""

    def __init__(self, settings: DistressSettings = DistressSettings()):
        self.settings = settings
        self._window: deque[tuple[float, bool]] = deque()
        self._negatives = 0
        self._rising_since: Optional[float] = None
        self._active_since: Optional[float] = None
        self._calm_since: Optional[float] = None

    @property
    def active(self) -> bool:
        return self._active_since is not None

    def share(self) -> Optional[float]:
        """Negative share of the faces in the window; None with fewer than ``min_faces``."""
        n = len(self._window)
        return self._negatives / n if n >= self.settings.min_faces else None

    def update(self, t: float, negative: Optional[bool]) -> Optional[DistressEvent]:
        """One frame; returns the event it caused, if any."""
        self._slide(t, negative)
        share = self.share()
        return self._while_alert(t, share) if self.active else self._while_calm(t, share)

    def _slide(self, t: float, negative: Optional[bool]) -> None:
        if negative is not None:
            self._window.append((t, bool(negative)))
            self._negatives += int(bool(negative))
        while self._window and self._window[0][0] <= t - self.settings.window_s:
            self._negatives -= int(self._window.popleft()[1])

    def _while_calm(self, t: float, share: Optional[float]) -> Optional[DistressEvent]:
        s = self.settings
        if share is not None and share >= s.enter_share:
            if self._rising_since is None:
                self._rising_since = t
        elif share is None or share < s.exit_share:
            self._rising_since = None
        if self._rising_since is not None and t - self._rising_since >= s.alert_after_s:
            self._active_since, self._calm_since = self._rising_since, None
            return DistressEvent(START, t, self._rising_since, share)
        return None

    def _while_alert(self, t: float, share: Optional[float]) -> Optional[DistressEvent]:
        if share is not None and share >= self.settings.exit_share:
            self._calm_since = None
            return None
        if self._calm_since is None:
            self._calm_since = t
        if t - self._calm_since < self.settings.clear_after_s:
            return None
        since = self._active_since
        self._active_since = self._rising_since = self._calm_since = None
        return DistressEvent(END, t, since, share)
