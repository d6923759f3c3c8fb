"""The outbox worker apart from MLflow (a recording fake), and the MLflow recorder's edges:
MLflow's own "does not exist" is the only failure read as missing, filter values are quoted,
and nothing touches the process environment."""
from __future__ import annotations

import os

import pytest

from infantino.sync_server import store as st
from infantino.sync_server.db import queries as q
from infantino.sync_server.outbox import OutboxWorker, WorkerSettings
from infantino.sync_server.tracking import MlflowRecorder, TrackingSettings, filter_literal, mlflow_http_env


@pytest.fixture
def store(tmp_path):
    s = st.Store(st.sqlite_url(tmp_path / "server.db"))
    s.create_all()
    with s.write() as conn:
        for ref in ("a", "b", "c"):
            q.enqueue_tracking(conn, "serve", ref)
    yield s
    s.dispose()


def test_rows_are_recorded_in_order_and_a_failure_stops_the_pass(store):
    # Prepare: a recorder that fails once on "b"
    seen, passes = [], []
    fail = {"b"}

    def record(item):
        seen.append(item["ref"])
        if item["ref"] in fail:
            fail.discard(item["ref"])
            raise RuntimeError("tracking server said no\nsecond line")

    worker = OutboxWorker(store, record, after_pass=lambda: passes.append(1))
    # Execute
    first = worker.drain()
    second = worker.drain()
    # Assert: "c" waits behind the failed "b"; the error is kept on the row, one line
    assert first == {"logged": 1, "error": "RuntimeError: tracking server said no", "pending": 2}
    assert second == {"logged": 2} and seen == ["a", "b", "b", "c"] and passes == [1]  # aliases move after a whole pass
    assert worker.status() == {"pending": 0, "dead": 0, "last_error": None}


def test_another_process_holding_the_lease_is_left_alone(store):
    assert store.acquire_lease("tracking", "other-process", 60.0)
    worker = OutboxWorker(store, lambda item: None)
    assert worker.drain() == {"logged": 0, "skipped": "another process holds the tracking lease"}


def test_waits_back_off_between_poll_and_cap():
    worker = OutboxWorker(None, lambda item: None, settings=WorkerSettings(poll_s=5.0, max_backoff_s=120.0))
    assert worker.next_wait(0) == 5.0
    assert 8.0 <= worker.next_wait(1) <= 12.0
    assert all(96.0 <= worker.next_wait(n) <= 144.0 for n in (5, 8, 50))


@pytest.mark.parametrize("value, literal", [("package:tiny-1", "'package:tiny-1'"), ("it's", '"it\'s"')])
def test_filter_values_are_quoted(value, literal):
    assert filter_literal(value) == literal


@pytest.mark.parametrize("value", ["both ' and \"", "back\\slash", "line\nbreak"])
def test_values_mlflow_cannot_quote_are_refused(value):
    with pytest.raises(ValueError, match="cannot be written as an MLflow filter value"):
        filter_literal(value)


class _Client:
    """The registry calls the recorder makes, answering with a chosen exception."""

    def __init__(self, error):
        self.error = error
        self.created = []

    def get_registered_model(self, name):
        raise self.error

    def create_registered_model(self, name):
        self.created.append(name)

    def get_model_version_by_alias(self, name, alias):
        raise self.error


def _recorder(store, tmp_path, error) -> MlflowRecorder:
    rec = MlflowRecorder(store, tmp_path, TrackingSettings("http://127.0.0.1:9"))
    rec._client = _Client(error)
    return rec


def test_only_mlflows_not_found_creates_the_registered_model(store, tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    missing = _recorder(store, tmp_path, MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST))
    missing._ensure_registered_model("infantino-head")
    assert missing._client.created == ["infantino-head"]
    down = _recorder(store, tmp_path, MlflowException("backend unavailable", error_code=TEMPORARILY_UNAVAILABLE))
    with pytest.raises(MlflowException, match="backend unavailable"):
        down._ensure_registered_model("infantino-head")
    assert down._client.created == []
    with pytest.raises(ConnectionError, match="refused"):
        _recorder(store, tmp_path, ConnectionError("refused"))._ensure_registered_model("infantino-head")


def test_an_unset_alias_is_none_but_mlflow_down_is_an_error(store, tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    unset = _recorder(store, tmp_path, MlflowException("Registered model alias production not found.",
                                                       error_code=INVALID_PARAMETER_VALUE))
    assert unset.alias_targets() == (None, None)
    with pytest.raises(MlflowException, match="unavailable"):
        _recorder(store, tmp_path, MlflowException("unavailable", error_code=TEMPORARILY_UNAVAILABLE)).alias_targets()


def test_the_server_leaves_the_process_environment_alone(served_app, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    before = dict(os.environ)
    app = served_app({"MLFLOW_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert app.extensions["infantino"].tracker.drain()["logged"] == 1
    assert dict(os.environ) == before
    settings = app.extensions["infantino"].recorder.settings
    assert mlflow_http_env(settings, {}) == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
    assert mlflow_http_env(settings, {"MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}) == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
