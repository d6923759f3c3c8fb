"""What the watch says about itself: a line for people, a JSON line for machines, a file for the page.

Every ``status_every_s`` seconds: analysed fps over the interval, share of frames with a
face, the last expression, the caregiver queue's length, the last sync, dropped frames and
the frame-to-timeline latency. ``status.json`` in the watch folder holds the latest, so the
annotation page (another process) can tell whether the camera runs.
"""
from __future__ import annotations

import json
import os
import resource
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..core.atomic import atomic_write_text
from ..camera import describe

STATUS_FILE = "status.json"


def rss_mb() -> float:
    """Resident memory now (Linux /proc), else the peak."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StatusBoard:
    """Counts frames as the loop analyses them; ``report`` closes an interval."""

    def __init__(self, latency_window: int = 2048):
        self.frames = self.faces = self.queued = self.alerts = 0
        self.skipped = 0  # frames that could not be read or analysed (each one a warning line and a timeline line)
        self._interval_frames = self._interval_faces = 0
        self._interval_start = time.monotonic()
        self.started = time.time()
        self.last: Optional[dict] = None
        self.latency_s: deque[float] = deque(maxlen=latency_window)

    def frame(self, t: float, face: bool, label: str, probability: float, queued: bool, latency_s: float) -> None:
        self.frames += 1
        self._interval_frames += 1
        self.faces += int(face)
        self._interval_faces += int(face)
        self.queued += int(queued)
        self.latency_s.append(latency_s)
        if face:
            self.last = {"label": label, "p": round(float(probability), 3), "t": round(t, 2)}

    def latency_ms(self) -> dict:
        if not self.latency_s:
            return {"p50": None, "p95": None}
        p50, p95 = np.percentile(np.asarray(self.latency_s), [50, 95]) * 1000
        return {"p50": round(float(p50), 1), "p95": round(float(p95), 1)}

    def report(self, **extra: Any) -> dict:
        """The status record for the interval since the last one (``extra``: queue, sync, package ...)."""
        now = time.monotonic()
        span = max(now - self._interval_start, 1e-9)
        rec = {"type": "status", "t": round(time.time(), 2), "fps": round(self._interval_frames / span, 2),
               "face_share": round(self._interval_faces / self._interval_frames, 3) if self._interval_frames else None,
               "frames": self.frames, "faces": self.faces, "queued": self.queued, "alerts": self.alerts,
               "skipped": self.skipped, "last": self.last,
               "latency_ms": self.latency_ms(), "rss_mb": round(rss_mb(), 1), **extra}
        self._interval_frames = self._interval_faces = 0
        self._interval_start = now
        return rec


def human(rec: dict) -> str:
    """One line: ``watch: 2.0 fps, faces 64%, last happy 0.71, queue 3, sync 12:04 ok, ...``."""
    last = rec.get("last")
    face = "-" if rec.get("face_share") is None else f"{rec['face_share']:.0%}"
    sync = rec.get("sync")
    if not sync:
        sync_txt = "sync off"
    elif sync.get("last_at") is None:
        sync_txt = "sync pending"
    else:
        when = time.strftime("%H:%M:%S", time.localtime(sync["last_at"]))
        sync_txt = f"sync {when} " + ("ok" if not sync.get("error") else f"failed ({sync.get('pending', 0)} waiting)")
    lat = rec.get("latency_ms", {}).get("p50")
    parts = [f"{rec['fps']:.1f} fps", f"faces {face}", f"last {last['label']} {last['p']:.2f}" if last else "last -",
             f"queue {rec.get('queue', '?')}", sync_txt, f"dropped {rec.get('dropped', 0)}", f"skipped {rec.get('skipped', 0)}",
             f"latency {lat:.0f} ms" if lat is not None else "latency -", f"{rec['rss_mb']:.0f} MB"]
    if rec.get("camera"):
        parts.append(describe(rec["camera"]))
    if rec.get("alert_active"):
        parts.append("DISTRESS ALERT ACTIVE")
    return "watch: " + ", ".join(parts)


def write_status_file(folder: Path, rec: dict) -> None:
    atomic_write_text(Path(folder) / STATUS_FILE, json.dumps(rec) + "\n")
