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

from edge_runtime import wire
from sync_server.process import REPO, ServerProcess, free_port  # noqa: F401 - re-exported for the tests
from sync_server.process import LocalServer as Server  # noqa: F401
from edge_runtime.device import Device, DeviceConfig
from edge_runtime.sync_client import DeviceLearner
from tiny_package import synthetic_face

PG_URL = os.environ.get("INFANTINO_TEST_PG_URL")
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(not PG_URL, reason="INFANTINO_TEST_PG_URL not set (.ci/pg.sh)"))]


@contextlib.contextmanager
def pg_schema_url(base_url: str) -> Iterator[str]:
    """A fresh schema in the test database; the URL puts it first on the search path."""
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(base_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in base_url else "?"
    try:
        yield f"{base_url}{sep}options=" + urllib.parse.quote(f"-csearch_path={schema}")
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


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


def cli(*args: str, env: Optional[dict] = None, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "sync_server.cli", *args], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **(env or {})}, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"infantino-server {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


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
