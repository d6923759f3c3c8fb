"""``QueueHistory``: a tiny bounded log of recent queued frames for the page's timeline chart (no flask here).

The device does not keep a history of its predictions, so the page records what it sees:
each queued frame (its time and predicted expression) and, once a caregiver answers, the
label. One JSON file in ``<state>/annotate/timeline.json``, rewritten atomically, at most
``max_entries`` entries (the oldest go first).
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from ..core.atomic import atomic_write_text

DEFAULT_MAX_ENTRIES = 1000


class QueueHistory:
    """The queued frames the page saw and the labels given; not the camera's ``watch.timeline.Timeline``."""

    def __init__(self, path: str | Path, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.path = Path(path)
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            rows = json.loads(self.path.read_text(encoding="utf-8"))
            return {str(r["id"]): r for r in rows if isinstance(r, dict) and "id" in r and "t" in r}
        except (OSError, ValueError, TypeError):
            return {}  # missing or unreadable: start a new log (it is only a chart)

    def record(self, items: Iterable[Any]) -> None:
        """Add queue items (``id``, ``created``, ``predicted``, ``uncertainty``) not seen yet."""
        with self._lock:
            changed = False
            for item in items:
                if item.id not in self._entries:
                    self._entries[item.id] = {"id": item.id, "t": float(item.created), "predicted": item.predicted,
                                              "uncertainty": round(float(item.uncertainty), 4), "label": None}
                    changed = True
            if changed:
                self._save()

    def label(self, item_id: str, label: str | None) -> None:
        """The caregiver's answer for a recorded frame (``None``: not a face)."""
        with self._lock:
            entry = self._entries.get(item_id)
            if entry is not None:
                entry["label"] = label if label is not None else "not a face"
                self._save()

    def recent(self, hours: float = 6.0, now: float | None = None) -> list[dict[str, Any]]:
        since = (now if now is not None else time.time()) - hours * 3600
        with self._lock:
            return sorted((dict(e) for e in self._entries.values() if e["t"] >= since), key=lambda e: e["t"])

    def _save(self) -> None:
        rows = sorted(self._entries.values(), key=lambda e: e["t"])[-self.max_entries:]
        self._entries = {r["id"]: r for r in rows}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(rows))
