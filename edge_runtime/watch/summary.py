"""Per-minute summaries of the timeline: what a caregiver (or a chart) wants from 120 frames.

Shares are over the frames in which a face was found (a frame with no face says nothing
about the expression); valence follows ``infantino.edge_runtime.core.metrics`` (happy positive; angry,
disgust, fear, sad negative; surprise and neutral neutral), mapped by class name so a
package with its classes in another order is still summarised right.
"""
from __future__ import annotations

import time
from functools import lru_cache
from typing import Optional, Sequence

from ..core.metrics import VALENCE_NAMES, VALENCE_OF_CLASS
from ..core.preprocess import CLASSES

NEUTRAL = VALENCE_NAMES.index("neutral")
NEGATIVE = VALENCE_NAMES.index("negative")


_KNOWN = {name: int(v) for name, v in zip(CLASSES, VALENCE_OF_CLASS)}


@lru_cache(maxsize=8)
def valence_of(classes: tuple[str, ...]) -> tuple[int, ...]:
    """Valence index (into ``VALENCE_NAMES``) of each of ``classes``; an unknown name is neutral."""
    return tuple(_KNOWN.get(c, NEUTRAL) for c in classes)


def minute_of(t: float) -> int:
    """The epoch second at which ``t``'s minute starts."""
    return int(t // 60) * 60


def minute_label(start: int) -> str:
    """``YYYY-MM-DDTHH:MM`` in local time, for people reading the file."""
    return time.strftime("%Y-%m-%dT%H:%M", time.localtime(start))


class MinuteSummary:
    """Counts for one minute, by class name (a package switched mid-minute may order its classes
    otherwise, or have others); ``to_record`` turns them into the JSON line."""

    def __init__(self, start: int, classes: Sequence[str]):
        self.start = int(start)
        self.frames = 0
        self.faces = 0
        self.counts = {c: 0 for c in classes}  # the package's classes first, in its order
        self.valence_counts = [0] * len(VALENCE_NAMES)
        self.alerts = 0
        self.queued = 0
        self.skipped = 0  # sampled frames that could not be read

    def add(self, label: Optional[str], queued: bool = False) -> None:
        """One analysed frame: the predicted class name, or None when no face was found."""
        self.frames += 1
        self.queued += int(queued)
        if label is None:
            return
        self.faces += 1
        self.counts[label] = self.counts.get(label, 0) + 1
        self.valence_counts[_KNOWN.get(label, NEUTRAL)] += 1

    def to_record(self, partial: bool = False) -> dict:
        faces = max(self.faces, 1)
        rec = {"minute": minute_label(self.start), "t": self.start, "frames": self.frames, "faces": self.faces,
               "expressions": {c: round(n / faces, 3) for c, n in self.counts.items()},
               "valence": {v: round(n / faces, 3) for v, n in zip(VALENCE_NAMES, self.valence_counts)},
               "queued": self.queued, "alerts": self.alerts}
        if self.skipped:
            rec["skipped"] = self.skipped
        if partial:
            rec["partial"] = True  # written at a clean exit before the minute ended
        return rec
