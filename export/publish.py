"""``infantino-export publish``: send a model package to the sync server, which promotes it
only if it is not worse than the served one on the server's held-out sets (the gate).

The package travels as an uncompressed tar of its flat files (ONNX, npz, JSON: no
pickles); the server verifies every sha256 against the manifest before judging it.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

from infantino.edge_runtime.core.package import MANIFEST, open_package
from infantino.edge_runtime.sync.transport import Http, SyncError


def package_tar(package_dir: Path) -> bytes:
    """The manifest and every file it lists, verified first so a broken package never leaves."""
    pkg = open_package(package_dir, verify=True)
    names = [MANIFEST] + sorted(entry["path"] for entry in pkg.manifest.files.values())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            tar.add(Path(package_dir) / name, arcname=name, recursive=False)
    return buf.getvalue()


def publish(package_dir: Path, server: str, admin_token: str, force: bool = False, timeout_s: float = 600.0) -> tuple[int, dict]:
    """(HTTP status, server's answer): 200 promoted, 409 refused by the gate; ``SyncError`` otherwise
    (bad package, no held-out set configured without ``force``, server unreachable)."""
    http = Http(server, admin_token, timeout_s=timeout_s, retries=2)
    path = "/v1/admin/packages" + ("?force=true" if force else "")
    resp = http.request("POST", path, body=package_tar(Path(package_dir)), headers={"Content-Type": "application/x-tar"})
    answer = resp.json()
    if resp.status == 200 or (resp.status == 409 and answer.get("gate")):
        return resp.status, answer
    raise SyncError(f"publish refused: HTTP {resp.status} {resp.reason}")


def describe(answer: dict) -> str:
    """One line per held-out set with both packages' numbers, then the decision."""
    gate = answer.get("gate")
    lines = []
    if gate:
        current = {s["path"]: s for s in gate.get("current") or []}
        for s in gate["candidate"]:
            cur = current.get(s["path"])
            was = f"served {cur['accuracy']:.4f} (F1 {cur['macro_f1']:.4f})" if cur else "nothing served"
            lines.append(f"{s['path']} (n={s['n']}): candidate {s['accuracy']:.4f} (F1 {s['macro_f1']:.4f}) vs {was}")
        lines.append(f"gate: {'passed' if gate['passed'] else 'refused'}: {gate['reason']}")
    verdict = "promoted" if answer.get("promoted") else "not promoted; production unchanged"
    lines.append(f"package {answer.get('package_version')}: {verdict}{' (forced)' if answer.get('forced') else ''}")
    return "\n".join(lines)
