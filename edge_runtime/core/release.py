"""Where the release model installed with this code lives, so that a device or server with no
options runs it from any folder.

* An installed wheel ships the release's device files beside this module, in ``release_model/``
  (setup.py: int8 extractor, detector, head, replay seed, NOTICE, and a manifest listing exactly
  those).
* An editable install has no copy; its install record (``direct_url.json``, PEP 610) names the
  checkout it points at, whose ``data/models`` is the release. Only then is a checkout assumed.
"""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

DISTRIBUTION = "infantino-edge"
BUNDLE = Path(__file__).resolve().parents[1] / "release_model"  # setup.py RELEASE_PACKAGE
CHECKOUT_RELEASE = ("data", "models")  # setup.py RELEASE_DIR


def bundled_model_dir() -> Optional[Path]:
    """The installed release package's folder, or None when this install has none."""
    if (BUNDLE / "manifest.json").is_file():
        return BUNDLE
    checkout = _editable_checkout()
    if checkout is not None and (checkout.joinpath(*CHECKOUT_RELEASE) / "manifest.json").is_file():
        return checkout.joinpath(*CHECKOUT_RELEASE)
    return None


def _editable_checkout() -> Optional[Path]:
    """The folder an editable install of this distribution points at, else None. Every record of
    the name is read: run from a checkout, its build's ``.egg-info`` (no ``direct_url.json``) comes first."""
    for dist in metadata.distributions(name=DISTRIBUTION):
        try:
            record = json.loads(dist.read_text("direct_url.json") or "{}")
        except ValueError:
            continue
        url = urlparse(str(record.get("url", "")))
        if record.get("dir_info", {}).get("editable") and url.scheme == "file":
            return Path(unquote(url.path))
    return None
