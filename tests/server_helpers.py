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
from edge_runtime.device import Device, DeviceConfig
from edge_runtime.sync_client import DeviceLearner, Http
from sync_server import store as st
from sync_server.models import promote_package
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


class Server:
    """A promoted tiny package, an admin token and a 2-worker server process."""

    def __init__(self, root: Path, package: Path, aggregate_k: int = 1000, env: dict | None = None, mlflow_uri: str = "off"):
        self.data = root / "server"
        self.data.mkdir(parents=True)
        self.store = st.Store(st.sqlite_url(self.data / "server.db"))
        self.store.create_all()
        promote_package(self.store, self.data, package)
        self.admin = self.store.rotate_admin()
        self.tokens: dict[str, str] = {}
        self.process = ServerProcess(self.data, aggregate_k=aggregate_k, env=env, mlflow_uri=mlflow_uri)

    @property
    def url(self) -> str:
        return self.process.url

    def token(self, name: str) -> str:
        if name not in self.tokens:
            self.tokens[name] = self.store.add_client(name)
        return self.tokens[name]

    def aggregate(self) -> dict:
        return Http(self.url, self.admin).request("POST", "/v1/admin/aggregate", body=b"{}",
                                                  headers={"Content-Type": "application/json"}).json()

    def close(self) -> None:
        self.process.kill()
        self.store.dispose()


def new_device(root: Path, package: Path, name: str) -> DeviceLearner:
    model = root / f"{name}-model"
    if not model.exists():
        shutil.copytree(package, model)
    return DeviceLearner(Device(model, root / f"{name}-state", CONFIG))


def teach(learner: DeviceLearner, labels, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for y in labels:
        learner.learn(synthetic_face(int(y), rng), int(y))
