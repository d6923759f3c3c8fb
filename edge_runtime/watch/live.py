"""What the caregiver page shows of a running watch, read back from its files (no Flask here).

The page is another process (``infantino-edge annotate``); the watch writes plain files in
``<state>/watch/``, so the page needs no connection to it and works while the watch restarts.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from . import WATCH_DIR
from .distress import END, START
from .events import EventLog
from .jsonl import last_record, read_records
from .status import STATUS_FILE
from .timeline import DAY_FILE, day_of, minutes_path

LIVE_AFTER_S = 30.0  # a last frame older than this: the camera is not being watched now


def watch_folder(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / WATCH_DIR


def snapshot(state_dir: str | os.PathLike, hours: float = 6.0, now: Optional[float] = None) -> dict:
    """Current expression, per-minute summaries and events of the last ``hours``, the watch's status."""
    folder = watch_folder(state_dir)
    now = time.time() if now is None else now
    since = now - hours * 3600
    current = _current(folder, now)
    running = bool(current and current["age_s"] <= LIVE_AFTER_S)
    events = EventLog(folder).recent(since)
    alerts = [e for e in events if e.get("type") in (START, END)]
    return {"running": running, "current": current, "alert_active": running and bool(alerts) and alerts[-1]["type"] == START,
            "minutes": _minutes(folder, since, now), "events": events, "status": _status(folder)}


def _current(folder: Path, now: float) -> Optional[dict]:
    frames = sorted(p for p in folder.glob("frames-*.jsonl") if DAY_FILE.match(p.name)) if folder.is_dir() else []
    last = last_record(frames[-1]) if frames else None
    if last is None or not isinstance(last.get("t"), (int, float)):
        return None
    return {**last, "age_s": round(now - last["t"], 1)}


def _minutes(folder: Path, since: float, now: float) -> list[dict]:
    days = sorted({day_of(t) for t in (since, now)} | {day_of(since + k * 86400) for k in range(int((now - since) // 86400) + 1)})
    by_minute: dict[int, dict] = {}
    for day in days:
        for rec in read_records(minutes_path(folder, day)):
            t = rec.get("t")
            if isinstance(t, (int, float)) and since <= t <= now:
                by_minute[int(t)] = rec  # a later line for the same minute replaces a partial one
    return [by_minute[t] for t in sorted(by_minute)]


def _status(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
