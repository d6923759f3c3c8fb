"""A real server process: ``infantino-server run`` = gunicorn with 2 workers on 127.0.0.1."""
from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from infantino.edge_runtime.core.head import OnlineHead
from infantino.edge_runtime.sync.transport import Http
from server_helpers import BACKENDS, ServerProcess, cli, make_update, served_store, store_url_for
from infantino.sync_server import store as st


def _get_model(http: Http):
    info = http.request("GET", "/v1/model").json()
    head = OnlineHead.from_bytes(http.request("GET", info["files"]["global_head"]["url"]).body)
    return info, head


@pytest.mark.parametrize("backend", BACKENDS)
def test_devices_push_concurrently_through_two_workers(backend, tmp_path, tiny_package_dir):
    with store_url_for(backend, tmp_path) as url:
        data = tmp_path / "data"
        store = served_store(url, data, tiny_package_dir)
        tokens = {f"cam{i}": store.add_client(f"cam{i}") for i in range(6)}
        admin = store.rotate_admin()
        with ServerProcess(data, db_url=url, aggregate_k=7) as server:
            info, head = _get_model(Http(server.url, tokens["cam0"]))
            sent: dict[str, int] = {}
            errors: list[str] = []

            def device(name: str):
                http = Http(server.url, tokens[name], timeout_s=20)
                for i in range(8):
                    body = make_update(info, head.weights(), name, shift=0.001 * (i + 1), key=f"{name}-{i}-{uuid.uuid4().hex[:8]}")
                    for attempt in range(2):  # every update is sent twice: the retry must be a no-op
                        r = http.request("POST", "/v1/updates", body=body)
                        if r.status not in (200, 202) and r.status != 409:
                            errors.append(f"{name}: {r.status} {r.reason}")
                        if attempt == 1 and r.status == 200 and not r.json().get("duplicate"):
                            errors.append(f"{name}: retry was not recognised as a duplicate")
                sent[name] = 8

            threads = [threading.Thread(target=device, args=(n,)) for n in tokens]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors[:5]
            # the rest is aggregated on demand through the admin endpoint
            r = Http(server.url, admin).request("POST", "/v1/admin/aggregate", body=b"{}", headers={"Content-Type": "application/json"})
            assert r.status == 200
            status = Http(server.url, admin).request("GET", "/v1/admin/status").json()
        counts = status["updates"]
        assert counts.get("aggregated", 0) + counts.get("buffered", 0) == 48  # 6 devices x 8, none twice, none lost
        assert counts.get("buffered", 0) == 0
        assert status["serving"]["head_version"] > info["head_version"]
        assert all(d["last_update"] for d in store.list_clients() if d["kind"] == "device")
        store.dispose()


def test_revoked_device_is_refused_by_a_running_server(tmp_path, tiny_package_dir):
    data = tmp_path / "data"
    out = cli("promote", str(tiny_package_dir), "--data-dir", str(data), "--mlflow-uri", "off")
    assert json.loads(out.stdout)["action"] == "promoted"
    token = cli("device", "add", "cam-r", "--data-dir", str(data)).stdout.strip()
    with ServerProcess(data) as server:
        http = Http(server.url, token, retries=0)
        info, head = _get_model(http)
        assert http.request("POST", "/v1/updates", body=make_update(info, head.weights(), "cam-r")).status == 202
        out = cli("device", "revoke", "cam-r", "--data-dir", str(data))
        assert "revoked" in out.stdout
        r = http.request("POST", "/v1/updates", body=make_update(info, head.weights(), "cam-r"))
        assert r.status == 403 and "revoked" in r.reason
        assert http.request("GET", "/v1/model").status == 403
        assert Http(server.url, "ino_not-a-token", retries=0).request("GET", "/v1/model").status == 401
    listing = cli("device", "list", "--data-dir", str(data)).stdout
    assert "cam-r" in listing and "revoked" in listing


