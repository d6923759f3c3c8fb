"""On-disk sync state: ``<state_dir>/sync/`` holds reference points, the update outbox and packages.

* ``base.npz``: the reference point of the last adoption (weights the next delta is measured
  from, and their provenance); every outbox file carries one too, so queueing an update and
  moving the reference is one atomic write: no learning is sent twice, none is lost.
* ``outbox/`` -> ``sent/`` (the newest kept: it may carry the reference) or ``rejected/``
  (with the server's reason, the last 20 kept).
* ``packages/<version>/`` with ``current`` / ``previous`` symlinks, flipped atomically.
* ``state.json``: the ETag cache and the device's name on the server.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

from ..core import safe_npz
from ..core.atomic import atomic_write_bytes, atomic_write_text
from ..paths import managed_model_dir  # noqa: F401  (sync.state.managed_model_dir, as its callers know it)
from .transport import SyncError


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@dataclasses.dataclass
class RefPoint:
    """A reference point: the weights the next delta is measured from, and its provenance."""

    seq: int
    layers: list
    base_head_version: int
    package_version: str
    labelled_total: int
    path: Optional[Path] = None


class SyncState:
    """``<state_dir>/sync/``: ``base.npz`` (last adoption), ``outbox/``, ``sent/``, ``rejected/``,
    ``packages/<version>/`` with ``current`` / ``previous`` links, ``state.json`` (ETag cache)."""

    def __init__(self, state_dir: Path):
        self.root = Path(state_dir) / "sync"
        for sub in ("outbox", "sent", "rejected", "packages"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ reference points
    @staticmethod
    def _read(path: Path) -> RefPoint:
        with safe_npz.load(path) as npz:
            meta = json.loads(str(npz["ref_meta"]))
            n = int(meta["n_layers"])
            layers = [np.array(npz[f"ref_{i}"]) for i in range(n)]
        return RefPoint(int(meta["seq"]), layers, int(meta["base_head_version"]), str(meta["package_version"]),
                        int(meta["labelled_total"]), path)

    @staticmethod
    def _ref_arrays(ref: RefPoint) -> dict:
        meta = {"seq": ref.seq, "n_layers": len(ref.layers), "base_head_version": ref.base_head_version,
                "package_version": ref.package_version, "labelled_total": ref.labelled_total}
        out = {f"ref_{i}": np.asarray(a, np.float32) for i, a in enumerate(ref.layers)}
        out["ref_meta"] = np.asarray(json.dumps(meta))
        return out

    def _candidates(self) -> list[Path]:
        files = [self.root / "base.npz"] if (self.root / "base.npz").exists() else []
        for sub in ("outbox", "sent", "rejected"):
            files += sorted((self.root / sub).glob("*.npz"))
        return files

    def reference(self) -> Optional[RefPoint]:
        """The newest reference point (largest seq), or None before the first adoption."""
        best: Optional[RefPoint] = None
        for path in self._candidates():
            try:
                ref = self._read(path)
            except (OSError, ValueError, KeyError) as exc:  # a torn file cannot exist (atomic writes); say so loudly
                raise SyncError(f"unreadable sync file {path}: {exc}") from None
            if best is None or ref.seq > best.seq:
                best = ref
        return best

    def next_seq(self) -> int:
        ref = self.reference()
        return 1 if ref is None else ref.seq + 1

    def write_base(self, ref: RefPoint) -> None:
        atomic_write_bytes(self.root / "base.npz", _npz_bytes(**self._ref_arrays(ref)))

    def queue(self, ref: RefPoint, body: bytes) -> Path:
        """Queue an update body together with the reference point it moves to (one atomic write)."""
        path = self.root / "outbox" / f"{ref.seq:010d}.npz"
        atomic_write_bytes(path, _npz_bytes(body=np.frombuffer(body, np.uint8), **self._ref_arrays(ref)))
        return path

    def pending(self) -> list[Path]:
        return sorted((self.root / "outbox").glob("*.npz"))

    @staticmethod
    def body(path: Path) -> bytes:
        with safe_npz.load(path) as npz:
            return npz["body"].tobytes()

    def mark_sent(self, path: Path) -> None:
        dest = self.root / "sent" / path.name
        os.replace(path, dest)
        for old in sorted((self.root / "sent").glob("*.npz"))[:-1]:  # the newest carries the reference
            old.unlink(missing_ok=True)

    def mark_rejected(self, path: Path, status: int, reason: str) -> None:
        dest = self.root / "rejected" / path.name
        atomic_write_text(dest.with_suffix(".json"), json.dumps({"status": status, "reason": reason, "at": time.time()}) + "\n")
        os.replace(path, dest)
        kept = sorted((self.root / "rejected").glob("*.npz"))
        for old in kept[:-20]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)

    # ------------------------------------------------------------ ETag cache and packages
    def cached(self) -> dict:
        try:
            return json.loads((self.root / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def save_cached(self, **values) -> None:
        data = {**self.cached(), **values}
        atomic_write_text(self.root / "state.json", json.dumps(data, indent=1) + "\n")

    def package_dir(self, which: str = "current") -> Optional[Path]:
        link = self.root / "packages" / which
        return link.resolve() if link.exists() else None

    def swap_package(self, new_dir: Path) -> None:
        """``current`` -> new_dir atomically (symlink flip); the old target becomes ``previous``."""
        pk = self.root / "packages"
        old = self.package_dir("current")
        if old is not None and old != new_dir.resolve():
            _flip_link(pk / "previous", old.name)
        _flip_link(pk / "current", new_dir.name)
        keep = {p.name for p in (self.package_dir("current"), self.package_dir("previous")) if p is not None}
        for entry in pk.iterdir():
            if entry.is_dir() and not entry.is_symlink() and entry.name not in keep and not entry.name.startswith("."):
                shutil.rmtree(entry, ignore_errors=True)

    def rollback_package(self) -> Path:
        """Swap ``current`` and ``previous``; returns the package now current."""
        cur, prev = self.package_dir("current"), self.package_dir("previous")
        if prev is None:
            raise SyncError("no previous package to roll back to")
        _flip_link(self.root / "packages" / "current", prev.name)
        if cur is not None:
            _flip_link(self.root / "packages" / "previous", cur.name)
        return prev


def _flip_link(link: Path, target_name: str) -> None:
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}")
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def safe_dir_name(version: str) -> str:
    clean = "".join(c if c.isalnum() or c in "._-" else "_" for c in version)[:80]
    return f"{clean}-{hashlib.sha256(version.encode()).hexdigest()[:8]}"
