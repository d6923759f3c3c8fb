"""InfantinO Edge sync server: devices push head updates, pull the current global model.

``create_app(test_config=None)`` is a Flask application factory. Settings come from the
defaults below, then ``INFANTINO_*`` environment variables (``INFANTINO_DATA_DIR``,
``INFANTINO_DB_URL``, ``INFANTINO_MLFLOW_URI``, ``INFANTINO_AGGREGATE_K``, ...; JSON
values are parsed), then ``test_config``. The same app runs under
``flask --app sync_server run``, ``infantino-server run`` and gunicorn
(``gunicorn -w 2 -k gthread --threads 8 'sync_server.wsgi:app'``).
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Optional

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from .aggregate import Strategy
from .store import Store, StoreBusy, StoreError, sqlite_url

log = logging.getLogger("infantino.server")

DEFAULTS = {
    "DATA_DIR": None,            # default: $XDG_DATA_HOME/infantino-server
    "DB_URL": None,              # default: sqlite:///<DATA_DIR>/server.db
    "MLFLOW_URI": None,          # default: sqlite:///<DATA_DIR>/mlflow.db (+ <DATA_DIR>/mlartifacts); "off" disables
    "AGGREGATE_K": 10,           # step once this many updates are buffered (FedBuff's K)
    "AGGREGATE_MAX_BATCH": 20000,
    "STRATEGY": {},              # aggregate.Strategy fields, e.g. {"rule": "trimmed_mean", "clip_norm": "median"}
    "MAX_UPDATE_BYTES": 4 * 1024 * 1024,
    "MAX_DELTA_NORM": 50.0,      # L2 bound on (update - base head)
    "MAX_STALENESS": 100,        # head versions an update may lag behind
    "MAX_SAMPLES_PER_UPDATE": 100000,
    "COMMIT_TIMEOUT_S": 30.0,
    "BACKGROUND": True,          # aggregator and MLflow threads in each process
    "TRACKING_POLL_S": 5.0,
    "DELTA_RETENTION_S": 7 * 24 * 3600,  # arrays of aggregated updates are kept this long (rows forever)
    "FAULT_AGGREGATE_PAUSE_S": 0.0,  # fault injection for tests: hold the aggregation transaction open
    "GATE_DIRS": [],             # held-out ImageFolder sets a published package is judged on (the first decides)
    "GATE_TOLERANCE": 0.0,       # accuracy the candidate may lose on the first set and still pass
    "MAX_PACKAGE_BYTES": 256 * 1024 * 1024,  # POST /v1/admin/packages body (the release package is 21 MB)
    "MAX_CROP_BYTES": 4 * 1024 * 1024,  # POST /v1/crops body (512 raw 64x64 crops are 2 MB)
}


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "infantino-server"


def resolve_locations(data_dir: Optional[str], db_url: Optional[str], mlflow_uri: Optional[str]) -> tuple[Path, str, Optional[str], Optional[Path]]:
    """(data dir, store URL, MLflow URI or None, MLflow artifact root or None)."""
    data = Path(data_dir) if data_dir else default_data_dir()
    data.mkdir(parents=True, exist_ok=True)
    url = db_url or sqlite_url(data / "server.db")
    artifacts = None
    if mlflow_uri in (None, ""):
        mlflow_uri = sqlite_url(data / "mlflow.db")
    if str(mlflow_uri).lower() == "off":
        return data, url, None, None
    if not str(mlflow_uri).startswith(("http://", "https://", "databricks")):
        artifacts = data / "mlartifacts"
    return data, url, str(mlflow_uri), artifacts


class ServerState:
    """What the views share in one process: the store, the strategy, the background threads."""

    def __init__(self, config: dict):
        self.config = config
        self.data_dir, self.db_url, self.mlflow_uri, self.artifact_root = resolve_locations(
            config["DATA_DIR"], config["DB_URL"], config["MLFLOW_URI"])
        self.store = Store(self.db_url)
        self.store.create_all()
        self.strategy = Strategy.from_dict(dict(config["STRATEGY"] or {}))
        self.tracker = None
        if self.mlflow_uri:
            from .tracking import Tracker

            self.tracker = Tracker(self.store, self.data_dir, self.mlflow_uri, self.artifact_root,
                                   poll_s=float(config["TRACKING_POLL_S"]))
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pid: Optional[int] = None
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------ aggregation
    def aggregate(self, min_updates: int):
        from .rounds import aggregate_once

        result = aggregate_once(self.store, self.strategy, min_updates=min_updates,
                                max_updates=int(self.config["AGGREGATE_MAX_BATCH"]),
                                fault_pause_s=float(self.config["FAULT_AGGREGATE_PAUSE_S"]))
        if result is not None:
            if self.tracker is not None:
                self.tracker.kick()
            try:
                self.store.prune_deltas(float(self.config["DELTA_RETENTION_S"]))
            except StoreError as exc:  # housekeeping only: retried after the next step
                log.warning("pruning old update arrays failed: %s", exc)
        return result

    def after_commit(self) -> None:
        """Called by the group committer: let the aggregator check whether K updates wait."""
        if self._thread is not None:
            self._wake.set()

    def close(self) -> None:
        """Stop this process's background threads and close the store (tests, CLI)."""
        self._closed = True
        self._wake.set()
        if self.tracker is not None:
            self.tracker.stop()
        self.store.dispose()

    # ------------------------------------------------------------ background threads
    def ensure_background(self) -> None:
        if not self.config["BACKGROUND"] or (self._pid == os.getpid() and self._thread is not None and self._thread.is_alive()):
            return
        with self._lock:
            if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
                return
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._aggregator_loop, name="infantino-aggregator", daemon=True)
            self._thread.start()
            if self.tracker is not None:
                self.tracker.start()

    def _aggregator_loop(self) -> None:
        """Wakes after commits (at most 5 checks a second) and every 30 s; steps once K are buffered."""
        k = int(self.config["AGGREGATE_K"])
        failures = 0
        while not self._closed:
            try:
                while self.store.has_buffered(k) and self.aggregate(k) is not None:
                    pass
                failures = 0
            except (StoreBusy, StoreError) as exc:
                failures += 1
                log.warning("aggregation failed (will retry): %s", exc)
            except Exception:  # noqa: BLE001 - keep the thread alive, say why
                failures += 1
                log.exception("aggregation failed (will retry)")
            timeout = 30.0 if failures == 0 else min(60.0, 2.0 ** failures) * random.uniform(0.8, 1.2)
            time.sleep(0.2)  # rate limit: commits arrive far more often than steps are due
            self._wake.wait(timeout)
            self._wake.clear()


def create_app(test_config: Optional[dict] = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("INFANTINO")
    if test_config:
        app.config.update(test_config)
    app.config["MAX_CONTENT_LENGTH"] = int(app.config["MAX_UPDATE_BYTES"])
    app.json.sort_keys = False
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)

    state = ServerState(app.config)
    app.extensions["infantino"] = state

    from . import api

    app.register_blueprint(api.bp)

    @app.errorhandler(HTTPException)
    def _json_error(exc: HTTPException):
        reason = (exc.description or exc.name or "").strip().splitlines()
        return jsonify(error=reason[0] if reason else exc.name, status=exc.code), exc.code

    @app.errorhandler(413)
    def _too_large(_exc):
        limit = app.config["MAX_CONTENT_LENGTH"]
        return jsonify(error=f"body too large: the limit is {limit} bytes", status=413), 413

    @app.before_request
    def _background():
        state.ensure_background()

    state.ensure_background()
    return app
