"""The statements of the round path, each a function that takes a connection: serving,
packages, heads, updates and their deltas, aggregations, the tracking outbox's insert.

The caller owns the transaction (``Store.read()`` / ``Store.write()``), so several of these
run atomically together: a promotion, a round, a rollback.
"""
from __future__ import annotations

import hashlib
import json
import struct
import time
from typing import Iterator, Optional, Sequence

import numpy as np
from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.engine import Connection

from .records import StoreError, UpdateRecord
from .tables import aggregations, clients, heads, outbox, packages, serving, update_deltas, updates

_Q_UPDATE_BY_KEY = select(updates.c.id, updates.c.body_sha256).where(
    updates.c.client_id == bindparam("cid"), updates.c.idempotency_key == bindparam("key"))
_Q_UPDATES_BY_KEYS = select(updates.c.id, updates.c.client_id, updates.c.idempotency_key, updates.c.body_sha256).where(
    updates.c.idempotency_key.in_(bindparam("keys", expanding=True)))
_Q_SERVING_VERSIONS = select(serving.c.package_version, serving.c.head_version).where(serving.c.id == 1)
_Q_BUFFERED_OF_CLIENT = select(func.count()).select_from(updates).where(
    updates.c.client_id == bindparam("cid"), updates.c.status == "buffered")


def _chunks(ids: Sequence[int], size: int = 500) -> Iterator[Sequence[int]]:
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


# --------------------------------------------------------------------------- serving


def lock_serving(conn: Connection):
    """The serving row, locked against other aggregators/promoters until the transaction ends."""
    return conn.execute(select(serving).where(serving.c.id == 1).with_for_update()).first()


def set_serving(conn: Connection, package_version: str, head_version: int, now: float) -> None:
    res = conn.execute(update(serving).where(serving.c.id == 1)
                       .values(package_version=package_version, head_version=head_version, updated_at=now))
    if res.rowcount == 0:
        conn.execute(insert(serving).values(id=1, package_version=package_version, head_version=head_version, updated_at=now))


def serving_versions(conn: Connection) -> Optional[tuple[str, int]]:
    row = conn.execute(_Q_SERVING_VERSIONS).first()
    return None if row is None else (row.package_version, int(row.head_version))


def serving_row(conn: Connection):
    """What is served with its package and head (None before the first promotion)."""
    return conn.execute(
        select(serving.c.package_version, serving.c.head_version, packages.c.manifest, packages.c.manifest_sha256,
               packages.c.folder, heads.c.sha256, func.length(heads.c.blob).label("head_bytes"))
        .join(packages, packages.c.version == serving.c.package_version)
        .join(heads, heads.c.version == serving.c.head_version)
        .where(serving.c.id == 1)).first()


def enqueue_tracking(conn: Connection, kind: str, ref: str, now: Optional[float] = None) -> None:
    """Queue ``kind``/``ref`` for MLflow in the caller's transaction (the outbox)."""
    conn.execute(insert(outbox).values(kind=kind, ref=str(ref), created_at=time.time() if now is None else now, attempts=0))


# --------------------------------------------------------------------------- packages and heads


def package_row(conn: Connection, version: str):
    return conn.execute(select(packages).where(packages.c.version == version)).first()


def insert_package(conn: Connection, version: str, manifest: dict, manifest_sha256: str, folder: str, now: float) -> None:
    conn.execute(insert(packages).values(version=version, manifest=json.dumps(manifest), manifest_sha256=manifest_sha256,
                                         folder=folder, created_at=now))


def head_row(conn: Connection, version: int):
    return conn.execute(select(heads).where(heads.c.version == version)).first()


def head_package(conn: Connection, version: int) -> Optional[str]:
    """The package a head version belongs to (None: no such head)."""
    return conn.execute(select(heads.c.package_version).where(heads.c.version == version)).scalar()


def newest_head(conn: Connection, package_version: str) -> Optional[int]:
    newest = conn.execute(select(func.max(heads.c.version)).where(heads.c.package_version == package_version)).scalar()
    return None if newest is None else int(newest)


def bootstrap_head(conn: Connection, package_version: str):
    """(version, blob) of the package's own head, or None."""
    return conn.execute(select(heads.c.version, heads.c.blob).where(
        heads.c.package_version == package_version, heads.c.source == "bootstrap")
        .order_by(heads.c.version).limit(1)).first()


def bootstrap_head_version(conn: Connection, package_version: str) -> Optional[int]:
    boot = conn.execute(select(func.min(heads.c.version)).where(
        heads.c.package_version == package_version, heads.c.source == "bootstrap")).scalar()
    return None if boot is None else int(boot)


def next_head_version(conn: Connection) -> int:
    return int(conn.execute(select(func.coalesce(func.max(heads.c.version), 0))).scalar_one()) + 1


