"""Shared pieces of the sync-server tests: store URLs (SQLite, and PostgreSQL when
``INFANTINO_TEST_PG_URL`` is set, e.g. from ``.ci/pg.sh``), real server processes, updates."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytest

from edge_runtime import wire

PG_URL = os.environ.get("INFANTINO_TEST_PG_URL")
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(not PG_URL, reason="INFANTINO_TEST_PG_URL not set (.ci/pg.sh)"))]
REPO = Path(__file__).resolve().parent.parent


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class ServerProcess:
    """``infantino-server run`` (gunicorn, gthread workers) on 127.0.0.1, in its own process group."""

    def __init__(self, data_dir: Path, *, db_url: Optional[str] = None, mlflow_uri: str = "off", workers: int = 2,
                 aggregate_k: int = 1000, env: Optional[dict] = None, port: Optional[int] = None, threads: int = 8):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / f"server-{self.port}.log"
        self.argv = [sys.executable, "-m", "sync_server.cli", "run", "--data-dir", str(self.data_dir), "--port", str(self.port),
                     "--workers", str(workers), "--threads", str(threads), "--mlflow-uri", mlflow_uri,
                     "--aggregate-k", str(aggregate_k)]
        if db_url:
            self.argv += ["--db-url", db_url]
        self.env = {**os.environ, **(env or {})}
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout_s: float = 60.0) -> "ServerProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"server did not answer within {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the whole process group (master and workers)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()


def cli(*args: str, env: Optional[dict] = None, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "sync_server.cli", *args], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **(env or {})}, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"infantino-server {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res
