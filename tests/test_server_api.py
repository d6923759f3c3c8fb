"""The HTTP API through Flask's test client: auth, model serving, updates and every hostile case."""
from __future__ import annotations

import hashlib
import io
import time
import uuid
import zipfile

import numpy as np
import pytest

from infantino.edge_runtime.core import wire
from infantino.edge_runtime.core.head import OnlineHead
from server_helpers import make_update
from infantino.sync_server.aggregate import Strategy
from infantino.sync_server.models import promote_package


@pytest.fixture
def app(served_app):
    return served_app({"MAX_UPDATE_BYTES": 256 * 1024, "MAX_STALENESS": 1, "MAX_DELTA_NORM": 20.0})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def tokens(app):
    store = app.extensions["infantino"].store
    return {"cam1": store.add_client("cam1"), "cam2": store.add_client("cam2"), "admin": store.rotate_admin()}


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def model(client, token):
    r = client.get("/v1/model", headers=auth(token))
    assert r.status_code == 200, r.json
    head = OnlineHead.from_bytes(client.get(r.json["files"]["global_head"]["url"], headers=auth(token)).data)
    return r.json, head


def counts(app):
    return app.extensions["infantino"].store.counts()


def test_health_is_open_and_reports_what_is_served(client):
    r = client.get("/v1/health")
    assert r.status_code == 200
    assert r.json["status"] == "ok" and r.json["serving"]["package_version"] == "tiny-1"


def test_model_needs_a_live_token_of_the_right_kind(app, client, tokens):
    assert client.get("/v1/model").status_code == 401
    r = client.get("/v1/model", headers=auth("ino_forged"))
    assert r.status_code == 401 and r.json["error"] == "unknown token" and "Bearer" in r.headers["WWW-Authenticate"]
    assert client.get("/v1/model", headers=auth(tokens["cam1"])).status_code == 200
    assert client.get("/v1/admin/status", headers=auth(tokens["cam1"])).status_code == 403
    assert client.post("/v1/updates", data=b"x", headers=auth(tokens["admin"])).status_code == 403
    app.extensions["infantino"].store.revoke("cam1")
    r = client.get("/v1/model", headers=auth(tokens["cam1"]))
    assert r.status_code == 403 and "revoked" in r.json["error"]


def test_model_info_etag_and_files_match_their_hashes(client, tokens, tiny_package_dir):
    # Execute
    r = client.get("/v1/model", headers=auth(tokens["cam1"]))
    etag = r.headers["ETag"]
    again = client.get("/v1/model", headers={**auth(tokens["cam1"]), "If-None-Match": etag})
    # Assert
    assert again.status_code == 304 and again.data == b""
    info = r.json
    assert set(info["files"]) >= {"manifest", "extractor", "head", "global_head"}
    for role, entry in info["files"].items():
        data = client.get(entry["url"], headers=auth(tokens["cam1"])).data
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], role
        if role != "global_head":
            assert data == (tiny_package_dir / entry["name"]).read_bytes()
    assert client.get("/v1/model/files/..%2fserver.db", headers=auth(tokens["cam1"])).status_code == 404
    assert client.get("/v1/model/files/server.db", headers=auth(tokens["cam1"])).status_code == 404
    assert client.get("/v1/model/files/extractor.onnx?package=nope", headers=auth(tokens["cam1"])).status_code == 404
    assert client.get("/v1/model/files/global-head-999.npz", headers=auth(tokens["cam1"])).status_code == 404


def test_an_update_is_accepted_once_and_a_retry_gets_the_same_receipt(app, client, tokens):
    info, head = model(client, tokens["cam1"])
    body = make_update(info, head.weights(), "cam1", key="key-0000001")
    first = client.post("/v1/updates", data=body, headers=auth(tokens["cam1"]))
    retry = client.post("/v1/updates", data=body, headers=auth(tokens["cam1"]))
    assert first.status_code == 202 and first.json["status"] == "buffered"
    assert retry.status_code == 200 and retry.json["duplicate"] and retry.json["update_id"] == first.json["update_id"]
    other = make_update(info, head.weights(), "cam1", key="key-0000001", shift=0.02)
    r = client.post("/v1/updates", data=other, headers=auth(tokens["cam1"]))
    assert r.status_code == 409 and "different update" in r.json["error"]
    assert counts(app) == {"buffered": 1}