def insert_head(conn: Connection, version: int, package_version: str, parent_version: Optional[int], source: str,
                blob: bytes, now: float) -> None:
    conn.execute(insert(heads).values(version=version, package_version=package_version, parent_version=parent_version,
                                      source=source, blob=blob, sha256=hashlib.sha256(blob).hexdigest(), created_at=now))


def set_mlflow_version(conn: Connection, table: str, key, version: str) -> None:
    t = {"heads": heads, "packages": packages}[table]
    conn.execute(update(t).where(t.c.version == key).values(mlflow_version=str(version)))


def head_mlflow_version(conn: Connection, version: int) -> Optional[str]:
    return conn.execute(select(heads.c.mlflow_version).where(heads.c.version == version)).scalar_one_or_none()


# --------------------------------------------------------------------------- updates


def supersede_buffered(conn: Connection, package_version: str) -> int:
    """Buffered updates made for another package than ``package_version`` can never be
    aggregated: mark them superseded; returns how many."""
    return int(conn.execute(update(updates).where(updates.c.status == "buffered", updates.c.package_version != package_version)
                            .values(status="superseded")).rowcount or 0)


def update_by_key(conn: Connection, client_id: int, key: str) -> Optional[tuple[int, str]]:
    row = conn.execute(_Q_UPDATE_BY_KEY, {"cid": client_id, "key": key}).first()
    return None if row is None else (row.id, row.body_sha256)


def updates_by_keys(conn: Connection, keys: Sequence[str]) -> dict[tuple[int, str], tuple[int, str]]:
    """(client id, key) -> (update id, body sha256) of the stored updates with these keys."""
    return {(row.client_id, row.idempotency_key): (row.id, row.body_sha256)
            for row in conn.execute(_Q_UPDATES_BY_KEYS, {"keys": sorted(set(keys))})}


def insert_updates(conn: Connection, records: Sequence[UpdateRecord], now: float) -> list[int]:
    """One multi-row INSERT ... RETURNING of the rows, one of their deltas; the new ids in order."""
    rows = [{"client_id": r.client_id, "idempotency_key": r.idempotency_key, "body_sha256": r.body_sha256,
             "package_version": r.package_version, "base_head_version": r.base_head_version,
             "n_samples": r.n_samples, "metrics": json.dumps(r.metrics),
             "delta_norm": r.delta_norm, "status": "buffered", "received_at": now} for r in records]
    ids = list(conn.execute(insert(updates).returning(updates.c.id, sort_by_parameter_order=True), rows).scalars())
    conn.execute(insert(update_deltas), [{"update_id": uid, "delta": r.delta} for uid, r in zip(ids, records)])
    return ids


def buffered_of_client(conn: Connection, client_id: int) -> int:
    return int(conn.execute(_Q_BUFFERED_OF_CLIENT, {"cid": client_id}).scalar_one())


def buffered_devices(conn: Connection) -> int:
    return int(conn.execute(select(func.count(func.distinct(updates.c.client_id)))
                            .where(updates.c.status == "buffered")).scalar_one())


def status_counts(conn: Connection) -> dict[str, int]:
    return {s: int(n) for s, n in conn.execute(select(updates.c.status, func.count()).group_by(updates.c.status))}


def claimable(conn: Connection, package_version: str, max_updates: int) -> list:
    """The buffered updates of the served package, oldest first, with their device's name and
    when their base head was published."""
    return conn.execute(
        select(updates.c.id, updates.c.client_id, updates.c.base_head_version, updates.c.n_samples,
               updates.c.metrics, clients.c.name, heads.c.created_at.label("base_created_at"))
        .join(clients, clients.c.id == updates.c.client_id)
        .join(heads, heads.c.version == updates.c.base_head_version)
        .where(updates.c.status == "buffered", updates.c.package_version == package_version)
        .order_by(updates.c.id).limit(max_updates)).all()


def mark_updates(conn: Connection, ids: Sequence[int], agg_id: int, status: str) -> None:
    """Buffered -> ``status`` for exactly ``ids``; refuses (rolls back) rather than double count."""
    claimed = 0
    for part in _chunks(ids):
        claimed += conn.execute(update(updates).where(updates.c.id.in_(part), updates.c.status == "buffered")
                                .values(status=status, aggregation_id=agg_id)).rowcount
    if claimed != len(ids):  # cannot happen while the serving lock is held
        raise StoreError(f"claimed {claimed} of {len(ids)} updates; aggregation rolled back")


