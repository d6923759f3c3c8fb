"""Nothing a device sends can hurt the server (issue 20): a generated corpus of hostile npz bodies
(zip bombs with true and false sizes, every .npy header field, huge and negative numbers, unicode)
against a real gunicorn server answers 4xx, never 5xx, with the server's memory bounded; poison
metric names are refused at the door; a row MLflow can never take is set aside and the rest are
logged; a package file that no longer matches its sha256 is logged, counted and not served."""
from __future__ import annotations

import http.client
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import hostile_bodies
from server_helpers import Server, make_update
from infantino.sync_server.db import queries as q

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # MLflow's own SQLAlchemy usage
RSS_GROWTH_LIMIT_MB = 64


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the server's process group (gunicorn master and workers)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # field 5 of stat: the process group
                continue
            with open(f"/proc/{pid}/status") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return total / 1024


def post(port: int, path: str, body: bytes, token: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={**auth(token), "Content-Type": "application/x-npz"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_a_fuzzed_corpus_gets_4xx_never_5xx_and_server_memory_stays_bounded(tmp_path, tiny_package_dir):
    # Prepare: a real 2-worker gunicorn server, a device token, the corpus (both npz endpoints)
    corpus = hostile_bodies.corpus(seed=20)
    with Server(tmp_path, tiny_package_dir) as server:
        token = server.token("cam1")
        port = server.process.port
        pgid = server.process.proc.pid
        for _ in range(4):  # warm both workers' imports, pools and caches up before measuring
            assert post(port, "/v1/updates", hostile_bodies.zip_of({}), token) == 400
        base = group_rss_mb(pgid)
        jobs = [(path, name, body) for name, body in corpus for path in ("/v1/updates", "/v1/crops")]
        started = time.monotonic()
        # Execute: four clients at once
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda job: (job[0], job[1], post(port, job[0], job[2], token)), jobs))
        seconds = time.monotonic() - started
        after = group_rss_mb(pgid)
        log = server.process.log()
    # Assert: every answer a refusal (or an honest accept), none a server error, memory bounded
    worst = max(s for _, _, s in statuses)
    errors = [(p, n, s) for p, n, s in statuses if s >= 500]
    assert not errors, errors[:10]
    assert all(s < 500 for _, _, s in statuses) and worst < 500
    assert after - base < RSS_GROWTH_LIMIT_MB, f"server RSS grew {after - base:.0f} MB ({base:.0f} -> {after:.0f})"
    assert "Traceback" not in log
    print(f"\nfuzz: {len(jobs)} requests ({len(corpus)} bodies x 2 endpoints) in {seconds:.1f} s, worst status {worst}, "
          f"RSS {base:.0f} -> {after:.0f} MB")


def test_poison_metric_names_and_lone_surrogates_are_refused_at_the_door(served_app):
    app = served_app()
    s = app.extensions["infantino"]
    token = s.store.add_client("cam1")
    client = app.test_client()
    info = client.get("/v1/model", headers=auth(token)).json
    head = s.store.head(info["head_version"])
    for name, status in (("\ud800", 400), ("a=b", 422), ("%", 422), ('"', 422), ("a/b", 422), ("x" * 65, 422),
                         ("", 422), ("..", 422), ("labels", 202), ("local.acc:1-2_x", 202)):
        r = client.post("/v1/updates", data=make_update(info, head.layers, "cam1", metrics={name: 1.0}), headers=auth(token))
        assert r.status_code == status, (name, r.json)
    assert s.store.counts() == {"buffered": 2}


def test_a_row_mlflow_can_never_take_is_set_aside_and_the_rows_after_it_are_logged(tmp_path, tiny_package_dir):
    from mlflow.tracking import MlflowClient

    from infantino.sync_server import create_app
    from infantino.sync_server.models import promote_package
    from infantino.sync_server.tracking import FEDERATED_EXPERIMENT

    # Prepare: a real MLflow (SQLite); the package row, a row whose aggregation does not exist, a real round
    app = create_app({"DATA_DIR": str(tmp_path / "data"), "BACKGROUND": False})
    s = app.extensions["infantino"]
    try:
        promote_package(s.store, s.data_dir, tiny_package_dir)
        with s.store.write() as conn:
            q.enqueue_tracking(conn, "aggregation", "999999")
        token = s.store.add_client("cam1")
        client = app.test_client()
        info = client.get("/v1/model", headers=auth(token)).json
        head = s.store.head(info["head_version"])
        r = client.post("/v1/updates", data=make_update(info, head.layers, "cam1"), headers=auth(token))
        assert r.status_code == 202
        result = s.aggregate(1)
        # Execute
        drained = s.tracker.drain()
        again = s.tracker.drain()
        # Assert: the poison row delayed nothing but itself; it is counted in status and /metrics
        assert drained == {"logged": 2, "dead": 1} and again == {"logged": 0}
        assert s.tracker.status()["dead"] == 1 and s.tracker.status()["pending"] == 0
        metrics = client.get("/metrics").get_data(as_text=True)
        assert "infantino_tracking_outbox_dead 1.0" in metrics and "infantino_tracking_outbox_pending 0.0" in metrics
        runs = MlflowClient(s.mlflow_uri).search_runs(
            [MlflowClient(s.mlflow_uri).get_experiment_by_name(FEDERATED_EXPERIMENT).experiment_id])
        assert [r.data.tags["infantino.ref"] for r in runs] == [f"aggregation:{result.aggregation_id}"]
    finally:
        s.close()


def test_a_package_file_that_no_longer_matches_its_sha256_is_logged_counted_and_not_served(served_app, tmp_path, caplog):
    # Prepare: a served package; its bootstrap head changed on the server's disk afterwards
    app = served_app()
    s = app.extensions["infantino"]
    token = s.store.add_client("cam1")
    client = app.test_client()
    files = client.get("/v1/model", headers=auth(token)).json["files"]
    assert client.get(files["head"]["url"], headers=auth(token)).status_code == 200
    served = Path(s.data_dir) / s.store.serving().folder / files["head"]["name"]
    original = served.read_bytes()
    served.write_bytes(original[:100] + bytes([original[100] ^ 0xFF]) + original[101:])
    # Execute: asked twice; and a server started on the tampered folder
    with caplog.at_level(logging.ERROR, logger="infantino.server"):
        first = client.get(files["head"]["url"], headers=auth(token))
        second = client.get(files["head"]["url"], headers=auth(token))
        extractor = client.get(files["extractor"]["url"], headers=auth(token))
        restarted = served_app(data_dir=Path(s.data_dir))
    # Assert: refused, one log line per process that noticed, counted; the intact files are still served
    assert first.status_code == second.status_code == 503 and "sha256" in first.json["error"]
    assert extractor.status_code == 200
    lines = [r.getMessage() for r in caplog.records if "does not match its manifest sha256" in r.getMessage()]
    assert len(lines) == 2 and all(files["head"]["name"] in line for line in lines)  # this process once, the restart once
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'infantino_package_file_mismatches_total{{file="{files["head"]["name"]}"}} 1.0' in metrics
    assert restarted.test_client().get(files["head"]["url"], headers=auth(token)).status_code == 503
    # restored: served again
    served.write_bytes(original)
    assert client.get(files["head"]["url"], headers=auth(token)).status_code == 200
