"""gunicorn settings of ``infantino-server run`` (``-c python:infantino.sync_server.gunicorn_conf``).

* the slow-client-safe worker (``infantino.sync_server.worker``) and its timeouts;
* prometheus_client's multiprocess folder: events (updates accepted/refused, request
  latency) happen in every worker, so each worker writes them to files in one folder that
  ``GET /metrics`` reads, whichever worker answers. The folder is made before the workers
  fork, emptied of a previous run's files, and dropped at exit; a dead worker's files are
  marked so its live gauges disappear while its counters keep counting.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

worker_class = "infantino.sync_server.worker.GuardedThreadWorker"
timeout = 120
graceful_timeout = 20
keepalive = 5
backlog = 2048

_MADE: list[str] = []


def on_starting(server) -> None:
    """Before any worker exists: a clean multiprocess folder, named in the environment the workers inherit."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for stale in Path(folder).glob("*.db"):
            stale.unlink()
    else:
        folder = tempfile.mkdtemp(prefix="infantino-metrics-")
        _MADE.append(folder)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    server.log.info("metrics: prometheus_client multiprocess folder %s", folder)


def child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    for folder in _MADE:
        shutil.rmtree(folder, ignore_errors=True)
