"""Inputs that used to reach a 500 or slip through (issue 14, items 6 and 7): each gets a clear
one-line 4xx or works. Flask's test client for the parsing, a real gunicorn server for chunked
bodies, the real CLI for device names."""
from __future__ import annotations

import http.client
import io
import json
import shutil
import tarfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert

from infantino.edge_runtime.core import wire
from server_helpers import REPO, Server, cli, make_update
from infantino.sync_server import store as st
from infantino.sync_server.crops import export_folder
from infantino.sync_server.models import PromoteError, promote_package

DEEP = 100_000  # far past Python's recursion limit


@pytest.fixture
def app(served_app):
    return served_app()


@pytest.fixture
def tokens(app):
    store = app.extensions["infantino"].store
    return {"cam1": store.add_client("cam1"), "admin": store.rotate_admin()}


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def served(client, token):
    info = client.get("/v1/model", headers=auth(token)).json
    from infantino.edge_runtime.core.head import OnlineHead

    return info, OnlineHead.from_bytes(client.get(info["files"]["global_head"]["url"], headers=auth(token)).data)


def _raw_meta_body(meta_json: str, layers) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, meta=np.asarray(meta_json), **wire.layers_to_dict(layers))
    return buf.getvalue()


def one_line_4xx(r, status: int, words: str) -> None:
    assert r.status_code == status, (r.status_code, r.data[:300])
    assert words.lower() in r.json["error"].lower() and "\n" not in r.json["error"], r.json


# --------------------------------------------------------------------------- item 6: parsing


def test_hostile_update_meta_gets_a_4xx(app, tokens):
    client = app.test_client()
    info, head = served(client, tokens["cam1"])
    w = head.weights()
    nested = _raw_meta_body('{"format": "infantino-update/1", "metrics": ' + "[" * DEEP + "]" * DEEP + "}", w)
    one_line_4xx(client.post("/v1/updates", data=nested, headers=auth(tokens["cam1"])), 400, "nested too deeply")
    huge_version = make_update(info, w, "cam1", base_head_version=2**70)
    one_line_4xx(client.post("/v1/updates", data=huge_version, headers=auth(tokens["cam1"])), 422, "base_head_version")
    huge_metric = make_update(info, w, "cam1", metrics={"accuracy": 10**400})
    one_line_4xx(client.post("/v1/updates", data=huge_metric, headers=auth(tokens["cam1"])), 422, "finite number")
    assert app.extensions["infantino"].store.counts() == {}


def test_a_nested_crops_meta_gets_a_400(app, tokens):
    client = app.test_client()
    buf = io.BytesIO()
    np.savez(buf, meta=np.asarray('{"x": ' + "[" * DEEP + "]" * DEEP + "}"), crops=np.zeros((1, 64, 64), np.uint8),
             labels=np.zeros(1, np.int64))
    one_line_4xx(client.post("/v1/crops", data=buf.getvalue(), headers=auth(tokens["cam1"])), 400, "nested too deeply")


@pytest.mark.parametrize("body, status, words", [
    (b"[1]", 400, "JSON object"), (b"{not json", 400, "not valid JSON"), (b'{"min_updates": 0}', 400, "positive integer"),
    (b'{"min_updates": ' + str(2**70).encode() + b"}", 400, "positive integer"), (b"[" * 30_000, 400, "not valid JSON"),
], ids=["list", "not json", "zero", "huge", "nested"])
def test_admin_aggregate_refuses_what_is_not_a_json_object(app, tokens, body, status, words):
    r = app.test_client().post("/v1/admin/aggregate", data=body, headers={**auth(tokens["admin"]), "Content-Type": "application/json"})
    one_line_4xx(r, status, words)


def test_admin_aggregate_without_a_body_still_works(app, tokens):
    r = app.test_client().post("/v1/admin/aggregate", headers=auth(tokens["admin"]))
    assert r.status_code == 200 and r.json["aggregated"] is False


def test_a_nested_package_manifest_gets_a_4xx(app, tokens):
    buf = io.BytesIO()
    manifest = ("{\"version\": " + "[" * DEEP + "]" * DEEP + "}").encode()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    r = app.test_client().post("/v1/admin/packages?force=true", data=buf.getvalue(), headers=auth(tokens["admin"]))
    one_line_4xx(r, 422, "nested too deeply")


# --------------------------------------------------------------------------- item 6: chunked bodies, real server


def _chunked(url: str, path: str, token: str, body: bytes, piece: int = 256 * 1024) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    chunks = (body[i:i + piece] for i in range(0, len(body), piece))
    conn.request("POST", path, body=chunks, headers={"Authorization": f"Bearer {token}"}, encode_chunked=True)
    resp = conn.getresponse()
    answer = json.loads(resp.read() or b"{}")
    conn.close()
    return resp.status, answer


