"""GET /metrics (issue 14, item 8): a real ``infantino-server run`` with 2 gunicorn workers, so
every scrape must sum what both workers saw; MLflow down, then back."""
from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infantino.edge_runtime.core import wire
from server_helpers import Server
from infantino.sync_server.store import sqlite_url

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def errors(samples: dict) -> list[dict]:
    return [dict(labels) for (name, labels), v in samples.items() if name == "infantino_tracking_last_error" and v == 1]


def post(url: str, token: str, body: bytes) -> int:
    req = urllib.request.Request(f"{url}/v1/updates", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": wire.CONTENT_TYPE})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # a new connection each time: both workers take some
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def update(serving, head, device: str, scale: float, key: str | None = None) -> bytes:
    layers = [np.full(a.shape, scale, np.float32) for a in head.layers]
    return wire.encode_update(device=device, base_head_version=serving.head_version, base_package_version=serving.package_version,
                              layers=layers, n_samples=4, idempotency_key=key or uuid.uuid4().hex, kind="delta")


@pytest.fixture
def server(tmp_path, tiny_package_dir):
    mlflow_dir = tmp_path / "mlflow"
    mlflow_dir.write_text("not a folder: MLflow is down")
    with Server(tmp_path, tiny_package_dir, mlflow_uri=sqlite_url(mlflow_dir / "mlflow.db")) as srv:
        yield srv, mlflow_dir


def test_metrics_scrape_and_move_across_two_workers(server):
    srv, mlflow_dir = server
    serving = srv.store.serving()
    head = srv.store.head(serving.head_version)
    tokens = {f"cam{i}": srv.token(f"cam{i}") for i in range(4)}
    before = scrape(srv.url)
    assert value(before, "infantino_served_head_version", package_version="tiny-1") == serving.head_version
    assert value(before, "infantino_buffered_updates") == 0
    # Execute: 20 accepted updates from 4 devices, a duplicate, refusals for three reasons
    for i in range(20):
        assert post(srv.url, tokens[f"cam{i % 4}"], update(serving, head, f"cam{i % 4}", 0.001)) == 202
    dup = update(serving, head, "cam0", 0.001, key="dup-key-0001")
    assert [post(srv.url, tokens["cam0"], dup) for _ in range(2)] == [202, 200]
    assert post(srv.url, tokens["cam1"], update(serving, head, "cam1", 10.0)) == 422  # beyond the hard norm bound
    assert post(srv.url, tokens["cam1"], update(serving, head, "cam2", 0.001)) == 403  # another device's name
    assert post(srv.url, "ino_forged", update(serving, head, "cam1", 0.001)) == 401
    mid = scrape(srv.url)
    srv.aggregate()
    deadline = time.monotonic() + 60
    while not errors(scrape(srv.url)) and time.monotonic() < deadline:
        time.sleep(0.5)
    down = scrape(srv.url)
    mlflow_dir.unlink()
    mlflow_dir.mkdir()  # MLflow is back: its SQLite database can be created now
    assert srv.flush_tracking(timeout_s=120)
    back = scrape(srv.url)
    # Assert: event counters summed over both workers, state read from the store
    assert value(mid, "infantino_update_requests_total", outcome="accepted", reason="") == 21
    assert value(mid, "infantino_update_requests_total", outcome="duplicate", reason="") == 1
    for reason in ("norm_bound", "wrong_device", "unauthorized"):
        assert value(mid, "infantino_update_requests_total", outcome="refused", reason=reason) == 1, reason
    assert value(mid, "infantino_buffered_updates") == 21 and value(mid, "infantino_buffered_devices") == 4
    assert value(mid, "infantino_updates", status="buffered") == 21
    assert value(mid, "infantino_devices", state="active") == 4
    assert value(mid, "infantino_request_duration_seconds_count", endpoint="v1.post_update", method="POST") == 25
    assert value(down, "infantino_rounds_total", decision="served") == 1
    assert value(down, "infantino_served_head_version", package_version="tiny-1") == serving.head_version + 1
    assert value(down, "infantino_buffered_updates") == 0 and value(down, "infantino_updates", status="aggregated") == 21
    assert value(down, "infantino_tracking_outbox_pending") >= 2  # the package and the round wait for MLflow
    assert errors(down) and errors(down)[0]["error"]
    assert value(back, "infantino_tracking_outbox_pending") == 0 and errors(back) == []  # cleared on recovery
