"""A real ``infantino-server run`` (gunicorn) child process on loopback, for demos, benchmarks and tests.

Started in its own process group so that stopping it also stops the gunicorn workers;
ready once ``/v1/health`` answers.
"""
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

from infantino.edge_runtime.sync.transport import Http

from . import store as st
from .models import promote_package

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_store(url: str, data_dir: Path, package: Path) -> st.Store:
    """A store at ``url`` (schema created or upgraded) serving ``package`` from ``data_dir``;
    the caller disposes it."""
    store = st.Store(url)
    store.create_all()
    promote_package(store, data_dir, package)
    return store


def cli(*args: str, env: Optional[dict] = None, check: bool = True) -> subprocess.CompletedProcess:
    """``infantino-server ARGS`` in a child process (what an operator types), output captured."""
    res = subprocess.run([sys.executable, "-m", "infantino.sync_server.cli", *args], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **(env or {})}, timeout=120)
    if check and res.returncode != 0:
        raise RuntimeError(f"infantino-server {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


@contextlib.contextmanager
def scratch_schema_url(base_url: str) -> Iterator[str]:
    """A fresh PostgreSQL schema, dropped afterwards; the URL puts it first on the search path,
    so tests and benchmarks share one database without seeing each other's tables."""
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


class ServerProcess:
    """``infantino-server run`` (gunicorn, guarded gthread workers) on 127.0.0.1, in its own process group."""

    def __init__(self, data_dir: Path, *, db_url: Optional[str] = None, mlflow_uri: str = "off", workers: int = 2,
                 aggregate_k: int = 1000, env: Optional[dict] = None, port: Optional[int] = None, threads: int = 8):
        self.data_dir = Path(data_dir).resolve()  # the child runs from the repository folder
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / f"server-{self.port}.log"
        self.argv = [sys.executable, "-m", "infantino.sync_server.cli", "run", "--data-dir", str(self.data_dir), "--port", str(self.port),
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


class LocalServer:
    """A data folder with a promoted package, an admin token, device tokens on demand, and a
    2-worker server process on it (``.process.start()``)."""

    def __init__(self, root: Path, package: Path, aggregate_k: int = 1000, env: dict | None = None, mlflow_uri: str = "off"):
        self.data = Path(root) / "server"
        self.data.mkdir(parents=True)
        self.store = served_store(st.sqlite_url(self.data / "server.db"), self.data, package)
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

    def flush_tracking(self, timeout_s: float = 60.0) -> bool:
        """Ask the server to log what waits for MLflow, until nothing does (another worker may
        hold the tracking lease for a while); False if MLflow is off or still behind."""
        http = Http(self.url, self.admin)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            tracking = http.request("GET", "/v1/admin/status").json().get("tracking")
            if not tracking:
                return False
            if not tracking["pending"]:
                return True
            http.request("POST", "/v1/admin/tracking/flush", body=b"{}", headers={"Content-Type": "application/json"})
            time.sleep(0.5)
        return False

    def close(self) -> None:
        self.process.kill()
        self.store.dispose()

    def __enter__(self) -> "LocalServer":
        self.process.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
