"""Client names and the paths built from them.

A device name ends up in file names (``crops export``), log lines, MLflow tags and HTTP
errors, so it is a small safe alphabet of bounded length, checked at every entry point,
and a path built from any name is checked to stay inside its folder.
"""
from __future__ import annotations

import re
from pathlib import Path

MAX_NAME = 64  # the clients.name column
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED = frozenset({"admin"})  # the admin token's client; a device of that name would shadow it


class InvalidName(ValueError):
    """A name that cannot be used (one line)."""


def check_device_name(name: object) -> str:
    """``name`` if it is a usable device name, else ``InvalidName`` saying why."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        shown = repr(name)[:80]
        raise InvalidName(f"device name {shown} must be 1-{MAX_NAME} characters of A-Z a-z 0-9 . _ - "
                         "starting with a letter or digit")
    if name.lower() in RESERVED:
        raise InvalidName(f"device name {name!r} is reserved")
    return name


def child_path(folder: Path, *parts: str) -> Path:
    """``folder/part/...`` if every part is one plain path component that stays inside ``folder``."""
    base = Path(folder).resolve()
    out = base
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\0" in part:
            raise InvalidName(f"{part[:80]!r} is not a plain file name")
        out = out / part
    if not out.resolve().is_relative_to(base):
        raise InvalidName(f"{'/'.join(parts)[:80]!r} leaves {folder}")
    return out
