"""Where a device finds its model package and its state folder when it is not told.

Apart from ``config.DeviceConfig`` (plain settings, imported by the numpy-only learner), because
finding the package asks the installed release (``release``) and the folder sync installs
packages into: file-system look-ups the learner must not import. ``sync.state`` writes that
folder; the device only reads where it is, so the device imports nothing from ``sync``.
"""
from __future__ import annotations

import os
from pathlib import Path

from typing import Optional

from .core.release import bundled_model_dir


ENV_MODEL_DIR = "INFANTINO_MODEL_DIR"


def default_model_dir() -> Path:
    """``$INFANTINO_MODEL_DIR``, else ``./data/models``, else the release package installed with
    this code (``release.bundled_model_dir``: in the wheel, or an editable install's checkout)."""
    env = os.environ.get(ENV_MODEL_DIR)
    if env:
        return Path(env)
    here = Path("data/models")
    if here.is_dir():
        return here
    return bundled_model_dir() or here  # no bundle: the missing ./data/models is what the error names


def model_dir_for(state_dir: str | os.PathLike | None) -> Path:
    """The package ``infantino-edge sync`` installed for this state folder, else ``default_model_dir()``."""
    return managed_model_dir(Path(state_dir if state_dir is not None else default_state_dir())) or default_model_dir()


def default_state_dir() -> Path:
    """``$INFANTINO_STATE_DIR``, else ``~/.infantino-edge/state``."""
    return Path(os.environ.get("INFANTINO_STATE_DIR") or Path.home() / ".infantino-edge" / "state")


def managed_model_dir(state_dir: str | os.PathLike) -> Optional[Path]:
    """The package sync installed for this state folder, if any (``<state>/sync/packages/current``)."""
    link = Path(state_dir) / "sync" / "packages" / "current"
    return link if link.exists() else None
