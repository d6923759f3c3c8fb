"""Face crops of labelled samples, kept so a new extractor can re-embed them (numpy only).

The replay buffer keeps *embeddings*, which a new extractor cannot read. When sync installs
a package with another extractor, these crops are embedded again and the head is re-fitted
on them, so what caregivers taught the device survives the upgrade.

On disk: ``<state_dir>/samples.log``, append-only, so a save costs the same on day 1 and day
100 (the crops kept since the last save, one ``write`` and one ``fsync``), however many crops
are kept. After a 20-byte magic line and an 8-byte random id of this file (new at each
rewrite, so a reader can tell a rewritten log from the one it read), each record is ``<u32 length><u32 crc32><payload>``;
the payload is ``<u8 kind><u16 label><i16 slot><u16 h><u16 w>`` then the data:

* ``OFFERED``: a crop offered to class ``label``'s reservoir (the class's ``seen`` count grows),
  placed at ``slot`` (replacing the crop there, or appended; -1: not kept);
* ``KEPT``: a crop placed at ``slot`` without counting (a compacted log);
* ``SEEN``: the ``seen`` counts of all ``label`` classes (int64), as of a compaction.

Reading replays the records in order and stops at the first torn or corrupt one (a killed
writer); the next save cuts that tail off before appending. When the log holds several
times more records than the reservoir has slots it is rewritten compacted (atomically), once
every few hundred labels. A ``samples.npz`` of an older version is read and migrated to the
log on first open (``migrate``); the log then wins and the npz is removed.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .core import safe_npz
from .core.atomic import _fsync_dir, atomic_write_bytes
from .state_lock import StateLock

MAGIC = b"INFANTINO-SAMPLES/1\n"
LOG_NAME, LEGACY_NAME = "samples.log", "samples.npz"
OFFERED, KEPT, SEEN = 1, 2, 3
ID_BYTES = 8
_FRAME = struct.Struct("<II")  # payload length, crc32
_HEAD = struct.Struct("<BHhHH")  # kind, label, slot, h, w
COMPACT_AFTER = 4  # rewrite once the log holds this many times the reservoir's slots (at least 64) in records


def _record(kind: int, label: int, slot: int, data: np.ndarray) -> bytes:
    h, w = (data.shape if data.ndim == 2 else (0, 0))
    payload = _HEAD.pack(kind, label, slot, h, w) + np.ascontiguousarray(data).tobytes()
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


class SampleKeeper:
    """Face crops of labelled samples, class-balanced (reservoir per class), for re-embedding.

    The uint8 crops are the package's input size (64x64 = 4 KB each); 32 per class is under 1 MB.
    Reads and writes happen under the state folder's writer lock (``state_lock``).
    """

    def __init__(self, state_dir: Path, per_class: int = 32, n_classes: int = 7, seed: int = 0):
        self.folder = Path(state_dir)
        self.path = self.folder / LOG_NAME
        self.legacy_path = self.folder / LEGACY_NAME
        self.per_class = per_class
        self.n_classes = n_classes
        self.rng = np.random.default_rng(seed)
        self._file: bytes | None = None  # the id of the log read
        self.reload()

    # ---------------------------------------------------------------- read
    def _reset(self) -> None:
        self.crops: list[list[np.ndarray]] = [[] for _ in range(self.n_classes)]
        self.seen = np.zeros(self.n_classes, np.int64)
        self._pending: list[bytes] = []  # records of crops added since the last save
        self._end = 0  # offset just past the last good record read or written
        self._records = 0  # records in the log up to ``_end``
        self._rewrite = False  # the log must be rewritten (it does not fit these classes, or is missing)
        self._skip = False  # ignoring crop records (a SEEN record of another class count)

    def reload(self) -> None:
        """Read the kept crops again (another process may have saved since; the device calls this under
        the state folder's writer lock, with the snapshot). Only the new records when the log is the
        one read before and nothing is waiting to be saved."""
        head = self._header()
        if head is not None and head[0] == self._file and head[1] >= self._end and not self._pending:
            self._read_from(self._end)
            return
        self._reset()
        if head is not None:
            self._read_log(head[0])
        elif self.legacy_path.exists():
            self._load_legacy()
            self._rewrite = True

    def _header(self) -> tuple[bytes | None, int] | None:
        """(the log's id, None when it is not a samples log; its size), or None when there is no log."""
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(len(MAGIC) + ID_BYTES)
                size = os.fstat(fh.fileno()).st_size
        except FileNotFoundError:
            return None
        ok = len(head) == len(MAGIC) + ID_BYTES and head.startswith(MAGIC)
        return (head[len(MAGIC):] if ok else None), size

    def _read_log(self, file_id: bytes | None) -> None:
        self._file = file_id
        if file_id is None:
            self._rewrite = True  # not a samples log: start over
            return
        self._end = len(MAGIC) + ID_BYTES
        self._read_from(self._end)

    def _read_from(self, offset: int) -> int:
        """Apply the good records from ``offset`` on; how many there were."""
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
        pos = n = 0
        while pos + _FRAME.size <= len(data):
            length, crc = _FRAME.unpack_from(data, pos)
            payload = data[pos + _FRAME.size:pos + _FRAME.size + length]
            if len(payload) != length or length < _HEAD.size or zlib.crc32(payload) != crc:
                break  # a torn tail (or bit rot): everything before it stands
            self._apply(payload)
            pos += _FRAME.size + length
            n += 1
        self._end = offset + pos
        self._records += n
        return n

    def _apply(self, payload: bytes) -> None:
        kind, label, slot, h, w = _HEAD.unpack_from(payload)
        body = payload[_HEAD.size:]
        if kind == SEEN:
            self._skip = label != self.n_classes
            if not self._skip:
                self.seen = np.frombuffer(body, "<i8", count=label).astype(np.int64)
            else:
                self._rewrite = True  # another class set: start over rather than mislabel
            return
        if self._skip or label >= self.n_classes or len(body) != h * w:
            return
        if kind == OFFERED:
            self.seen[label] += 1
        if slot >= 0:
            self._place(label, slot, np.frombuffer(body, np.uint8).reshape(h, w).copy())

    def _place(self, c: int, slot: int, crop: np.ndarray) -> None:
        kept = self.crops[c]
        if slot < len(kept):
            kept[slot] = crop
        elif len(kept) < self.per_class:
            kept.append(crop)

    def _load_legacy(self) -> None:
        """``samples.npz`` as an older version wrote it (stacked crops, labels, seen)."""
        with safe_npz.load(self.legacy_path) as npz:
            crops, labels, seen = npz["crops"], npz["labels"], npz["seen"]
        if seen.shape != (self.n_classes,):
            return  # another class set: start over rather than mislabel
        self.seen = seen.astype(np.int64)
        for crop, label in zip(crops, labels):
            if 0 <= int(label) < self.n_classes and len(self.crops[int(label)]) < self.per_class:
                self.crops[int(label)].append(np.asarray(crop, np.uint8))

    # ---------------------------------------------------------------- change
    def add(self, crop: np.ndarray, label: int, save: bool = True) -> None:
        crop = np.asarray(crop, np.uint8)
        if crop.ndim != 2 or not 0 <= int(label) < self.n_classes:
            raise ValueError("a kept sample is a 2-D uint8 crop with a class index")
        c = int(label)
        self.seen[c] += 1
        if len(self.crops[c]) < self.per_class:
            slot = len(self.crops[c])
            self.crops[c].append(crop)
        else:
            j = int(self.rng.integers(0, self.seen[c]))
            slot = j if j < self.per_class else -1
            if slot >= 0:
                self.crops[c][slot] = crop
        self._pending.append(_record(OFFERED, c, slot, crop))
        if save:
            self.save()

    def all(self) -> tuple[list[np.ndarray], np.ndarray]:
        crops = [c for cls in self.crops for c in cls]
        labels = np.array([i for i, cls in enumerate(self.crops) for _ in cls], np.int64)
        return crops, labels

    def __len__(self) -> int:
        return sum(len(c) for c in self.crops)

    # ---------------------------------------------------------------- write
    def save(self) -> None:
        """Append the crops added since the last save (one write, one fsync); rewrite the log instead
        when it is missing, foreign, or due for compaction. Nothing to do: no I/O at all."""
        if not self._pending and not self._rewrite:
            return
        with StateLock.of(self.folder).hold():
            if not self._rewrite and self._replaced():
                self._redo_pending()
            if self._rewrite or not self.path.exists() or self._records + len(self._pending) > self._compact_limit():
                self._write_compacted()
            else:
                self._append()

    def migrate(self) -> None:
        """Move an older version's ``samples.npz`` into the log (once; a crash in between is finished here)."""
        with StateLock.of(self.folder).hold():
            if self._rewrite:
                self._write_compacted()
            elif self.path.exists() and self.legacy_path.exists():
                self.legacy_path.unlink(missing_ok=True)

    def _replaced(self) -> bool:
        """Another writer rewrote (compacted) the log since this object read it."""
        head = self._header()
        return head is not None and (head[0] != self._file or head[1] < self._end)

    def _redo_pending(self) -> None:
        """Read the rewritten log, then offer the crops added here again (their slots were chosen on the old one)."""
        pending, self._file = self._pending, None
        self._pending = []
        self.reload()
        for rec in pending:
            kind, label, slot, h, w = _HEAD.unpack_from(rec, _FRAME.size)
            self.add(np.frombuffer(rec[_FRAME.size + _HEAD.size:], np.uint8).reshape(h, w), label, save=False)

    def _compact_limit(self) -> int:
        return COMPACT_AFTER * max(self.per_class * self.n_classes, 64)

    def _append(self) -> None:
        foreign = self._read_from(self._end)  # records another writer appended since this object read the log
        with open(self.path, "r+b") as fh:
            fh.truncate(self._end)  # a torn tail a killed writer left behind, if any
            fh.seek(self._end)
            data = b"".join(self._pending)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self._end += len(data)
        self._records += len(self._pending)
        self._pending = []
        if foreign:
            self._file = None
            self.reload()  # the others' crops and ours, in the order the log has them

    def _write_compacted(self) -> None:
        """The kept crops as a fresh log (atomic): the ``seen`` counts, then each crop in its slot."""
        records = [_record(SEEN, self.n_classes, -1, self.seen.astype("<i8"))]
        records += [_record(KEPT, c, slot, crop) for c, kept in enumerate(self.crops) for slot, crop in enumerate(kept)]
        file_id = os.urandom(ID_BYTES)
        data = MAGIC + file_id + b"".join(records)
        atomic_write_bytes(self.path, data)
        if self.legacy_path.exists():
            self.legacy_path.unlink(missing_ok=True)
            _fsync_dir(self.folder)
        self._file, self._end, self._records = file_id, len(data), len(records)
        self._pending, self._rewrite, self._skip = [], False, False
