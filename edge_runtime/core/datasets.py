"""Where the real data sets live, and a one-line refusal when one is missing.

The root is ``$INFANTINO_DATA``, else ``../shared/data`` next to the repository (an installed
copy: ``~/.local/share/infantino/data``). Layout (README,
"Data"): ``fer2013/fer2013_train.npz`` (FER2013, adult faces) and ``infant/<class>/`` (the
InfantinO infant photos, one folder per expression). Nothing here is ever copied into the
repository; commands and tests only read it.

A model package says what it was trained on as data, not as a path of the machine that built
it: ``image_set_record`` (count, a digest of the set, a short key per file).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

ENV = "INFANTINO_DATA"
REPO = Path(__file__).resolve().parents[2]  # edge_runtime/core/datasets.py -> the repository
FER = ("fer2013", "fer2013_train.npz")
INFANT = ("infant",)


class DataMissing(FileNotFoundError):
    """A data set a command needs is not where it was looked for (one line, says where to get it)."""


def data_root() -> Path:
    """``$INFANTINO_DATA``, else the ``shared/data`` folder beside the repository when this code runs
    from a checkout (an editable install), else ``~/.local/share/infantino/data`` (an installed copy
    has no repository beside it)."""
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    if (REPO / "pyproject.toml").is_file():
        return REPO.parent / "shared" / "data"
    return Path.home() / ".local" / "share" / "infantino" / "data"


def data_path(*parts: str) -> Path:
    """A path under the data root, e.g. ``data_path(*FER)``."""
    return data_root().joinpath(*parts)


def require(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it exists, else ``DataMissing`` naming it and how to provide it."""
    path = Path(path)
    if not path.exists():
        raise DataMissing(f"{what} not found at {path}: see README 'Data' for where to get it, then pass "
                          f"its path or set {ENV} to the folder holding fer2013/ and infant/")
    return path


def fer_file(path: str | os.PathLike | None = None) -> Path:
    """The FER2013 npz: ``path``, else the one under the data root."""
    return require(path or data_path(*FER), "FER2013 (fer2013_train.npz)")


def infant_folder(path: str | os.PathLike | None = None) -> Path:
    """The infant photos: ``path``, else the folder under the data root."""
    return require(path or data_path(*INFANT), "the infant photos (an ImageFolder, infant/<class>/)")


KEY_CHARS = 16  # hex characters of a file's sha256 kept per file: 64 bits, collisions negligible


def image_set_record(paths: Iterable[str | os.PathLike]) -> dict:
    """How many images, ``sha256`` over their sorted per-file sha256s (the same set gives the
    same digest on any machine), and the sorted short keys of their contents (``file_keys``), so
    a held-out set can be checked against it without the training folder."""
    from .package import sha256_file

    digests = sorted(sha256_file(p) for p in paths)
    return {"count": len(digests), "sha256": hashlib.sha256("\n".join(digests).encode()).hexdigest(),
            "file_keys": sorted({d[:KEY_CHARS] for d in digests})}


def image_folders_record(roots: Iterable[str | os.PathLike]) -> dict:
    """``image_set_record`` of every image in these ImageFolder trees (ValueError if one is gone)."""
    from .imagefolder import list_image_folder

    return image_set_record(path for root in roots for path, _ in list_image_folder(root))


def file_key(path: str | os.PathLike) -> str:
    """The short content key ``image_set_record`` keeps for a file."""
    from .package import sha256_file

    return sha256_file(path)[:KEY_CHARS]