def test_server_killed_mid_aggregation_restarts_with_nothing_lost_or_doubled(tmp_path, tiny_package_dir):
    # Prepare: K = 4 devices, and a fault that holds the aggregation transaction open
    data = tmp_path / "data"
    data.mkdir()
    url = f"sqlite:///{data / 'server.db'}"
    store = served_store(url, data, tiny_package_dir)
    tokens = {f"cam-k{i}": store.add_client(f"cam-k{i}") for i in range(4)}
    token = tokens["cam-k0"]
    server = ServerProcess(data, aggregate_k=4, env={"INFANTINO_FAULT_AGGREGATE_PAUSE_S": "60"}).start()
    try:
        info, head = _get_model(Http(server.url, token))
        ids = []
        for name, device_token in tokens.items():
            r = Http(server.url, device_token).request("POST", "/v1/updates", body=make_update(info, head.weights(), name, shift=0.01))
            assert r.status == 202
            ids.append(r.json()["update_id"])
        deadline = time.monotonic() + 30
        while "fault injection" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "fault injection" in server.log(), server.log()
        # Execute: kill -9 the master and both workers mid-aggregation
        server.kill()
    finally:
        server.kill()
    assert store.counts() == {"buffered": 4} and store.serving().head_version == info["head_version"]
    # ... restart: the new workers find K buffered updates and step once
    with ServerProcess(data, aggregate_k=4, port=server.port) as again:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = Http(again.url, token).request("GET", "/v1/model").json()
            if status["head_version"] > info["head_version"]:
                break
            time.sleep(0.1)
        retry = Http(again.url, token).request("POST", "/v1/updates",
                                              body=make_update(info, head.weights(), "cam-k0", key="never-sent-before"))
    assert store.serving().head_version == info["head_version"] + 1
    assert store.counts() == {"aggregated": 4, "buffered": 1}
    assert retry.status == 202 and retry.json()["staleness"] == 1
    with store.read() as conn:
        rows = conn.execute(st.aggregations.select()).all()
    store.dispose()
    assert len(rows) == 1 and sorted(json.loads(rows[0].update_ids)) == sorted(ids)


def test_hostile_updates_over_http_get_one_line_refusals(tmp_path, tiny_package_dir):
    import http.client as httplib

    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    store = served_store(f"sqlite:///{data / 'server.db'}", data, tiny_package_dir)
    token = store.add_client("cam-h")
    store.add_client("cam-other")  # exists, so its update is refused for identity, not as unknown
    with ServerProcess(data) as server:
        client = Http(server.url, token, retries=0)
        info, head = _get_model(client)
        w = head.weights()
        nan = [a.copy() for a in w]
        nan[1][0, 0] = np.nan
        cases = {
            "nan": (make_update(info, nan, "cam-h", shift=0), 422),
            "wrong shape": (make_update(info, [w[0][:-1]] + w[1:], "cam-h"), 422),
            "another device": (make_update(info, w, "cam-other"), 403),
            "stale package": (make_update(info, w, "cam-h", base_package_version="tiny-0"), 422),
            "unknown head": (make_update(info, w, "cam-h", base_head_version=info["head_version"] + 5), 422),
        }
        for name, (body, status) in cases.items():
            r = client.request("POST", "/v1/updates", body=body)
            assert r.status == status and r.reason and "\n" not in r.reason, (name, r.status, r.body[:200])
        # 5 MB: refused from the Content-Length, before the body is read
        conn = httplib.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            conn.putrequest("POST", "/v1/updates")
            conn.putheader("Authorization", f"Bearer {token}")
            conn.putheader("Content-Length", str(5 * 1024 * 1024))
            conn.endheaders()
            conn.send(b"\0" * 65536)
            resp = conn.getresponse()
            assert resp.status == 413 and b"too large" in resp.read()
        finally:
            conn.close()
        assert client.request("POST", "/v1/updates", body=make_update(info, w, "cam-h")).status == 202
    assert store.counts() == {"buffered": 1}
    store.dispose()