def _hostile_bodies(info, head):
    w = head.weights()
    nan = [a.copy() for a in w]
    nan[0][0, 0] = np.nan
    inf = [a.copy() for a in w]
    inf[-1][0] = np.inf
    wrong_shape = [a.copy() for a in w]
    wrong_shape[0] = np.zeros((w[0].shape[0] + 1, w[0].shape[1]), np.float32)
    layers = wire.layers_to_dict(w)
    ints = {**layers, "coef_0": layers["coef_0"].astype(np.int32)}
    extra = {**layers, "coef_9": np.zeros(3, np.float32)}
    missing = {k: v for k, v in layers.items() if k != "intercept_1"}
    meta = {"format": wire.UPDATE_FORMAT, "device": "cam1", "base_head_version": info["head_version"],
            "base_package_version": info["package_version"], "n_samples": 3, "idempotency_key": uuid.uuid4().hex,
            "metrics": {}, "kind": "weights"}
    pickled = io.BytesIO()
    np.savez(pickled, meta=np.asarray('{"format": "x"}'), coef_0=np.array([{"evil": 1}], dtype=object))
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("coef_0.npy", b"\0" * (50 * 1024 * 1024))
    return {
        "nan": (make_update(info, nan, "cam1", shift=0), 422, "NaN"),
        "inf": (make_update(info, inf, "cam1", shift=0), 422, "NaN or infinite"),
        "wrong shape": (make_update(info, wrong_shape, "cam1", shift=0), 422, "shape"),
        "int dtype": (wire.encode({**meta}, ints), 422, "dtype"),
        "extra array": (wire.encode({**meta}, extra), 422, "unexpected"),
        "missing array": (wire.encode({**meta}, missing), 422, "missing"),
        "not npz": (b"{\"weights\": [1, 2, 3]}", 400, "not an npz"),
        "pickle": (pickled.getvalue(), 400, "pickle"),
        "zip bomb": (bomb.getvalue(), 400, "inflate"),
        "huge body": (b"\0" * (300 * 1024), 413, "too large"),
        "no meta": (_npz(layers), 400, "meta"),
        "bad format": (wire.encode({**meta, "format": "other/9"}, layers), 400, "format"),
        "zero samples": (make_update(info, w, "cam1", n_samples=0), 422, "n_samples"),
        "bool samples": (wire.encode({**meta, "n_samples": True}, layers), 400, "integer"),
        "short key": (make_update(info, w, "cam1", key="k"), 400, "idempotency_key"),
        "bad metric": (make_update(info, w, "cam1", metrics={"accuracy": float("nan")}), 422, "metric"),
        "huge norm": (make_update(info, w, "cam1", shift=100.0), 422, "beyond the bound"),
        "unknown head": (make_update(info, w, "cam1", base_head_version=999), 422, "unknown base head"),
        "unknown package": (make_update(info, w, "cam1", base_package_version="made-up"), 422, "unknown base package"),
        "other device": (make_update(info, w, "cam2"), 403, "cam2"),
        "bad kind": (wire.encode({**meta, "kind": "gradient"}, layers), 400, "kind"),
    }


