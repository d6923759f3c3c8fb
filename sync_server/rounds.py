"""One server step: claim the buffered updates, combine them, publish the next head.

Everything happens in one database transaction that first locks the ``serving`` row
(``BEGIN IMMEDIATE`` on SQLite, ``FOR UPDATE`` on PostgreSQL): two workers or the CLI
aggregating at once run one after the other, the second finding nothing left to claim.
A process killed mid-way leaves no trace: its transaction rolls back, the updates stay
buffered, and the next step counts each of them exactly once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
from sqlalchemy import insert, select, update

from edge_runtime.head import HeadParams, OnlineHead

from . import store as st
from .aggregate import Strategy, aggregate_deltas, unflatten

log = logging.getLogger("infantino.server")


@dataclass(frozen=True)
class RoundResult:
    aggregation_id: int
    base_head_version: int
    new_head_version: int
    n_updates: int
    devices: list[str]
    info: dict
    seconds: float


def _chunks(ids: list[int], size: int = 500):
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


def aggregate_once(store: st.Store, strategy: Strategy, min_updates: int = 1, max_updates: int = 20000,
                   fault_pause_s: float = 0.0) -> Optional[RoundResult]:
    """Aggregate if at least ``min_updates`` are buffered for the served package; else None."""
    t0 = time.perf_counter()
    with store.write() as conn:
        srv = store.lock_serving(conn)
        if srv is None:
            return None
        # an update that raced a promotion (read the old package, committed after the switch) is kept, not counted
        conn.execute(update(st.updates).where(st.updates.c.status == "buffered", st.updates.c.package_version != srv.package_version)
                     .values(status="superseded"))
        rows = conn.execute(
            select(st.updates.c.id, st.updates.c.base_head_version, st.updates.c.n_samples, st.updates.c.metrics,
                   st.clients.c.name)
            .join(st.clients, st.clients.c.id == st.updates.c.client_id)
            .where(st.updates.c.status == "buffered", st.updates.c.package_version == srv.package_version)
            .order_by(st.updates.c.id).limit(max_updates)).all()
        if len(rows) < max(1, min_updates):
            return None
        base = store.head(srv.head_version, conn)
        deltas = _load_deltas(conn, [r.id for r in rows], base.flat.size)
        staleness = [max(0, base.version - r.base_head_version) for r in rows]
        step = aggregate_deltas(deltas, [r.n_samples for r in rows], staleness, strategy)
        new_flat = base.flat + step.delta
        if not np.isfinite(new_flat).all():
            raise st.StoreError("aggregation produced non-finite weights; nothing was changed")

        meta = json.loads(_head_meta(base.blob))
        params = HeadParams.from_dict(meta["params"])
        layers = unflatten(new_flat, base.shapes)
        n_layers = len(layers) // 2
        new_version = store.next_head_version(conn)
        head = OnlineHead.from_arrays(layers[:n_layers], layers[n_layers:], tuple(_head_classes(base.blob)), params, version=new_version)
        head_blob = head.to_bytes()
        now = time.time()
        conn.execute(insert(st.heads).values(version=new_version, package_version=srv.package_version,
                                             parent_version=base.version, source="aggregation", blob=head_blob,
                                             sha256=hashlib.sha256(head_blob).hexdigest(), created_at=now))
        devices = sorted({r.name for r in rows})
        info = dict(step.info)
        info.update(_local_metrics(rows))
        ids = [r.id for r in rows]
        agg_id = conn.execute(insert(st.aggregations).values(
            created_at=now, package_version=srv.package_version, base_head_version=base.version,
            new_head_version=new_version, strategy=json.dumps(strategy.to_dict()), k=min_updates,
            info=json.dumps(info), devices=json.dumps(devices), update_ids=json.dumps(ids),
        ).returning(st.aggregations.c.id)).scalar_one()
        claimed = 0
        for part in _chunks(ids):
            claimed += conn.execute(update(st.updates).where(st.updates.c.id.in_(part), st.updates.c.status == "buffered")
                                    .values(status="aggregated", aggregation_id=agg_id)).rowcount
        if claimed != len(ids):  # cannot happen while we hold the serving lock; refuse rather than double count
            raise st.StoreError(f"claimed {claimed} of {len(ids)} updates; aggregation rolled back")
        conn.execute(update(st.serving).where(st.serving.c.id == 1).values(head_version=new_version, updated_at=now))
        conn.execute(insert(st.outbox).values(kind="aggregation", ref=str(agg_id), created_at=now, attempts=0))
        if fault_pause_s > 0:  # fault injection for the crash tests: hold the transaction open
            log.warning("aggregation %s: holding the transaction for %.1f s (fault injection)", agg_id, fault_pause_s)
            time.sleep(fault_pause_s)
    seconds = time.perf_counter() - t0
    log.info("aggregation %s: %d updates from %d devices -> head %d (%.3f s)", agg_id, len(ids), len(devices), new_version, seconds)
    return RoundResult(agg_id, base.version, new_version, len(ids), devices, info, seconds)


def _load_deltas(conn, ids: list[int], n_params: int) -> np.ndarray:
    """The deltas of ``ids`` as one (n, P) float32 matrix, read in chunks (no second copy of the blobs)."""
    out = np.empty((len(ids), n_params), np.float32)
    row_of = {uid: i for i, uid in enumerate(ids)}
    filled = 0
    for part in _chunks(ids, 2000):
        for uid, blob in conn.execute(select(st.update_deltas.c.update_id, st.update_deltas.c.delta)
                                      .where(st.update_deltas.c.update_id.in_(part))):
            if len(blob) != 4 * n_params:
                raise st.StoreError(f"the delta of update {uid} does not match the served head's size")
            out[row_of[uid]] = np.frombuffer(blob, dtype="<f4")
            filled += 1
    if filled != len(ids):
        raise st.StoreError(f"{len(ids) - filled} buffered updates have no delta")
    return out


def _head_meta(blob: bytes) -> str:
    import io

    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return str(npz["meta"])


def _head_classes(blob: bytes) -> list[str]:
    import io

    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return [str(c) for c in npz["classes"]]


def _local_metrics(rows) -> dict:
    """Sample-weighted means of the numeric local metrics devices reported."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for r in rows:
        try:
            metrics = json.loads(r.metrics)
        except (TypeError, json.JSONDecodeError):
            continue
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
                sums[key] = sums.get(key, 0.0) + float(value) * r.n_samples
                weights[key] = weights.get(key, 0.0) + r.n_samples
    return {f"local_{k}": sums[k] / weights[k] for k in sums if weights[k] > 0}
