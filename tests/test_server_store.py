"""Store and aggregation against real databases: SQLite always, PostgreSQL with INFANTINO_TEST_PG_URL."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from sqlalchemy import select

from infantino.edge_runtime.core.head import OnlineHead
from server_helpers import BACKENDS, REPO, served_store, store_url_for
from infantino.sync_server import store as st
from infantino.sync_server.aggregate import Strategy
from infantino.sync_server.models import PromoteError, promote_package
from infantino.sync_server.rounds import RoundPolicy, aggregate_once

PLAIN = Strategy(rule="fedavg", clip_norm=None, staleness="none")  # the plain weighted mean, to check exact numbers
NO_CAP = RoundPolicy(label_burst=1e9, clip_cap_factor=0.0)  # no label cap, no clip cap from past rounds


@pytest.fixture(params=BACKENDS)
def served(request, tmp_path, tiny_package_dir):
    """(store, data_dir, url) with the tiny package promoted; closed afterwards."""
    with store_url_for(request.param, tmp_path) as url:
        store = served_store(url, tmp_path, tiny_package_dir)
        yield store, tmp_path, url
        store.dispose()


def _record(store: st.Store, client_id: int, key: str | None = None, value: float = 0.01, n: int = 5) -> st.UpdateRecord:
    serving = store.serving()
    head = store.head(serving.head_version)
    delta = np.full(head.flat.size, value, np.float32)
    return st.UpdateRecord(client_id=client_id, idempotency_key=key or uuid.uuid4().hex, body_sha256=f"{value:064.6f}"[:64],
                           package_version=serving.package_version, base_head_version=serving.head_version, n_samples=n,
                           metrics={"accuracy": 0.5}, delta=delta.tobytes(), delta_norm=float(np.linalg.norm(delta)))


def _client_id(store: st.Store, name: str) -> int:
    store.add_client(name)
    with store.read() as conn:
        return conn.execute(select(st.clients.c.id).where(st.clients.c.name == name)).scalar_one()


def test_tokens_are_stored_hashed_and_revocable(served):
    store, _, _ = served
    token = store.add_client("cam-a")
    with store.read() as conn:
        stored = conn.execute(select(st.clients.c.token_hash)).scalars().all()
    assert token not in stored and st.hash_token(token) in stored
    assert store.client_for_token(token).name == "cam-a"
    assert store.client_for_token(token + "x") is None
    with pytest.raises(st.StoreError, match="already exists"):
        store.add_client("cam-a")
    store.revoke("cam-a")
    assert store.client_for_token(token).revoked
    with pytest.raises(st.StoreError, match="already revoked"):
        store.revoke("cam-a")


def test_a_retried_update_is_stored_once_even_when_tries_race(served):
    # Prepare: two stores = two worker processes' engines
    store, _, url = served
    other = st.Store(url)
    cid = _client_id(store, "cam-race")
    rec = _record(store, cid, key="retry-key-0001")
    results = []

    def submit(s):
        results.append(s.insert_updates([rec])[0])

    # Execute
    threads = [threading.Thread(target=submit, args=(s,)) for s in (store, other, store, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dup = store.insert_updates([rec, rec])
    # Assert
    assert sum(not r.duplicate for r in results) == 1
    assert len({r.update_id for r in results + dup}) == 1
    assert store.counts() == {"buffered": 1}
    changed = _record(store, cid, key="retry-key-0001", value=0.02)
    assert store.insert_updates([changed])[0].conflict
    other.dispose()


def test_concurrent_aggregators_count_every_update_exactly_once(served):
    # Prepare: 3 engines (workers) insert while 3 aggregate
    store, _, url = served
    stores = [store, st.Store(url), st.Store(url)]
    cids = [_client_id(store, f"cam-{i}") for i in range(4)]
    base = store.head(store.serving().head_version)
    inserted: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def insert(s, cid):
        try:
            for _ in range(15):
                r = s.insert_updates([_record(s, cid, value=0.001)])[0]
                with lock:
                    inserted.append(r.update_id)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def aggregate(s):
        try:
            while not stop.is_set():
                aggregate_once(s, PLAIN, min_updates=3, policy=NO_CAP)
                time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    # Execute
    aggs = [threading.Thread(target=aggregate, args=(s,)) for s in stores]
    ins = [threading.Thread(target=insert, args=(stores[i % 3], cid)) for i, cid in enumerate(cids)]
    for t in aggs + ins:
        t.start()
    for t in ins:
        t.join()
    stop.set()
    for t in aggs:
        t.join()
    aggregate_once(store, PLAIN, min_updates=1, policy=NO_CAP)
    # Assert
    assert not errors, errors
    assert len(inserted) == 60 and len(set(inserted)) == 60
    with store.read() as conn:
        rows = conn.execute(select(st.aggregations)).all()
        statuses = conn.execute(select(st.updates.c.status, st.updates.c.aggregation_id)).all()
        versions = conn.execute(select(st.heads.c.version, st.heads.c.parent_version).order_by(st.heads.c.version)).all()
    claimed = [uid for r in rows for uid in json.loads(r.update_ids)]
    assert sorted(claimed) == sorted(inserted)  # each update in exactly one aggregation
    assert all(s == "aggregated" and a is not None for s, a in statuses)
    # the heads form one chain: every aggregation stepped from the previous head
    assert [v.parent_version for v in versions[1:]] == [v.version for v in versions[:-1]]
    # every delta was 0.001 per weight, undiscounted; a device's c updates in a step are one voice of
    # 0.001 c weighing 5 c labels, so each step moves by exactly 0.001 * sum(c^2) / sum(c)
    with store.read() as conn:
        owner = dict(conn.execute(select(st.updates.c.id, st.updates.c.client_id)).all())
    expected = 0.0
    for r in rows:
        per_device = np.bincount([owner[uid] for uid in json.loads(r.update_ids)])
        expected += 0.001 * float((per_device ** 2).sum()) / float(per_device.sum())
    final = store.head(store.serving().head_version)
    np.testing.assert_allclose(final.flat - base.flat, expected, rtol=1e-3, atol=1e-5)
    for s in stores[1:]:
        s.dispose()


def test_killed_mid_aggregation_then_restarted_loses_and_doubles_nothing(served, tmp_path):
    # Prepare: 6 buffered updates, an aggregation process that holds its transaction open
    store, data_dir, url = served
    cid = _client_id(store, "cam-crash")
    ids = [store.insert_updates([_record(store, cid, value=0.01)])[0].update_id for _ in range(6)]
    head_before = store.serving().head_version
    log = tmp_path / "agg.log"
    env = {"INFANTINO_FAULT_AGGREGATE_PAUSE_S": "60", "PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-m", "infantino.sync_server.cli", "aggregate", "--data-dir", str(data_dir), "--db-url", url,
            "--mlflow-uri", "off"]
    import os

    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **env})
    deadline = time.monotonic() + 60
    while "fault injection" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert "fault injection" in log.read_text(), log.read_text()
    # Execute: kill -9 while the step is written but not committed
    proc.kill()
    proc.wait(timeout=20)
    # Assert: nothing happened
    assert store.serving().head_version == head_before
    assert store.counts() == {"buffered": 6}
    # ... and a restarted aggregation counts each update once
    result = aggregate_once(store, Strategy(), min_updates=1)
    assert result.n_updates == 6 and result.base_head_version == head_before
    with store.read() as conn:
        claimed = json.loads(conn.execute(select(st.aggregations.c.update_ids)).scalar_one())
    assert sorted(claimed) == sorted(ids)
    assert store.counts() == {"aggregated": 6}
    assert aggregate_once(store, Strategy(), min_updates=1) is None


def test_promoting_a_new_package_supersedes_old_updates(served, tmp_path, tiny_package_dir):
    from infantino.export.tiny_package import build_tiny_package

    store, data_dir, _ = served
    cid = _client_id(store, "cam-p")
    store.insert_updates([_record(store, cid)])
    new_pkg = build_tiny_package(tmp_path / "pkg2", version="tiny-2", seed=1)
    result = promote_package(store, data_dir, new_pkg)
    assert result["action"] == "promoted" and result["superseded_updates"] == 1
    serving = store.serving()
    assert serving.package_version == "tiny-2" and store.counts() == {"superseded": 1}
    head = OnlineHead.from_bytes(store.head(serving.head_version).blob)
    boot = OnlineHead.load(new_pkg / "head.npz")
    np.testing.assert_allclose(head.coefs[0], boot.coefs[0], rtol=1e-6)
    assert head.version == serving.head_version
    # re-promoting the same package is a no-op; the same version with other files is refused
    assert promote_package(store, data_dir, new_pkg)["action"] == "re-served"
    other = build_tiny_package(tmp_path / "pkg3", version="tiny-2", seed=2)
    with pytest.raises(PromoteError, match="different manifest"):
        promote_package(store, data_dir, other)


def test_a_head_not_made_for_the_extractor_is_refused(served, tmp_path, tiny_package_dir):
    from infantino.edge_runtime.core.head import HeadParams
    from infantino.edge_runtime.core.package import describe_files, read_manifest, write_manifest

    store, data_dir, _ = served
    pkg = tmp_path / "mismatch"
    shutil.copytree(tiny_package_dir, pkg)
    rng = np.random.default_rng(0)
    OnlineHead.fit(rng.normal(size=(30, 8)), np.arange(30) % 7, HeadParams(hidden_layer_sizes=(4,)), max_iter=5).save(pkg / "head.npz")
    manifest = read_manifest(pkg)
    manifest.version = "mismatch-1"
    manifest.files = describe_files(pkg)
    write_manifest(pkg, manifest)
    with pytest.raises(PromoteError, match="8-d embeddings"):
        promote_package(store, data_dir, pkg)
    (pkg / "extractor.onnx").write_bytes(b"tampered")
    with pytest.raises(PromoteError, match="sha256"):
        promote_package(store, data_dir, pkg)


def test_aggregated_arrays_are_pruned_after_the_retention_time_and_rows_stay(served):
    store, _, _ = served
    cid = _client_id(store, "cam-prune")
    for _ in range(3):
        store.insert_updates([_record(store, cid)])
    assert store.prune_deltas(0.0) == 0  # buffered arrays are never pruned
    aggregate_once(store, Strategy(), min_updates=1)
    store.insert_updates([_record(store, cid)])
    assert store.prune_deltas(3600.0) == 0  # too recent
    assert store.prune_deltas(0.0) == 3
    with store.read() as conn:
        left = conn.execute(select(st.update_deltas.c.update_id)).scalars().all()
    assert len(left) == 1 and store.counts() == {"aggregated": 3, "buffered": 1}
    assert aggregate_once(store, Strategy(), min_updates=1).n_updates == 1


def test_binary_copy_rows_are_parsed_however_the_stream_is_cut():
    import random
    import struct

    from infantino.sync_server.db.queries import CopyBinaryRows

    # Prepare: PostgreSQL's binary COPY of (int4, bytea) rows, cut at random places
    blobs = {7: b"\x00\x01" * 5, 9: b"", 12: bytes(range(256)) * 3}
    data = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
    for uid, blob in blobs.items():
        data += struct.pack(">hiii", 2, 4, uid, len(blob)) + blob
    data += struct.pack(">h", -1)
    rng = random.Random(3)
    for _ in range(20):
        got = {}
        sink = CopyBinaryRows(lambda uid, blob: got.__setitem__(uid, bytes(blob)))
        cuts = sorted(rng.sample(range(1, len(data)), 6))
        for a, b in zip([0] + cuts, cuts + [len(data)]):
            sink.write(data[a:b])
        # Assert
        assert got == blobs and sink.done
    with pytest.raises(st.StoreError, match="not in the binary format"):
        CopyBinaryRows(lambda uid, blob: None).write(b"COPY-TEXT" + bytes(30))
