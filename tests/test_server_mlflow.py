"""MLflow bookkeeping against a real MLflow (SQLite backend, artifacts in a temp folder):
every round and model is recorded, and MLflow down or hanging never blocks devices."""
from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest

from server_helpers import make_update
from infantino.sync_server import create_app
from infantino.sync_server.models import promote_package
from infantino.sync_server.store import sqlite_url
from infantino.sync_server.tracking import ALIAS, EXTRACTOR_MODEL, FEDERATED_EXPERIMENT, HEAD_MODEL

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # MLflow's own SQLAlchemy usage


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def _post_updates(app, token, device, n, shift=0.01):
    client = app.test_client()
    info = client.get("/v1/model", headers=auth(token)).json
    head = app.extensions["infantino"].store.head(info["head_version"])
    for i in range(n):
        r = client.post("/v1/updates", data=make_update(info, head.layers, device, shift=shift * (i + 1), n_samples=2 + i,
                                                         metrics={"accuracy": 0.5 + 0.1 * i}), headers=auth(token))
        assert r.status_code == 202, r.json
    return info


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_package_dir):
    """One server with a real MLflow (SQLite) for the module: promoted package, two aggregations, drained."""
    root = tmp_path_factory.mktemp("mlflow-module")
    app = create_app({"DATA_DIR": str(root / "data"), "BACKGROUND": False})
    s = app.extensions["infantino"]
    promote_package(s.store, s.data_dir, tiny_package_dir)
    tokens = {name: s.store.add_client(name) for name in ("cam1", "cam2")}
    _post_updates(app, tokens["cam1"], "cam1", 2)
    _post_updates(app, tokens["cam2"], "cam2", 1)
    first = s.aggregate(1)
    _post_updates(app, tokens["cam1"], "cam1", 1)
    second = s.aggregate(1)
    drained = s.tracker.drain()
    yield app, s, tokens, (first, second), drained
    s.close()


def test_every_round_and_model_is_recorded_in_mlflow(tracked):
    from mlflow.tracking import MlflowClient

    app, s, _, (first, second), drained = tracked
    assert drained == {"logged": 3}  # the package and two aggregations
    client = MlflowClient(s.mlflow_uri)
    exp = client.get_experiment_by_name(FEDERATED_EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {f"aggregation-{first.aggregation_id}", f"aggregation-{second.aggregation_id}"}
    run = runs[f"aggregation-{first.aggregation_id}"]
    assert run.data.params["strategy.rule"] == "trimmed_mean" and run.data.params["strategy.staleness"] == "sqrt"
    assert run.data.tags["decision"] == "served"
    assert run.data.params["new_head_version"] == str(first.new_head_version)
    assert run.data.metrics["n_updates"] == 3 and run.data.metrics["n_devices"] == 2
    assert run.data.tags["devices"] == "cam1,cam2"
    assert "staleness_max" in run.data.metrics and "local_accuracy" in run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "head")]
    assert artifacts == [f"head/global-head-{first.new_head_version}.npz"]
    # the artifact is the served head, byte for byte
    local = client.download_artifacts(run.info.run_id, artifacts[0])
    assert open(local, "rb").read() == s.store.head(first.new_head_version).blob

    heads = {int(v.tags["head_version"]): v for v in client.search_model_versions(f"name = '{HEAD_MODEL}'")}
    assert set(heads) == {1, first.new_head_version, second.new_head_version}
    assert client.get_model_version_by_alias(HEAD_MODEL, ALIAS).tags["head_version"] == str(second.new_head_version)
    extractor = client.get_model_version_by_alias(EXTRACTOR_MODEL, ALIAS)
    assert extractor.tags["package_version"] == "tiny-1"
    # draining again logs nothing twice
    assert s.tracker.drain() == {"logged": 0}
    assert len(client.search_model_versions(f"name = '{HEAD_MODEL}'")) == 3


def test_promoting_a_new_extractor_moves_the_alias_and_serves_it(tracked, tmp_path):
    from mlflow.tracking import MlflowClient
    from infantino.export.tiny_package import build_tiny_package

    app, s, tokens, _, _ = tracked
    promote_package(s.store, s.data_dir, build_tiny_package(tmp_path / "p2", version="tiny-2", seed=5))
    assert s.tracker.drain() == {"logged": 1}
    client = MlflowClient(s.mlflow_uri)
    assert client.get_model_version_by_alias(EXTRACTOR_MODEL, ALIAS).tags["package_version"] == "tiny-2"
    served = app.test_client().get("/v1/model", headers=auth(tokens["cam1"])).json
    head_alias = client.get_model_version_by_alias(HEAD_MODEL, ALIAS)
    assert head_alias.tags == {"head_version": str(served["head_version"]), "package_version": "tiny-2", "source": "bootstrap"}
    assert served["package_version"] == "tiny-2"


