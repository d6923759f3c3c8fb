"""Package files are served only while they match their manifest's sha256.

A file changed on the server's disk after promotion (a bad copy, a full disk, someone's
edit) used to be served as it was; devices refused it, but the server said nothing (issue
20). The server checks the served package's files when it starts and every file before it
sends it: a mismatch is logged (once per change of the file), counted
(``infantino_package_file_mismatches_total``) and answered 503 instead of the bytes.

Hashing a 21 MB extractor on every download would cost ~40 ms, so a verdict is kept per
file and redone whenever the file's ``stat`` changes: any write to it moves ``st_ctime``,
which no user-space call can set back.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Optional

from infantino.edge_runtime.core.package import sha256_file

from .names import InvalidName, child_path

log = logging.getLogger("infantino.server")

StatKey = tuple[int, int, int, int, int]


def _stat_key(path: Path) -> Optional[StatKey]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileVerifier:
    """Whether a file on disk has the sha256 it should, re-hashed only when the file changed."""

    def __init__(self, on_mismatch: Optional[Callable[[str], None]] = None, hash_file: Callable[[Path], str] = sha256_file):
        self.on_mismatch = on_mismatch  # called once per detected change (metrics)
        self.hash_file = hash_file
        self._verdicts: dict[tuple[str, str], tuple[StatKey, bool]] = {}
        self._lock = threading.Lock()

    def matches(self, path: Path, sha256: str, what: str) -> bool:
        """True when ``path`` exists and hashes to ``sha256``; a mismatch is logged once per change of the file."""
        key = _stat_key(path)
        if key is None:
            return False
        slot = (str(path), sha256)
        with self._lock:
            cached = self._verdicts.get(slot)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            ok = self.hash_file(path) == sha256
        except OSError as exc:
            log.error("package file %s cannot be read (%s); not served", what, exc.strerror or exc)
            return False
        if _stat_key(path) != key:  # changed while hashed: decide next time, serve nothing now
            return False
        with self._lock:
            if len(self._verdicts) > 4096:
                self._verdicts.clear()
            self._verdicts[slot] = (key, ok)
        if not ok:
            log.error("package file %s does not match its manifest sha256 %s...; not served until it is restored "
                      "(re-promote the package)", what, sha256[:12])
            if self.on_mismatch is not None:
                self.on_mismatch(Path(path).name)
        return ok


def expected_hashes(manifest: dict, manifest_sha256: str) -> dict[str, str]:
    """File name -> sha256 of a package as the store recorded it (the manifest itself included)."""
    hashes = {entry["path"]: entry["sha256"] for entry in manifest["files"].values()}
    hashes["manifest.json"] = manifest_sha256
    return hashes


def check_package(verifier: FileVerifier, data_dir: Path, folder: str, version: str, manifest: dict,
                  manifest_sha256: str) -> list[str]:
    """The files of a promoted package that are missing or do not match (each logged); [] when all do."""
    bad = []
    for name, sha in sorted(expected_hashes(manifest, manifest_sha256).items()):
        try:
            path = child_path(Path(data_dir) / folder, name)
        except InvalidName:
            bad.append(name)
            continue
        if not path.is_file():
            log.error("package %s: file %s is missing on the server", version, name)
            bad.append(name)
        elif not verifier.matches(path, sha, f"{name} of package {version}"):
            bad.append(name)
    return bad
