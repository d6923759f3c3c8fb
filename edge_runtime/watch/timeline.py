"""The camera's timeline on disk: one line per analysed frame, one summary per minute.

``<state>/watch/frames-YYYY-MM-DD.jsonl`` and ``minutes-YYYY-MM-DD.jsonl`` (local days):
append-only (``jsonl``), a new pair each day, days older than ``keep_days`` deleted, and
the oldest days go first when all of them pass ``max_bytes``. A frame line is
``{"t", "face", "label", "p", "u", "q"}`` (time, face found, prediction, probabilities in the
package's class order, uncertainty, queued id); a frame without a face is ``{"t", "face"}``;
a sampled frame that could not be read (unreadable, truncated, oversized) is ``{"t", "skipped"}``
with the reason, and counted in its minute's ``skipped``.

A minute's summary is written when its first later frame arrives. After a crash the minute
in progress is rebuilt from the frame lines (they are on disk), so a kill -9 loses no
summary. A clean exit writes the unfinished minute with ``"partial": true``; a later line
for the same minute replaces it (readers keep the last line per minute).
"""
from __future__ import annotations

import datetime as dt
import os
import re
import time
from pathlib import Path
from typing import Optional, Sequence

from .jsonl import TAIL_BYTES, AppendLog, last_record, read_records
from .summary import MinuteSummary, minute_of

DAY_FILE = re.compile(r"^(frames|minutes)-(\d{4}-\d{2}-\d{2})\.jsonl$")


def day_of(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(t))


def frames_path(folder: Path, day: str) -> Path:
    return folder / f"frames-{day}.jsonl"


def minutes_path(folder: Path, day: str) -> Path:
    return folder / f"minutes-{day}.jsonl"


class Timeline:
    """Writes the timeline; one writer per state folder (the watch loop)."""

    def __init__(self, folder: str | os.PathLike, classes: Sequence[str], *, keep_days: int = 7,
                 fsync_every_s: float = 0.0, max_bytes: Optional[int] = None):
        if keep_days < 1:
            raise ValueError("--keep-days must be at least 1")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.classes = tuple(classes)
        self.keep_days = keep_days
        self.fsync_every_s = fsync_every_s
        self.max_bytes = max_bytes
        self.bytes_written = 0
        self._day: Optional[str] = None
        self._frames: Optional[AppendLog] = None
        self._minute: Optional[MinuteSummary] = None
        self._recover()

    # ------------------------------------------------------------ writing
    def record(self, t: float, face_found: bool, label_index: int, probabilities: Sequence[float], uncertainty: float,
               queued_id: Optional[str] = None, classes: Optional[Sequence[str]] = None) -> Optional[dict]:
        """One analysed frame (``label_index`` and ``probabilities`` in ``classes``' order, by default the
        timeline's); returns the summary of a minute it closed, if any."""
        finished = self._roll(t)
        self._open_day(day_of(t))
        rec: dict = {"t": round(t, 2), "face": bool(face_found)}
        if face_found:
            name = (self.classes if classes is None else classes)[label_index]
            rec.update(label=name, p=[round(float(p), 3) for p in probabilities], u=round(float(uncertainty), 3))
        if queued_id:
            rec["q"] = queued_id
        self.bytes_written += self._frames.append(rec)
        self._count(rec)
        return finished

    def record_skip(self, t: float, reason: str) -> None:
        """A sampled frame that could not be read: a line with the reason, counted in its minute."""
        self._roll(t)
        self._open_day(day_of(t))
        rec = {"t": round(t, 2), "skipped": str(reason)[:200]}
        self.bytes_written += self._frames.append(rec)
        self._count(rec)

    def switch_classes(self, classes: Sequence[str]) -> None:
        """The camera now runs a package with another class layout: frames are named by it from now
        on; the minute in progress keeps counting by name."""
        self.classes = tuple(classes)

    def mark_alert(self, t: float) -> None:
        """An alert started at ``t``: counted in its minute's summary."""
        self._roll(t)
        self._minute.alerts += 1

    def close(self) -> None:
        """A clean exit: the unfinished minute is written as partial, files synced and closed."""
        if self._minute is not None and (self._minute.frames or self._minute.skipped):
            self._write_minute(self._minute.to_record(partial=True))
        self._minute = None
        if self._frames is not None:
            self._frames.close()
            self._frames = None

    # ------------------------------------------------------------ minutes
    def _count(self, rec: dict) -> None:
        if "skipped" in rec:
            self._minute.skipped += 1
            return
        label = rec.get("label")
        self._minute.add(str(label) if rec.get("face") and label is not None else None, queued=bool(rec.get("q")))

    def _roll(self, t: float) -> Optional[dict]:
        """Start ``t``'s minute; write and return the previous one when ``t`` left it."""
        start = minute_of(t)
        if self._minute is not None and self._minute.start == start:
            return None
        finished = None
        if self._minute is not None and (self._minute.frames or self._minute.alerts or self._minute.skipped):
            finished = self._minute.to_record()
            self._write_minute(finished)
        self._minute = MinuteSummary(start, self.classes)
        return finished

    def _write_minute(self, rec: dict) -> None:
        log = AppendLog(minutes_path(self.folder, day_of(rec["t"])), fsync_every_s=0.0)
        try:
            self.bytes_written += log.append(rec)
        finally:
            log.close()

    # ------------------------------------------------------------ days
    def _open_day(self, day: str) -> None:
        if day == self._day and self._frames is not None:
            return
        if self._frames is not None:
            self._frames.close()
        self._frames = AppendLog(frames_path(self.folder, day), self.fsync_every_s)
        self._day = day
        self.prune(day)

    def prune(self, today: str) -> list[Path]:
        """Delete days older than ``keep_days``, then the oldest while over ``max_bytes``; returns what went."""
        cutoff = (dt.date.fromisoformat(today) - dt.timedelta(days=self.keep_days - 1)).isoformat()
        days: dict[str, list[Path]] = {}
        for p in self.folder.iterdir():
            m = DAY_FILE.match(p.name)
            if m:
                days.setdefault(m.group(2), []).append(p)
        gone = [p for day, paths in days.items() if day < cutoff for p in paths]
        kept = sorted(day for day in days if day >= cutoff)
        if self.max_bytes is not None:
            size = {day: sum(p.stat().st_size for p in days[day]) for day in kept}
            while len(kept) > 1 and sum(size[d] for d in kept) > self.max_bytes and kept[0] != today:
                gone += days[kept.pop(0)]
        for p in gone:
            p.unlink(missing_ok=True)
        return gone

    # ------------------------------------------------------------ recovery
    def _recover(self) -> None:
        """Rebuild the minute in progress (and any not yet summarised) from the newest frame file."""
        frame_files = sorted(p for p in self.folder.glob("frames-*.jsonl") if DAY_FILE.match(p.name))
        if not frame_files:
            return
        newest = frame_files[-1]
        day = DAY_FILE.match(newest.name).group(2)
        last = last_record(minutes_path(self.folder, day))
        done = -1 if last is None else int(last.get("t", -1)) - (60 if last.get("partial") else 0)
        for rec in read_records(newest, tail_bytes=TAIL_BYTES):
            t = rec.get("t")
            if isinstance(t, (int, float)) and minute_of(t) > done:
                self._roll(float(t))
                self._count(rec)