def test_mlflow_down_keeps_updates_and_logs_them_when_it_is_back(tracked, tmp_path, served_app):
    # Prepare: MLflow's database cannot be opened (its folder is a plain file) = MLflow down
    _, module_state, _, _, _ = tracked
    mlflow_dir = tmp_path / "mlflow-server"
    mlflow_dir.write_text("not a folder")
    app = served_app({"MLFLOW_URI": sqlite_url(mlflow_dir / "mlflow.db")})
    s = app.extensions["infantino"]
    token = s.store.add_client("cam1")
    # Execute: devices keep working, the server keeps aggregating
    _post_updates(app, token, "cam1", 3)
    result = s.aggregate(1)
    down = s.tracker.drain()
    # Assert: nothing lost, the reason is kept
    assert result.n_updates == 3 and s.store.counts() == {"aggregated": 3}
    assert "error" in down and s.tracker.status()["pending"] == 2
    assert s.store.pending_outbox()[0]["attempts"] == 1
    # MLflow comes back (an initialised MLflow database appears at the configured place)
    mlflow_dir.unlink()
    mlflow_dir.mkdir()
    shutil.copyfile(module_state.mlflow_uri.removeprefix("sqlite:///"), mlflow_dir / "mlflow.db")
    assert s.tracker.drain() == {"logged": 2}
    assert s.tracker.status() == {"pending": 0, "dead": 0, "last_error": None}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(s.mlflow_uri)
    exp = client.get_experiment_by_name(FEDERATED_EXPERIMENT)
    names = [r.info.run_name for r in client.search_runs([exp.experiment_id], filter_string=f"params.new_head_version = '{result.new_head_version}'")]
    assert f"aggregation-{result.aggregation_id}" in names


def test_a_hanging_mlflow_blocks_neither_updates_nor_aggregation(tmp_path, tiny_package_dir):
    # Prepare: an "MLflow server" that accepts connections and never answers
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    port = listener.getsockname()[1]
    app = create_app({"DATA_DIR": str(tmp_path / "data"), "BACKGROUND": True, "AGGREGATE_K": 3, "TRACKING_POLL_S": 0.2,
                      "MLFLOW_URI": f"http://127.0.0.1:{port}"})
    s = app.extensions["infantino"]
    try:
        promote_package(s.store, s.data_dir, tiny_package_dir)
        tokens = {name: s.store.add_client(name) for name in ("cam1", "cam2", "cam3")}  # K = 3 devices
        app.test_client().get("/v1/health")  # starts the background threads
        deadline = time.monotonic() + 10
        while not held and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held, "the tracker never tried MLflow"
        # Execute: while the tracker hangs on MLflow
        t0 = time.monotonic()
        for name, token in tokens.items():
            info = _post_updates(app, token, name, 1)
        while s.store.serving().head_version == info["head_version"] and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        # Assert
        assert s.store.serving().head_version == info["head_version"] + 1
        assert time.monotonic() - t0 < 5
        assert s.store.counts() == {"aggregated": 3}
        assert s.store.pending_outbox(10), "the aggregation waits in the outbox for MLflow"
        status = app.test_client().get("/v1/health")
        assert status.status_code == 200
    finally:
        stop.set()
        for c in held:
            c.close()
        listener.close()
        s.close()


def test_moving_the_production_alias_in_mlflow_decides_what_is_served(tracked):
    from mlflow.tracking import MlflowClient

    from infantino.sync_server.models import serve_aliases

    app, s, tokens, (first, second), _ = tracked
    s.tracker.drain()
    client = MlflowClient(s.mlflow_uri)
    # an operator points the aliases back at tiny-1 and its first aggregated head
    ext = next(v for v in client.search_model_versions(f"name = '{EXTRACTOR_MODEL}'") if v.tags["package_version"] == "tiny-1")
    head = next(v for v in client.search_model_versions(f"name = '{HEAD_MODEL}'")
                if v.tags["head_version"] == str(first.new_head_version))
    client.set_registered_model_alias(EXTRACTOR_MODEL, ALIAS, ext.version)
    client.set_registered_model_alias(HEAD_MODEL, ALIAS, head.version)
    assert s.tracker.drain() == {"logged": 0}  # the tracker leaves a hand-moved alias alone
    assert client.get_model_version_by_alias(HEAD_MODEL, ALIAS).version == head.version
    result = serve_aliases(s.store, *s.recorder.alias_targets())
    assert result["package_version"] == "tiny-1" and result["head_version"] == first.new_head_version
    served = app.test_client().get("/v1/model", headers=auth(tokens["cam1"])).json
    assert (served["package_version"], served["head_version"]) == ("tiny-1", first.new_head_version)
    assert s.tracker.drain() == {"logged": 1}  # the rollback is recorded; the aliases still agree
    assert client.get_model_version_by_alias(HEAD_MODEL, ALIAS).version == head.version
