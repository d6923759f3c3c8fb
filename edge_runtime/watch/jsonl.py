"""Append-only JSON-lines files that survive a kill -9 or a power cut.

Each record is one ``write`` of one line, flushed to the kernel at once (a killed process
loses nothing written), and ``fdatasync``'d every ``fsync_every_s`` seconds (0: every line,
so a power cut loses at most the line being written). A crash can still leave a torn last
line; readers skip any line that is not a JSON object, and a writer that reopens such a file
first ends the torn line, so the next record starts clean.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, Iterator, Optional

TAIL_BYTES = 256 * 1024


class AppendLog:
    """One JSON-lines file opened for appending."""

    def __init__(self, path: str | os.PathLike, fsync_every_s: float = 0.0):
        self.path = Path(path)
        self.fsync_every_s = fsync_every_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: Optional[IO[bytes]] = open(self.path, "ab")
        self._last_sync = time.monotonic()
        self._unsynced = False
        self._end_torn_line()

    def _end_torn_line(self) -> None:
        size = self.path.stat().st_size
        if size == 0:
            return
        with open(self.path, "rb") as fh:
            fh.seek(size - 1)
            if fh.read(1) != b"\n":
                self._fh.write(b"\n")  # the torn record stays unparsable; the next one starts on its own line
                self._fh.flush()

    def append(self, record: dict) -> int:
        """Write one record; returns its size in bytes."""
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
        self._fh.write(line)
        self._fh.flush()
        self._unsynced = True
        if time.monotonic() - self._last_sync >= self.fsync_every_s:
            self.sync()
        return len(line)

    def sync(self) -> None:
        """Make what was appended durable (fdatasync)."""
        if self._fh is not None and self._unsynced:
            os.fdatasync(self._fh.fileno())
            self._unsynced = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fh is not None:
            self.sync()
            self._fh.close()
            self._fh = None


def read_records(path: str | os.PathLike, tail_bytes: Optional[int] = None) -> Iterator[dict]:
    """The JSON objects of a file (only its last ``tail_bytes`` when given), skipping torn lines."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return
    with fh:
        if tail_bytes is not None:
            size = os.fstat(fh.fileno()).st_size
            if size > tail_bytes:
                fh.seek(size - tail_bytes)
                fh.readline()  # most likely the middle of a line
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def last_record(path: str | os.PathLike) -> Optional[dict]:
    """The file's last complete record (reads only its tail)."""
    last = None
    for rec in read_records(path, tail_bytes=16 * 1024):
        last = rec
    return last
