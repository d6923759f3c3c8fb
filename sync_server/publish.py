"""Publishing a model package: unpack an upload safely, gate it, promote it only if it passes.

Every decision is stored (``gates`` table) and logged to MLflow through the outbox with
both packages' numbers. A refused candidate leaves the serving row exactly as it was.
"""
from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

from infantino.edge_runtime.core.package import PackageError, open_package

from . import store as st
from .gate import GateResult, run_gate
from .models import PromoteError, promote_package

MAX_PACKAGE_FILES = 16


class PublishError(ValueError):
    """A package that cannot be published (one line); ``status`` is the HTTP answer."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def unpack_tar(body: bytes, dest_parent: Path, max_bytes: int) -> Path:
    """Unpack an uncompressed tar of flat package files into a new folder under ``dest_parent``.

    Only regular files with plain names (no folders, links, ``..`` or hidden names) are taken;
    anything else refuses the whole upload.
    """
    dest_parent.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix="upload-", dir=dest_parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
            members = tar.getmembers()
            if not members or len(members) > MAX_PACKAGE_FILES:
                raise PublishError(f"a package upload holds 1 to {MAX_PACKAGE_FILES} files, not {len(members)}", 400)
            if sum(m.size for m in members) > max_bytes:
                raise PublishError(f"package files add up to more than {max_bytes} bytes", 413)
            for m in members:
                if not m.isfile() or Path(m.name).name != m.name or m.name.startswith(".") or not m.name:
                    raise PublishError(f"tar member {m.name[:80]!r} is not a plain file name; refusing the upload", 400)
                with tar.extractfile(m) as src, open(dest / m.name, "xb") as out:
                    shutil.copyfileobj(src, out)
    except tarfile.TarError as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise PublishError(f"body is not an uncompressed tar of the package files ({exc})", 400) from None
    except FileExistsError:
        shutil.rmtree(dest, ignore_errors=True)
        raise PublishError("a file name appears twice in the upload", 400) from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def gate_dirs(config: dict) -> list[str]:
    """The held-out sets from the app config (``INFANTINO_GATE_DIRS``: os.pathsep-separated, or a list)."""
    value = config.get("GATE_DIRS") or []
    return [str(d) for d in (value.split(os.pathsep) if isinstance(value, str) else value) if d]


def publish(store: st.Store, data_dir: Path, package_dir: Path, gates: list[str], tolerance: float = 0.0,
            force: bool = False, threads: int = 2) -> dict:
    """Gate ``package_dir`` against what is served and promote it if it passes (or ``force``).

    Without held-out sets a served package is replaced only with ``force``; when nothing is
    served yet there is nothing to compare with and the package is promoted.
    """
    try:
        candidate = open_package(package_dir, verify=True)
    except PackageError as exc:
        raise PublishError(str(exc)) from None
    serving = store.serving()
    if serving is not None and not gates and not force:
        raise PublishError("no held-out set is configured (INFANTINO_GATE_DIRS or --gate-dir): "
                           "refusing to replace the served package unjudged; pass force to do it anyway", 409)
    for folder in gates:
        if not Path(folder).is_dir():
            raise PublishError(f"held-out set {folder} is not a folder on the server", 500)
    result: Optional[GateResult] = None
    if gates:
        current_dir = None if serving is None else Path(data_dir) / store.package(serving.package_version)["folder"]
        result = run_gate(Path(package_dir), candidate.version, current_dir,
                          None if serving is None else serving.package_version, gates, tolerance, threads)
    passed = result.passed if result is not None else True
    out = {"package_version": candidate.version, "gate": None if result is None else result.to_dict(),
           "forced": bool(force and not passed), "promoted": False}
    decision = "refused"
    try:
        if passed or force:
            out.update(promote_package(store, Path(data_dir), Path(package_dir)))
            out["promoted"] = True
            decision = "promoted" if passed else "forced"
    except PromoteError as exc:
        decision = "failed"
        raise PublishError(str(exc)) from None
    finally:
        if result is not None:
            _record(store, result, decision)
    return out


def refusal(result: dict) -> str:
    """The one-line answer to a package the gate kept out (HTTP 409 and ``promote``)."""
    return f"gate refused package {result['package_version']}: {result['gate']['reason']}"


def _record(store: st.Store, result: GateResult, decision: str) -> None:
    """Keep the decision and queue it for MLflow (logged by the tracker, like packages and heads)."""
    now = time.time()
    with store.change() as u:
        gate_id = u.insert_gate(now=now, candidate_version=result.candidate_version,
                                current_version=result.current_version, passed=result.passed, decision=decision,
                                result=result.to_dict())
        u.enqueue_tracking("gate", str(gate_id), now)
