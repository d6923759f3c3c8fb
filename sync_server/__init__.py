"""InfantinO Edge sync server: devices push head updates, pull the current global model.

``create_app(test_config=None)`` is a Flask application factory. Settings come from the
defaults below, then ``INFANTINO_*`` environment variables (``INFANTINO_DATA_DIR``,
``INFANTINO_DB_URL``, ``INFANTINO_MLFLOW_URI``, ``INFANTINO_AGGREGATE_K``, ...; JSON
values are parsed), then ``test_config``. The same app runs under
``flask --app sync_server run``, ``infantino-server run`` and gunicorn
(``gunicorn -c python:infantino.sync_server.gunicorn_conf -w 2 --threads 8 'infantino.sync_server.wsgi:app'``).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Optional

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from infantino.edge_runtime.core.backoff import backoff_delay

from .aggregate import Strategy, ingest_bound
from .outage import RETRY_AFTER_S, OutageLog
from .package_files import FileVerifier, check_package
from .rounds import RoundPolicy
from .store import Store, StoreBusy, StoreError, sqlite_url

log = logging.getLogger("infantino.server")

DEFAULTS = {
    "DATA_DIR": None,            # default: $XDG_DATA_HOME/infantino-server
    "DB_URL": None,              # default: sqlite:///<DATA_DIR>/server.db
    "MLFLOW_URI": None,          # default: sqlite:///<DATA_DIR>/mlflow.db (+ <DATA_DIR>/mlartifacts); "off" disables
    "AGGREGATE_K": 10,           # step once this many devices have updates buffered (FedBuff's K, one voice each)
    "AGGREGATE_MAX_BATCH": 20000,
    "STRATEGY": {},              # aggregate.Strategy fields over its robust default, e.g. {"rule": "median"}
    "MAX_UPDATE_BYTES": 4 * 1024 * 1024,
    "MAX_DELTA_NORM": 50.0,      # hard L2 bound on (update - base head), before any round has measured honest updates
    "NORM_BOUND_FACTOR": 10.0,   # then: an update may move the head by at most this x the median voice norm of recent rounds
    "CLIP_CAP_FACTOR": 3.0,      # a round's clip bound is at most this x that median (rounds.RoundPolicy)
    "LABEL_BURST": 64,           # labels a device may claim on a head just published ...
    "LABELS_PER_HOUR": 240,      # ... plus this many per hour since it was published (FedAvg weights)
    "MAX_BUFFERED_PER_DEVICE": 64,  # more waiting updates from one device get 429 (retried after the next round)
    "MAX_STALENESS": 100,        # head versions an update may lag behind
    "MAX_SAMPLES_PER_UPDATE": 100000,
    "COMMIT_TIMEOUT_S": 30.0,
    "BACKGROUND": True,          # aggregator and MLflow threads in each process
    "TRACKING_POLL_S": 5.0,
    "MLFLOW_HTTP_TIMEOUT_S": 15.0,  # a remote MLflow that hangs fails fast (set in the environment by the CLI: MLflow reads only that)
    "MLFLOW_HTTP_MAX_RETRIES": 0,   # ... and is not retried inside a request: the outbox retries with backoff
    "DELTA_RETENTION_S": 7 * 24 * 3600,  # arrays of aggregated updates are kept this long (rows forever)
    "FAULT_AGGREGATE_PAUSE_S": 0.0,  # fault injection for tests: hold the aggregation transaction open
    "GATE_DIRS": [],             # held-out ImageFolder sets a published package is judged on (the first decides)
    "GATE_TOLERANCE": 0.0,       # accuracy the candidate may lose on the first set and still pass
    "HEAD_GATE": True,           # with GATE_DIRS: an aggregated head is served only if not worse on the first set
    "HEAD_GATE_TOLERANCE": 0.0,
    "MAX_PACKAGE_BYTES": 256 * 1024 * 1024,  # POST /v1/admin/packages body (the release package is 21 MB)
    "MAX_CROP_BYTES": 4 * 1024 * 1024,  # POST /v1/crops body (512 raw 64x64 crops are 2 MB)
    "METRICS_TOKEN": None,       # GET /metrics is open (like /v1/health) unless a bearer token is set here
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


def tracking_settings(config, mlflow_uri: str, artifact_root: Optional[Path]):
    from .tracking import TrackingSettings

    return TrackingSettings(mlflow_uri, artifact_root, http_timeout_s=float(config["MLFLOW_HTTP_TIMEOUT_S"]),
                            http_max_retries=int(config["MLFLOW_HTTP_MAX_RETRIES"]))


class ServerState:
    """What the views share in one process: the store, the strategy, the background threads."""

    def __init__(self, config: dict):
        self.config = config
        self.data_dir, self.db_url, self.mlflow_uri, self.artifact_root = resolve_locations(
            config["DATA_DIR"], config["DB_URL"], config["MLFLOW_URI"])
        self.store = Store(self.db_url)
        self.store.create_all()
        self.strategy = Strategy.from_dict(dict(config["STRATEGY"] or {}))
        self.policy = RoundPolicy(label_burst=float(config["LABEL_BURST"]), labels_per_hour=float(config["LABELS_PER_HOUR"]),
                                  clip_cap_factor=float(config["CLIP_CAP_FACTOR"]))
        self.head_gate = self._head_gate(config)
        self._bound_cache: dict[tuple[str, int], float] = {}
        self.tracker = None  # the outbox worker (outbox.OutboxWorker) ...
        self.recorder = None  # ... and what it records into (tracking.MlflowRecorder)
        if self.mlflow_uri:
            from .tracking import MlflowRecorder, tracking_worker

            self.recorder = MlflowRecorder(self.store, self.data_dir, tracking_settings(config, self.mlflow_uri, self.artifact_root))
            self.tracker = tracking_worker(self.store, self.recorder, poll_s=float(config["TRACKING_POLL_S"]))
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pid: Optional[int] = None
        self._lock = threading.Lock()
        self._closed = False

    def _head_gate(self, config: dict):
        from .publish import gate_dirs

        dirs = gate_dirs(config)
        if not dirs or not config["HEAD_GATE"]:
            return None
        from .headgate import HeadGate

        return HeadGate(self.store, self.data_dir, dirs[0], float(config["HEAD_GATE_TOLERANCE"]))

    def ingest_bound(self, package_version: str, last_round: int) -> float:
        """The L2 bound for incoming updates (``aggregate.ingest_bound``), re-read from the store only
        when a round happened since (in any worker)."""
        key = (package_version, int(last_round))
        bound = self._bound_cache.get(key)
        if bound is None:
            reference = self.store.recent_voice_norm(package_version, self.policy.history)
            bound = ingest_bound(float(self.config["MAX_DELTA_NORM"]), reference, float(self.config["NORM_BOUND_FACTOR"]))
            self._bound_cache = {key: bound}
        return bound

    # ------------------------------------------------------------ aggregation
    def aggregate(self, min_updates: int):
        """One round if ``min_updates`` devices have updates buffered (the head gate's held-out
        set is embedded first, outside the transaction)."""
        from .rounds import aggregate_once

        if self.head_gate is not None:
            serving = self.store.serving()
            if serving is not None:
                self.head_gate.prepare(serving.package_version)
        result = aggregate_once(self.store, self.strategy, min_updates=min_updates,
                                max_updates=int(self.config["AGGREGATE_MAX_BATCH"]),
                                fault_pause_s=float(self.config["FAULT_AGGREGATE_PAUSE_S"]),
                                policy=self.policy, judge=self.head_gate)
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
        """Wakes after commits (at most 5 checks a second) and every 30 s; steps once K devices have updates buffered."""
        k = int(self.config["AGGREGATE_K"])
        failures = 0
        while not self._closed:
            try:
                while self.store.has_buffered(k) and self.store.buffered_devices() >= k and self.aggregate(k) is not None:
                    pass
                failures = 0
            except (StoreBusy, StoreError) as exc:
                failures += 1
                log.warning("aggregation failed (will retry): %s", exc)
            except Exception:  # noqa: BLE001 - keep the thread alive, say why
                failures += 1
                log.exception("aggregation failed (will retry)")
            timeout = 30.0 if failures == 0 else backoff_delay(failures, 1.0, 60.0, spread=(0.8, 1.2))
            time.sleep(0.2)  # rate limit: commits arrive far more often than steps are due
            self._wake.wait(timeout)
            self._wake.clear()


def _check_served_files(state: ServerState) -> None:
    """At start: the served package's files against their sha256 (a mismatch is logged and counted, and
    the file is refused when asked for)."""
    try:
        serving = state.store.serving()
    except StoreError as exc:
        log.warning("served package not checked at start: %s", exc)
        return
    if serving is not None:
        check_package(state.files, state.data_dir, serving.folder, serving.package_version, serving.manifest,
                      serving.manifest_sha256)


def create_app(test_config: Optional[dict] = None) -> Flask:
    here = Path(__file__).resolve().parent  # explicit paths: Flask cannot search the editable infantino.* namespace
    app = Flask(__name__, root_path=str(here), instance_path=str(here / "instance"))
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("INFANTINO")
    if test_config:
        app.config.update(test_config)
    app.config["MAX_CONTENT_LENGTH"] = int(app.config["MAX_UPDATE_BYTES"])
    app.json.sort_keys = False
    _log_to_stderr()
    state = ServerState(app.config)
    app.extensions["infantino"] = state

    from . import api, metrics

    app.register_blueprint(api.bp)
    state.events = metrics.init_app(app, state.store, tracking=state.tracker is not None,
                                    token=app.config.get("METRICS_TOKEN") or None)
    state.files = FileVerifier(on_mismatch=lambda name: state.events.package_mismatches.labels(name).inc())
    _check_served_files(state)
    _install_error_handlers(app)

    @app.before_request
    def _background():
        state.ensure_background()

    state.ensure_background()
    return app


def _log_to_stderr() -> None:
    """The server's log lines on stderr (once per process)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _install_error_handlers(app: Flask) -> None:
    """Every error as one JSON line; a database outage as 503 with Retry-After, logged once per outage."""
    outage = OutageLog()

    @app.errorhandler(HTTPException)
    def _json_error(exc: HTTPException):
        reason = (exc.description or exc.name or "").strip().splitlines()
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.code == 503 else {}
        return jsonify(error=reason[0] if reason else exc.name, status=exc.code), exc.code, headers

    @app.errorhandler(StoreBusy)
    def _store_busy(exc: StoreBusy):
        """The database is down or locked: 503 with Retry-After, one log line per outage (outage.py), no traceback."""
        outage.failed(str(exc))
        return jsonify(error=f"{exc}; retry later", status=503), 503, {"Retry-After": str(RETRY_AFTER_S)}

    @app.after_request
    def _store_back(response):
        if outage.since is not None and response.status_code < 300:
            outage.ok()
        return response

    @app.errorhandler(413)
    def _too_large(_exc):
        limit = app.config["MAX_CONTENT_LENGTH"]
        return jsonify(error=f"body too large: the limit is {limit} bytes", status=413), 413