@pytest.fixture(scope="module")
def running(tmp_path_factory, tiny_package_dir):
    with Server(tmp_path_factory.mktemp("chunked"), tiny_package_dir) as srv:
        yield srv


def test_chunked_bodies_are_read_whole_and_refused_past_the_limit(running):
    token = running.token("cam-chunked")
    serving = running.store.serving()
    head = running.store.head(serving.head_version)
    info = {"head_version": serving.head_version, "package_version": serving.package_version}
    good = make_update(info, list(head.layers), "cam-chunked")
    assert _chunked(running.url, "/v1/updates", token, good)[0] == 202
    status, answer = _chunked(running.url, "/v1/updates", token, b"\0" * (5 * 1024 * 1024))
    assert status == 413 and "too large" in answer["error"]


def test_a_legit_21_mb_package_sent_chunked_is_promoted(running):
    release = REPO / "data" / "models"
    if not (release / "manifest.json").exists():
        pytest.skip("the release package is not in data/models")
    from infantino.export.publish import package_tar

    body = package_tar(release)
    assert len(body) > 20 * 1024 * 1024
    status, answer = _chunked(running.url, "/v1/admin/packages?force=true", running.admin, body)
    assert status == 200 and answer["promoted"], answer
    assert running.store.serving().package_version == json.loads((release / "manifest.json").read_text())["version"]


# --------------------------------------------------------------------------- item 7: device names


@pytest.mark.parametrize("name", ["../../escaped", "cam\nnext", "x" * 5000, "", "admin", "ADMIN", "-cam", "cam/1", "cäm"],
                         ids=["traversal", "newline", "5000 chars", "empty", "admin", "ADMIN", "dash first", "slash", "umlaut"])
def test_unsafe_device_names_are_refused_by_the_store(app, name):
    with pytest.raises(st.StoreError, match="device name"):
        app.extensions["infantino"].store.add_client(name)


def test_device_names_at_the_cli_and_a_device_named_admin(tmp_path, tiny_package_dir):
    data = ["--data-dir", str(tmp_path), "--mlflow-uri", "off"]
    bad = cli("device", "add", "../../escaped", *data, check=False)
    assert bad.returncode == 1 and "device name" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert cli("device", "add", "cam-nursery_1.a", *data).stdout.startswith("ino_")
    # a device called "admin" from before names were checked must not break admin-token
    store = st.Store(st.sqlite_url(tmp_path / "server.db"))
    with store.write() as conn:
        conn.execute(insert(st.clients).values(name="admin", kind="device", token_hash="0" * 64, created_at=time.time()))
    first = cli("admin-token", *data)
    second = cli("admin-token", *data)
    tokens = [first.stdout.strip().splitlines()[-1], second.stdout.strip().splitlines()[-1]]
    assert store.client_for_token(tokens[1]).kind == "admin" and store.client_for_token(tokens[0]) is None  # rotated
    store.dispose()


def test_crops_export_never_writes_outside_its_folder(app, tmp_path):
    store = app.extensions["infantino"].store
    with store.write() as conn:  # a device stored before names were checked
        cid = conn.execute(insert(st.clients).values(name="../../escaped", kind="device", token_hash="1" * 64,
                                                     created_at=time.time())).inserted_primary_key[0]
        conn.execute(insert(st.crops).values(client_id=cid, label=3, height=64, width=64, pixels=bytes(64 * 64),
                                             sha256="2" * 64, package_version="tiny-1", batch_key="k" * 8, created_at=time.time()))
    out = tmp_path / "export" / "inner"
    classes = list(store.serving().manifest["classes"])
    assert export_folder(store, out, classes) == 1
    written = [p for p in (tmp_path / "export").rglob("*") if p.is_file()]
    assert [p.relative_to(out).as_posix() for p in written] == [f"happy/client-{cid}-1.png"]
    with pytest.raises(st.StoreError, match="device name"):
        export_folder(store, out, classes, device="../../escaped")
    with pytest.raises(st.StoreError, match="plain file name"):
        export_folder(store, out, ["../up"] * len(classes))


def test_a_package_listing_a_path_outside_itself_is_refused(app, tmp_path, tiny_package_dir):
    from infantino.edge_runtime.core.package import read_manifest, sha256_file, write_manifest

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package_dir, pkg)
    (tmp_path / "outside.bin").write_bytes(b"secret")
    manifest = read_manifest(pkg)
    manifest.version = f"escape-{uuid.uuid4().hex[:6]}"
    manifest.files["extra"] = {"path": "../outside.bin", "sha256": sha256_file(tmp_path / "outside.bin"), "bytes": 6}
    write_manifest(pkg, manifest)
    s = app.extensions["infantino"]
    with pytest.raises(PromoteError, match="plain"):  # open_package refuses it first; promote checks again
        promote_package(s.store, s.data_dir, pkg)
