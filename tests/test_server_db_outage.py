"""PostgreSQL stopped under load (issue 20): every request answers 503 with ``Retry-After``, never
500; the server log says so in one line per worker, not a traceback per request; it answers again
as soon as the database is back, without a restart, and every acknowledged update is stored.

The test runs its own temporary PostgreSQL cluster (initdb + pg_ctl from the packages .ci/pg.sh
installs) so that it can stop and start it without touching a shared one."""
from __future__ import annotations

import glob
import http.client
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from server_helpers import make_update
from infantino.sync_server.process import ServerProcess, free_port, served_store

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL server binaries not installed (.ci/pg.sh installs them)")
    if os.geteuid() != 0:
        pytest.skip("running a PostgreSQL cluster as the postgres user needs root")
    return Path(found[-1]).parent


class Cluster:
    """A throw-away PostgreSQL cluster on 127.0.0.1:``port``, owned by the postgres user."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="infantino-pg-"))
        self.port = free_port()
        shutil.chown(self.dir, "postgres", "postgres")
        self._as_postgres(["initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync"])
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, argv: list[str]) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / argv[0]), *argv[1:]], check=True,
                       capture_output=True, timeout=120)

    def start(self) -> None:
        self._as_postgres(["pg_ctl", "-D", str(self.dir / "data"), "-w", "-l", str(self.dir / "log"), "-o",
                           f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start"])

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(["pg_ctl", "-D", str(self.dir / "data"), "-w", "-m", mode, "stop"])

    def remove(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m",
                        "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def _request(port: int, method: str, path: str, token: str, body: bytes | None = None) -> tuple[int, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-npz"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Retry-After")
    finally:
        conn.close()


def test_postgresql_down_under_load_gives_503_with_retry_after_and_one_log_line(tmp_path, tiny_package_dir):
    cluster = Cluster(_pg_bin())
    try:
        cluster.start()
        # Prepare: a served store on the cluster, a 2-worker gunicorn server, a device
        store = served_store(cluster.url, tmp_path / "data", tiny_package_dir)
        token = store.add_client("cam1")
        head = store.head(store.serving().head_version)
        info = {"head_version": head.version, "package_version": head.package_version}
        store.dispose()
        results: list[tuple[float, str, int, str | None]] = []
        accepted: list[str] = []
        stop = threading.Event()
        with ServerProcess(tmp_path / "data", db_url=cluster.url, workers=2, threads=8) as server:

            def load(n: int) -> None:
                while not stop.is_set():
                    key = f"outage-{uuid.uuid4().hex}"
                    body = make_update(info, head.layers, "cam1", key=key)
                    for method, path, data in (("GET", "/v1/whoami", None), ("POST", "/v1/updates", body),
                                               ("GET", "/v1/model", None)):
                        try:
                            status, retry = _request(server.port, method, path, token, data)
                        except OSError:
                            continue
                        results.append((time.monotonic(), path, status, retry))
                        if path == "/v1/updates" and status == 202:
                            accepted.append(key)

            threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
            for t in threads:
                t.start()
            time.sleep(2.0)
            down_at = time.monotonic()
            cluster.stop("fast")  # Execute: the database goes away under load ...
            time.sleep(4.0)
            up_at = time.monotonic()
            cluster.start()  # ... and comes back
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(t > up_at and s == 200 for t, _, s, _ in results):
                time.sleep(0.2)
            time.sleep(1.0)
            stop.set()
            for t in threads:
                t.join(timeout=30)
            log = server.log()
        # Assert: nothing but 2xx before and after, 503 + Retry-After while down, never another 5xx
        statuses = {s for _, _, s, _ in results}
        assert statuses <= {200, 202, 429, 503}, sorted(statuses)  # 429: this device has a round's worth waiting
        during = [(s, r) for t, _, s, r in results if down_at + 0.5 < t < up_at]
        assert during and all(s == 503 and r and int(r) > 0 for s, r in during), during[:5]
        assert any(t > up_at and s == 200 for t, _, s, _ in results), "the server did not answer after the database came back"
        assert "Traceback" not in log
        down_lines = log.count("store unavailable, answering 503")
        assert 1 <= down_lines <= 2, log[-3000:]  # one per worker that saw the outage
        assert log.count("store still unavailable") <= 2
        # every acknowledged update is stored
        check = served_store(cluster.url, tmp_path / "data", tiny_package_dir)
        try:
            with check.read() as conn:
                stored = {k for (k,) in conn.exec_driver_sql("SELECT idempotency_key FROM updates")}
        finally:
            check.dispose()
        assert accepted and set(accepted) <= stored
        print(f"\noutage: {len(results)} requests, {len(during)} while down (all 503), {len(accepted)} updates acknowledged")
    finally:
        cluster.remove()
