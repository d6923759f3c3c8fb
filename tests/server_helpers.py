"""Shared pieces of the sync-server tests: store URLs (SQLite, and PostgreSQL when
``INFANTINO_TEST_PG_URL`` is set, e.g. from ``.ci/pg.sh``), real server processes, updates."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytest

from infantino.edge_runtime.core import wire
from infantino.sync_server.process import REPO, ServerProcess, cli, free_port, served_store  # noqa: F401 - re-exported for the tests
from infantino.sync_server.process import scratch_schema_url as pg_schema_url  # noqa: F401
from infantino.sync_server.process import LocalServer as Server  # noqa: F401
from infantino.edge_runtime.device import Device, DeviceConfig
from infantino.edge_runtime.sync.client import DeviceLearner
from infantino.export.tiny_package import synthetic_face

PG_URL = os.environ.get("INFANTINO_TEST_PG_URL")
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(not PG_URL, reason="INFANTINO_TEST_PG_URL not set (.ci/pg.sh)"))]


@contextlib.contextmanager
def store_url_for(backend: str, folder: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'server.db'}"
    else:
        with pg_schema_url(PG_URL) as url:
            yield url


def make_update(info: dict, layers, device: str, *, shift: float = 0.01, key: Optional[str] = None, n_samples: int = 5,
                metrics: Optional[dict] = None, kind: str = "weights", base_head_version: Optional[int] = None,
                base_package_version: Optional[str] = None) -> bytes:
    moved = [np.asarray(a, np.float32) + np.float32(shift) for a in layers]
    return wire.encode_update(
        device=device, base_head_version=info["head_version"] if base_head_version is None else base_head_version,
        base_package_version=info["package_version"] if base_package_version is None else base_package_version,
        layers=moved, n_samples=n_samples, idempotency_key=key or uuid.uuid4().hex, metrics=metrics or {"accuracy": 0.5},
        kind=kind,
    )


# --------------------------------------------------------------------------- a served tiny package, real devices

CONFIG = DeviceConfig(detect_faces=False, holdout_every=0, threads=1)


def new_device(root: Path, package: Path, name: str) -> DeviceLearner:
    model = root / f"{name}-model"
    if not model.exists():
        shutil.copytree(package, model)
    return DeviceLearner(Device(model, root / f"{name}-state", CONFIG))


def teach(learner: DeviceLearner, labels, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for y in labels:
        learner.learn(synthetic_face(int(y), rng), int(y))
