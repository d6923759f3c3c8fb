"""What ``infantino-server`` serves: a package folder promoted through the gate or directly,
and, on a store that serves nothing yet, the default package (``run``'s first start).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

PROG = "infantino-server"
DEFAULT_PACKAGE_ENV = "INFANTINO_DEFAULT_PACKAGE"


def _installed_release() -> Path:
    """``./data/models`` when run beside one, else the release this install ships (no checkout assumed)."""
    from infantino.edge_runtime.core.release import bundled_model_dir

    here = Path("data/models")
    return here.resolve() if here.is_dir() else (bundled_model_dir() or here)


def default_package(args: argparse.Namespace) -> Optional[Path]:
    """The package a fresh store serves: ``--default-package``, ``$INFANTINO_DEFAULT_PACKAGE``
    (``off`` for none), else ``./data/models``, else the release installed with this code
    (``edge_runtime.release``); None when turned off."""
    if args.no_default_package:
        return None
    chosen = args.default_package or os.environ.get(DEFAULT_PACKAGE_ENV) or str(_installed_release())
    return None if chosen.strip().lower() == "off" else Path(chosen)


def promote_dir(state, package_dir: Path, gates: list[str], tolerance: float, force: bool) -> dict:
    """Serve a package folder: through the gate when held-out sets are given (or ``force``),
    else verified and promoted directly. One path for ``promote`` and a fresh ``run``."""
    from .models import PromoteError, promote_package
    from .publish import PublishError, publish

    if gates or force:
        try:
            return publish(state.store, state.data_dir, package_dir, gates, tolerance, force)
        except PublishError as exc:
            raise PromoteError(str(exc)) from None
    return promote_package(state.store, state.data_dir, package_dir)


def serve_default_if_empty(state, package: Optional[Path]) -> Optional[dict]:
    """First start: a store that serves nothing gets ``package`` promoted (and says so), so that
    devices are answered with a model instead of 503. Never replaces what is served."""
    from .publish import gate_dirs

    if state.store.serving() is not None:
        return None
    if package is None:
        print(f"{PROG}: nothing is served yet (default package off): devices get 503 until "
              f"`infantino-server promote PACKAGE_DIR`", file=sys.stderr)
        return None
    if not package.is_dir():
        print(f"{PROG}: nothing is served yet and there is no default package at {package}: devices get 503 until "
              f"`infantino-server promote PACKAGE_DIR` (or set {DEFAULT_PACKAGE_ENV})", file=sys.stderr)
        return None
    result = promote_dir(state, package.resolve(), gate_dirs(state.config), float(state.config["GATE_TOLERANCE"]), False)
    if not result.get("promoted", True):
        print(f"{PROG}: the default package {package} was refused ({result['gate']['reason']}): nothing is served",
              file=sys.stderr)
        return result
    print(f"{PROG}: first start, nothing was served: promoted the default package {result['package_version']} "
          f"from {package.resolve()} (head version {result.get('head_version')}; --no-default-package turns this off)",
          file=sys.stderr)
    return result