def _npz(arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_hostile_updates_get_a_clear_4xx_and_store_nothing(app, client, tokens):
    info, head = model(client, tokens["cam1"])
    for name, (body, status, reason) in _hostile_bodies(info, head).items():
        r = client.post("/v1/updates", data=body, headers=auth(tokens["cam1"]))
        assert r.status_code == status, (name, r.status_code, r.json)
        assert reason.lower() in r.json["error"].lower(), (name, r.json)
        assert "\n" not in r.json["error"]
    assert counts(app) == {}
    # a good update still goes through afterwards
    assert client.post("/v1/updates", data=make_update(info, head.weights(), "cam1"), headers=auth(tokens["cam1"])).status_code == 202


def test_stale_updates_are_discounted_then_refused(app, client, tokens):
    s = app.extensions["infantino"]
    info, head = model(client, tokens["cam1"])
    old = make_update(info, head.weights(), "cam1")
    assert client.post("/v1/updates", data=make_update(info, head.weights(), "cam2"), headers=auth(tokens["cam2"])).status_code == 202
    s.aggregate(1)  # head v2: the old update is 1 version behind, still accepted
    r = client.post("/v1/updates", data=old, headers=auth(tokens["cam1"]))
    assert r.status_code == 202 and r.json["staleness"] == 1
    s.aggregate(1)  # head v3
    too_old = make_update(info, head.weights(), "cam1")
    r = client.post("/v1/updates", data=too_old, headers=auth(tokens["cam1"]))
    assert r.status_code == 409 and "behind" in r.json["error"]


def test_update_for_a_replaced_package_is_refused(app, client, tokens, tmp_path):
    from infantino.export.tiny_package import build_tiny_package

    s = app.extensions["infantino"]
    info, head = model(client, tokens["cam1"])
    promote_package(s.store, s.data_dir, build_tiny_package(tmp_path / "p2", version="tiny-2", seed=3))
    r = client.post("/v1/updates", data=make_update(info, head.weights(), "cam1"), headers=auth(tokens["cam1"]))
    assert r.status_code == 409 and "pull the new model" in r.json["error"]
    assert client.get("/v1/model", headers=auth(tokens["cam1"])).json["package_version"] == "tiny-2"


def test_on_demand_aggregation_moves_the_head_by_one_voice_per_device(app, client, tokens):
    app.extensions["infantino"].strategy = Strategy(rule="fedavg", clip_norm=None)  # the plain mean, to check exact numbers
    info, head = model(client, tokens["cam1"])
    etag = client.get("/v1/model", headers=auth(tokens["cam1"])).headers["ETag"]
    w = head.weights()
    for dev, shift, n in (("cam1", 0.01, 1), ("cam2", 0.05, 3)):
        body = make_update(info, w, dev, shift=shift, n_samples=n)
        assert client.post("/v1/updates", data=body, headers=auth(tokens[dev])).status_code == 202
    delta_body = make_update(info, [np.zeros_like(a) for a in w], "cam1", shift=0.0, n_samples=4, kind="delta")
    assert client.post("/v1/updates", data=delta_body, headers=auth(tokens["cam1"])).status_code == 202
    r = client.post("/v1/admin/aggregate", json={"min_updates": 3}, headers=auth(tokens["admin"]))
    assert r.json == {"aggregated": False, "reason": "fewer than 3 devices have updates buffered for the served package"}
    r = client.post("/v1/admin/aggregate", json={}, headers=auth(tokens["admin"]))
    assert r.status_code == 200 and r.json["aggregated"] and r.json["n_updates"] == 3 and r.json["n_devices"] == 2
    new_info, new_head = model(client, tokens["cam1"])
    assert new_info["head_version"] == info["head_version"] + 1 == new_head.version
    assert client.get("/v1/model", headers={**auth(tokens["cam1"]), "If-None-Match": etag}).status_code == 200
    # cam1's two updates are one voice (0.01 + 0.0, 1 + 4 labels), cam2 is the other (0.05, 3 labels)
    expected = (0.01 * 5 + 0.05 * 3) / 8
    for a, b in zip(new_head.weights(), w):
        np.testing.assert_allclose(a - b, expected, atol=1e-5)
    status = client.get("/v1/admin/status", headers=auth(tokens["admin"])).json
    assert status["updates"] == {"aggregated": 3} and status["serving"]["head_version"] == new_info["head_version"]


def test_k_devices_with_buffered_updates_trigger_a_step_in_the_background(served_app):
    app = served_app({"BACKGROUND": True, "AGGREGATE_K": 3})
    s = app.extensions["infantino"]
    tokens = {name: s.store.add_client(name) for name in ("cam1", "cam2", "cam3")}
    client = app.test_client()
    info, head = model(client, tokens["cam1"])
    for _ in range(4):  # one token alone never makes a round, however much it posts
        client.post("/v1/updates", data=make_update(info, head.weights(), "cam1"), headers=auth(tokens["cam1"]))
    client.post("/v1/updates", data=make_update(info, head.weights(), "cam2"), headers=auth(tokens["cam2"]))
    time.sleep(0.5)
    assert s.store.serving().head_version == info["head_version"]  # K = 3 devices not reached
    client.post("/v1/updates", data=make_update(info, head.weights(), "cam3"), headers=auth(tokens["cam3"]))
    deadline = time.monotonic() + 10
    while s.store.serving().head_version == info["head_version"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.store.serving().head_version == info["head_version"] + 1
    assert s.store.counts() == {"aggregated": 6}
