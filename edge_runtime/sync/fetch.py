"""Fetching a model from the server: every file checked against the sha256 the server announced
*and* the package manifest before anything is used."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..core.head import OnlineHead
from ..core.package import MANIFEST, PackageError, open_package
from .state import safe_dir_name
from .transport import Http, SyncError


def fetch_package(http: Http, packages_dir: Path, info: dict, max_bytes: int) -> Path:
    """The package ``info`` (``GET /v1/model``) announces, verified, in ``packages_dir/<version>``."""
    files = info["files"]
    version = str(info["package_version"])
    final = packages_dir / safe_dir_name(version)
    if final.exists():
        try:
            open_package(final, verify=True)
            return final
        except PackageError:
            shutil.rmtree(final, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=packages_dir))
    try:
        for role, entry in files.items():
            if role == "global_head":
                continue
            name = str(entry["name"])
            if Path(name).name != name or name.startswith("."):
                raise SyncError(f"server named a package file {name!r}; refusing it")
            http.download(entry["url"], tmp / name, entry["sha256"], max_bytes)
        if not (tmp / MANIFEST).exists():
            raise SyncError("the server did not offer the package manifest")
        try:
            pkg = open_package(tmp, verify=True)
        except PackageError as exc:
            raise SyncError(f"downloaded package does not verify: {exc}") from None
        if pkg.version != version:
            raise SyncError(f"downloaded manifest says version {pkg.version}, the server announced {version}")
        os.replace(tmp, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_head(http: Http, scratch: Path, info: dict) -> OnlineHead:
    """The global head ``info`` announces, verified (file sha256 and version)."""
    entry = info["files"]["global_head"]
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        path = Path(tmp) / "head.npz"
        http.download(entry["url"], path, entry["sha256"], 64 * 1024 * 1024)
        head = OnlineHead.load(path)
    if head.version != int(info["head_version"]):
        raise SyncError(f"global head file says version {head.version}, the server announced {info['head_version']}")
    return head
