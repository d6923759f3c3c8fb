"""What the server serves: promoted model packages and the global head built on them.

A package is promoted from an ``infantino-export`` folder: its files are verified against
the manifest, copied under ``<data-dir>/packages/`` and its bootstrap head becomes the
next global head version. The store's ``serving`` row says which package and head devices
receive; the MLflow ``production`` aliases follow it (see ``tracking``).
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from infantino.edge_runtime.core.head import HeadFormatError, OnlineHead
from infantino.edge_runtime.core.onnx_session import ModelLoadError, cpu_session
from infantino.edge_runtime.core.package import MANIFEST, PackageError, open_package, sha256_file

from . import store as st
from .names import InvalidName, child_path

GLOBAL_HEAD_PREFIX = "global-head-"


class PromoteError(ValueError):
    """A package or head that cannot be served (one line)."""


def global_head_name(version: int) -> str:
    return f"{GLOBAL_HEAD_PREFIX}{int(version)}.npz"


def parse_global_head_name(name: str) -> Optional[int]:
    if name.startswith(GLOBAL_HEAD_PREFIX) and name.endswith(".npz"):
        digits = name[len(GLOBAL_HEAD_PREFIX):-4]
        if digits.isdigit() and len(digits) < 12:
            return int(digits)
    return None


def head_blob(head: OnlineHead, version: int) -> bytes:
    """A head as served: its arrays and parameters, no optimizer state, ``version`` set."""
    fresh = OnlineHead.from_arrays(head.coefs, head.intercepts, head.classes, head.params, version=version)
    return fresh.to_bytes()


def _check_extractor_dim(path: Path, embedding_dim: int) -> None:
    try:
        sess = cpu_session(path)
    except ModelLoadError as exc:  # any load failure means "not servable"
        raise PromoteError(f"extractor {path.name} does not load in ONNX Runtime: {exc}") from None
    shape = sess.get_outputs()[0].shape
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != embedding_dim):
        raise PromoteError(f"extractor {path.name} outputs {shape}, the manifest promises (N, {embedding_dim})")


def _copy_package(src: Path, files: list[str], dest: Path) -> None:
    """Copy into ``dest`` through a temp folder and a rename: a half copy is never served."""
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for name in files:
            shutil.copyfile(src / name, tmp / name)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _servable(package_dir: Path):
    """The verified package and its bootstrap head; ``PromoteError`` when devices could not run them."""
    try:
        pkg = open_package(package_dir, verify=True)
    except PackageError as exc:
        raise PromoteError(str(exc)) from None
    m = pkg.manifest
    if not pkg.has("head"):
        raise PromoteError(f"package {m.version} has no head file")
    if not (pkg.has("extractor") or pkg.has("extractor_int8")):  # a device bundle (the wheel's) ships int8 only
        raise PromoteError(f"package {m.version} has no extractor file")
    try:
        head = OnlineHead.load(pkg.path("head"))
    except HeadFormatError as exc:
        raise PromoteError(f"bootstrap head: {exc}") from None
    if tuple(head.classes) != tuple(m.classes):
        raise PromoteError(f"bootstrap head classes {head.classes} differ from the manifest's {m.classes}")
    if head.input_dim != m.embedding_dim:
        raise PromoteError(f"bootstrap head takes {head.input_dim}-d embeddings; the extractor makes {m.embedding_dim}-d ones")
    for role in ("extractor", "extractor_int8"):
        if pkg.has(role):
            _check_extractor_dim(pkg.path(role), m.embedding_dim)
    return pkg, head


def promote_package(store: st.Store, data_dir: Path, package_dir: Path) -> dict:
    """Verify, copy and serve a package; returns what happened."""
    package_dir = Path(package_dir)
    pkg, head = _servable(package_dir)
    m = pkg.manifest
    manifest_sha = sha256_file(package_dir / MANIFEST)
    files = [MANIFEST] + [entry["path"] for entry in m.files.values()]
    for name in files:  # copied and served by name: each must stay inside the package folder
        try:
            child_path(package_dir, name)
        except InvalidName as exc:
            raise PromoteError(f"package {m.version}: {exc}") from None
    rel = Path("packages") / manifest_sha[:20]
    _copy_package(package_dir, files, Path(data_dir) / rel)
    if sha256_file(Path(data_dir) / rel / MANIFEST) != manifest_sha:
        raise PromoteError(f"{rel} already holds a different package; remove it")

    now = time.time()
    with store.change() as u:
        u.lock_serving()
        existing = u.package_row(m.version)
        if existing is not None and existing.manifest_sha256 != manifest_sha:
            raise PromoteError(f"package version {m.version} was promoted before with a different manifest; give it a new version")
        if existing is None:
            u.insert_package(m.version, m.to_dict(), manifest_sha, str(rel), now)
            version = u.next_head_version()
            u.insert_head(version, m.version, None, "bootstrap", head_blob(head, version), now)
            u.enqueue_tracking("package", m.version, now)
            action = "promoted"
        else:  # back to a package served before: its newest head
            version = u.newest_head(m.version)
            action = "re-served"
        superseded = u.supersede_buffered(m.version)
        u.set_serving(m.version, version, now)
    return {"action": action, "package_version": m.version, "head_version": version, "superseded_updates": superseded}


def serve_head(store: st.Store, version: int) -> dict:
    """Serve an existing head (and its package): a rollback."""
    with store.change() as u:
        u.lock_serving()
        package_version = u.head_package(version)
        if package_version is None:
            raise PromoteError(f"no head version {version}")
        superseded = u.supersede_buffered(package_version)
        now = time.time()
        u.set_serving(package_version, version, now)
        u.enqueue_tracking("serve", str(version), now)
    return {"action": "served", "package_version": package_version, "head_version": version,
            "superseded_updates": superseded}


def serve_aliases(store: st.Store, package_version: Optional[str], head_version: Optional[int]) -> dict:
    """Serve what MLflow's ``production`` aliases name: the head alias when it belongs to the
    extractor alias's package, else that package's newest head."""
    if package_version is None and head_version is None:
        raise PromoteError("neither infantino-extractor nor infantino-head has a 'production' alias")
    if head_version is not None:
        with store.look() as u:
            head_package = u.head_package(head_version)
        if head_package is None:
            raise PromoteError(f"the head alias names head version {head_version}, which this server does not have")
        if package_version is None or head_package == package_version:
            return serve_head(store, head_version)
    with store.look() as u:
        newest = u.newest_head(package_version)
    if newest is None:
        raise PromoteError(f"the extractor alias names package {package_version}, which this server does not have")
    return serve_head(store, newest)


def etag(serving: st.Serving) -> str:
    return hashlib.sha256(f"{serving.manifest_sha256}:{serving.head_version}:{serving.head_sha256}".encode()).hexdigest()[:32]


def model_info(serving: st.Serving, prefix: str = "/v1/model/files") -> dict:
    """The body of ``GET /v1/model``."""
    m = serving.manifest
    files = {"manifest": {"name": MANIFEST, "sha256": serving.manifest_sha256}}
    for role, entry in m["files"].items():
        files[role] = {"name": entry["path"], "sha256": entry["sha256"], "bytes": entry["bytes"]}
    for entry in files.values():
        entry["url"] = f"{prefix}/{entry['name']}?package={serving.package_version}"
    name = global_head_name(serving.head_version)
    files["global_head"] = {"name": name, "sha256": serving.head_sha256, "bytes": serving.head_bytes, "url": f"{prefix}/{name}"}
    return {
        "package_version": serving.package_version,
        "head_version": serving.head_version,
        "bootstrap_head_version": serving.bootstrap_head_version,  # the package's own head.npz, as a global version
        "embedding_dim": m["embedding_dim"],
        "classes": m["classes"],
        "files": files,
    }
