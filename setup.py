"""Build-time only: what the wheel holds is derived from the tree, never listed by hand.

* Packages: every folder with an ``__init__.py`` under the four top folders, installed as
  ``infantino.<folder>...`` (a hand-kept list in pyproject.toml lost ``edge_runtime/sync`` once,
  and the wheel could not import). setuptools' ``packages.find`` cannot add the ``infantino.``
  prefix, hence this file; everything else stays in pyproject.toml.
* The release model: the device files of ``data/models`` (int8 extractor, detector, head, replay
  seed, NOTICE) ship as ``infantino/edge_runtime/release_model/`` with a manifest that lists
  exactly those files, so an installed copy predicts with no options and opens verified. The fp32
  extractor and ``classifier.onnx`` (workstation-only: export, parity, gate) stay out: 4.5 MB
  instead of 22 MB on every device that installs the wheel.
"""
from __future__ import annotations

import json
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
FOLDERS = ("edge_runtime", "export", "sync_server", "fleet_demo")
RELEASE_PACKAGE = "infantino.edge_runtime.release_model"  # edge_runtime/release.py looks for it under this name
RELEASE_DIR = "data/models"
DEVICE_ROLES = ("extractor_int8", "detector", "head", "replay_seed")  # what a device opens (package_runtime.py)
EXTRA_FILES = ("NOTICE.detector",)  # the detector's licence travels with it


def _release_manifest() -> dict:
    path = HERE / RELEASE_DIR / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"setup.py: cannot read the release manifest {path} ({exc}); a wheel without a model is not built")


def device_manifest(full: dict) -> dict:
    """The release manifest with ``files`` cut to the device roles; the rest (version, input spec,
    detector, metrics) unchanged, plus a note of what was left out and of the full manifest."""
    missing = [r for r in DEVICE_ROLES if r not in full.get("files", {})]
    if missing:
        raise SystemExit(f"setup.py: the release package in {RELEASE_DIR} has no {', '.join(missing)} file")
    files = {role: full["files"][role] for role in DEVICE_ROLES}
    left_out = sorted(set(full["files"]) - set(files))
    return {**full, "files": files, "bundle": {"kind": "device", "left_out": left_out}}


def _package_files() -> list[str]:
    files = device_manifest(_release_manifest())["files"]
    return ["manifest.json", *EXTRA_FILES, *(entry["path"] for entry in files.values())]


class BuildPy(build_py):
    """Copies the package data as usual, then writes the device manifest over the release's one
    (not in editable mode: there the package is ``data/models`` itself, full manifest and all)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib, *RELEASE_PACKAGE.split("."), "manifest.json")
        target.write_text(json.dumps(device_manifest(_release_manifest()), indent=2) + "\n", encoding="utf-8")


packages = [f"infantino.{name}" for name in find_packages(where=str(HERE), include=[*FOLDERS, *(f"{f}.*" for f in FOLDERS)])]
setup(
    packages=[*packages, RELEASE_PACKAGE],
    package_dir={**{f"infantino.{f}": f for f in FOLDERS}, RELEASE_PACKAGE: RELEASE_DIR},
    package_data={
        "infantino.edge_runtime.annotate": ["templates/*.html", "static/*"],
        "infantino.sync_server.db.migrations": ["script.py.mako"],
        RELEASE_PACKAGE: _package_files(),
    },
    cmdclass={"build_py": BuildPy},
)
