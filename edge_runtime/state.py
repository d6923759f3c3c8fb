"""The device's state folder: whole-state snapshots that survive power cuts and bit rot.

Everything a caregiver taught the device (head weights and Adam moments, replay buffer,
holdout, counters, versions) is saved as *one* file per generation,
``snapshot-<generation>.bin``, so the parts can never disagree: a head from one update
with a buffer from another is impossible. Each file is written atomically (temp file,
fsync, rename, fsync the folder) and starts with a sha256 of its payload; loading takes
the newest file whose checksum holds and warns about (and sets aside) any that do not.
The previous ``keep - 1`` generations stay as fallbacks. ``state.json`` mirrors the
counters and versions for people and tools; the snapshot is what counts. Writes take the
folder's writer lock (``state_lock``), the one a ``Device`` holds around each whole change.

Payload: an ``.npz`` of plain arrays plus a ``meta`` JSON string, read with
``allow_pickle=False``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .core import safe_npz
from .core.atomic import atomic_write_bytes, atomic_write_text
from .state_lock import StateLock

MAGIC = b"INFANTINO-STATE/1\n"
# A folder's mtime is trusted as "unchanged" only this long after it was set: longer than any file
# system's timestamp granularity (ext4 and tmpfs: a clock tick; FAT: 2 s), so two changes within one
# tick can never hide the second.
SETTLED_NS = 3_000_000_000
_NAME = re.compile(r"^snapshot-(\d{10})\.bin$")
log = logging.getLogger(__name__)


class StateError(ValueError):
    """A state file that is not a valid snapshot (torn, tampered or foreign)."""


class StateConflict(StateError):
    """Another process saved the state folder in a way this object cannot follow (unsaved changes of its
    own, another package); nothing was written, reopen the device."""


@dataclass
class Snapshot:
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    generation: int
    path: Path


def encode(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    """Header (magic, sha256 of the payload) + npz payload."""
    if "meta" in arrays:
        raise ValueError("'meta' is reserved for the JSON entry")
    buf = io.BytesIO()
    np.savez(buf, meta=np.asarray(json.dumps(meta, sort_keys=True)), **arrays)
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).hexdigest().encode("ascii") + b"\n" + payload


def decode(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of ``encode``; raises ``StateError`` on a wrong magic, checksum or payload."""
    if not data.startswith(MAGIC):
        raise StateError("not an InfantinO state file")
    digest, sep, payload = data[len(MAGIC):].partition(b"\n")
    if not sep or len(digest) != 64:
        raise StateError("truncated header")
    if hashlib.sha256(payload).hexdigest().encode("ascii") != digest:
        raise StateError("checksum mismatch")
    try:
        with safe_npz.load(payload) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (KeyError, OSError, ValueError, EOFError) as exc:
        raise StateError(f"unreadable payload ({exc})") from exc
    if not isinstance(meta, dict):
        raise StateError("meta is not a JSON object")
    return arrays, meta


class StateStore:
    """Generations of snapshots in one folder; ``save`` and ``load`` are all a device needs."""

    def __init__(self, folder: str | os.PathLike, keep: int = 3):
        if keep < 2:
            raise ValueError("keep at least two generations: the newest and a last good one")
        self.folder = Path(folder)
        self.keep = keep
        self._listed_stamp: tuple[int, int, int, int] | None = None  # the folder's settled stamp at the last listing
        self._listed_latest = 0  # and the newest generation that listing found

    # ---------------------------------------------------------------- listing
    def generations(self) -> list[tuple[int, Path]]:
        """(generation, path) of every snapshot file, newest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found, reverse=True)

    def latest_generation(self, *, by_stamp: bool = False) -> int:
        """The newest generation on disk (0: none): a folder listing, cheap enough before every change.

        ``by_stamp`` (a camera asks before every frame) answers from one ``stat`` of the folder while
        its stamp is the one of the last listing: a snapshot is renamed into the folder, which moves
        the folder's mtime. A stamp younger than ``SETTLED_NS`` is never trusted (a second change
        within the file system's timestamp granularity would leave it unchanged), so the answer is
        the listing's, only cheaper."""
        if not by_stamp:
            return self._list_latest()
        before = time.time_ns()
        stamp = self._stamp()
        if stamp is not None and stamp == self._listed_stamp:
            return self._listed_latest
        latest = self._list_latest()
        settled = stamp is not None and before - max(stamp[2], stamp[3]) > SETTLED_NS
        self._listed_stamp, self._listed_latest = (stamp if settled else None), latest
        return latest

    def _list_latest(self) -> int:
        gens = self.generations()
        return gens[0][0] if gens else 0

    def _stamp(self) -> tuple[int, int, int, int] | None:
        """(device, inode, mtime, ctime) of the folder; None when it is missing."""
        try:
            st = os.stat(self.folder)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns

    def _lock(self) -> contextlib.AbstractContextManager:
        """The folder's writer lock (``state_lock``): re-entrant, so a ``Device`` change that saves holds it once."""
        return StateLock.of(self.folder).hold()

    # ---------------------------------------------------------------- read
    def load(self) -> Snapshot | None:
        """The newest snapshot that verifies; None for an empty folder.

        A corrupt newer file is renamed to ``*.corrupt`` with a warning and the next one
        is used. Raises ``StateError`` only if files exist and none of them verifies.
        """
        bad = []
        for gen, path in self.generations():
            try:
                arrays, meta = decode(path.read_bytes())
            except (StateError, OSError) as exc:
                bad.append(path)
                log.warning("state file %s is corrupt (%s); falling back to the previous one", path.name, exc)
                with contextlib.suppress(OSError):
                    os.replace(path, path.with_name(path.name + ".corrupt"))
                continue
            if bad:
                log.warning("using last good state %s (generation %d)", path.name, gen)
            return Snapshot(arrays, meta, gen, path)
        if bad:
            raise StateError(f"no valid state snapshot in {self.folder} ({len(bad)} corrupt)")
        return None

    # ---------------------------------------------------------------- write
    def save(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> int:
        """Write the next generation atomically, then drop the ones beyond ``keep``."""
        data = encode(arrays, meta)
        with self._lock():
            self.clean_temp()
            gens = self.generations()
            gen = (gens[0][0] + 1) if gens else 1
            atomic_write_bytes(self.folder / f"snapshot-{gen:010d}.bin", data)
            for _, old in self.generations()[self.keep:]:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
            try:  # a mirror for people; the snapshot above is the state, so a full disk here does not undo it
                atomic_write_text(self.folder / "state.json", json.dumps({"generation": gen, **meta}, indent=2, sort_keys=True) + "\n")
            except OSError as exc:
                log.warning("snapshot %d saved, state.json not updated: %s", gen, exc)
        return gen

    def clean_temp(self) -> int:
        """Remove temp files a killed writer left behind (they were never renamed into place)."""
        n = 0
        if self.folder.is_dir():
            for p in self.folder.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                        n += 1
        return n