def load_deltas(conn: Connection, ids: Sequence[int], n_params: int) -> np.ndarray:
    """The deltas of ``ids`` as one (n, P) float32 matrix, read in chunks, each array copied
    once, straight into its row.

    On PostgreSQL (psycopg2) the arrays travel in COPY's binary format: a bytea column read
    by a plain SELECT arrives as hex text, twice its size, and is decoded on the client."""
    out = np.empty((len(ids), n_params), np.float32)
    row_of = {uid: i for i, uid in enumerate(ids)}
    filled = 0

    def fill(uid: int, blob) -> None:
        nonlocal filled
        if len(blob) != 4 * n_params:
            raise StoreError(f"the delta of update {uid} does not match the served head's size")
        out[row_of[uid]] = np.frombuffer(blob, dtype="<f4")
        filled += 1

    read = _deltas_copy_binary if conn.dialect.driver == "psycopg2" else _deltas_select
    for part in _chunks(ids, 2000):
        read(conn, part, fill)
    if filled != len(ids):
        raise StoreError(f"{len(ids) - filled} buffered updates have no delta")
    return out


def _deltas_select(conn: Connection, ids: Sequence[int], fill) -> None:
    for uid, blob in conn.execute(select(update_deltas.c.update_id, update_deltas.c.delta)
                                  .where(update_deltas.c.update_id.in_(ids))):
        fill(uid, blob)


_COPY_DELTAS = "COPY (SELECT update_id, delta FROM update_deltas WHERE update_id = ANY(%s)) TO STDOUT WITH (FORMAT binary)"
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


def _deltas_copy_binary(conn: Connection, ids: Sequence[int], fill) -> None:
    """(update id, delta bytes) to ``fill`` through ``COPY ... TO STDOUT (FORMAT binary)``, in the caller's transaction."""
    sink = CopyBinaryRows(fill)
    cur = conn.connection.dbapi_connection.cursor()
    try:
        cur.copy_expert(cur.mogrify(_COPY_DELTAS, ([int(i) for i in ids],)).decode("ascii"), sink)
    finally:
        cur.close()
    if not sink.done:
        raise StoreError("PostgreSQL's COPY answer ended early")


class CopyBinaryRows:
    """A file-like sink for ``copy_expert``: parses rows of (int4, bytea) in PostgreSQL's binary
    COPY format as they arrive and hands each to ``on_row(int, memoryview)`` (valid only during the call)."""

    def __init__(self, on_row):
        self.on_row = on_row
        self.done = False
        self._buf = bytearray()
        self._header = False

    def write(self, data) -> int:
        self._buf += data
        view = memoryview(self._buf)
        try:
            pos = self._rows(view)
        finally:
            view.release()
        del self._buf[:pos]
        return len(data)

    def _rows(self, view: memoryview) -> int:
        pos = 0
        if not self._header:
            if len(view) < 19 or len(view) < 19 + struct.unpack_from(">i", view, 15)[0]:
                return 0
            if bytes(view[:11]) != _COPY_SIGNATURE:
                raise StoreError("PostgreSQL's COPY answer is not in the binary format")
            pos, self._header = 19 + struct.unpack_from(">i", view, 15)[0], True
        while len(view) - pos >= 2 and not self.done:
            (n_fields,) = struct.unpack_from(">h", view, pos)
            if n_fields == -1:
                self.done = True
                return pos + 2
            if len(view) - pos < 14:
                break
            uid_len, uid, blob_len = struct.unpack_from(">iii", view, pos + 2)
            if n_fields != 2 or uid_len != 4 or blob_len < 0:
                raise StoreError("unexpected row in PostgreSQL's COPY answer")
            if len(view) - pos < 14 + blob_len:
                break
            blob = view[pos + 14:pos + 14 + blob_len]
            try:
                self.on_row(uid, blob)
            finally:
                blob.release()
            pos += 14 + blob_len
        return pos


# --------------------------------------------------------------------------- aggregations


def insert_aggregation(conn: Connection, *, now: float, package_version: str, base_head_version: int,
                       new_head_version: int, strategy: dict, k: int, info: dict, devices: list[str],
                       update_ids: list[int]) -> int:
    return int(conn.execute(insert(aggregations).values(
        created_at=now, package_version=package_version, base_head_version=base_head_version,
        new_head_version=new_head_version, strategy=json.dumps(strategy), k=k, info=json.dumps(info),
        devices=json.dumps(devices), update_ids=json.dumps(update_ids)).returning(aggregations.c.id)).scalar_one())


def aggregation_row(conn: Connection, agg_id: int):
    return conn.execute(select(aggregations).where(aggregations.c.id == agg_id)).first()


def last_round(conn: Connection) -> int:
    return int(conn.execute(select(func.max(aggregations.c.id))).scalar() or 0)


def recent_round_infos(conn: Connection, package_version: str, history: int) -> list[str]:
    """The ``info`` JSON of the last ``history`` rounds that served a head on this package."""
    return conn.execute(select(aggregations.c.info).where(aggregations.c.package_version == package_version,
                                                          aggregations.c.new_head_version != aggregations.c.base_head_version)
                        .order_by(aggregations.c.id.desc()).limit(history)).scalars().all()
