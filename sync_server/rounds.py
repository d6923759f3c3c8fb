"""One server step: claim the buffered updates, combine them, publish the next head.

Everything happens in one database transaction that first locks the ``serving`` row
(``BEGIN IMMEDIATE`` on SQLite, ``FOR UPDATE`` on PostgreSQL): two workers or the CLI
aggregating at once run one after the other, the second finding nothing left to claim.
A process killed mid-way leaves no trace: its transaction rolls back, the updates stay
buffered, and the next step counts each of them exactly once.

A round counts devices, not updates: ``min_updates`` distinct devices must have something
buffered, and each device is one voice (``aggregate.merge_voices``). When a head gate is
given (``judge``) and it refuses the candidate, the round is still recorded (its updates
become ``refused``, the decision goes to MLflow) but the served head does not move.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from sqlalchemy import insert, select, update

from infantino.edge_runtime.head import HeadParams, OnlineHead

from . import store as st
from .aggregate import Strategy, aggregate_deltas, label_cap, unflatten

log = logging.getLogger("infantino.server")


Judge = Callable[[str, st.HeadRecord, np.ndarray], Optional[dict]]  # (package, served head, candidate) -> verdict


@dataclass(frozen=True)
class RoundPolicy:
    """What the server believes about honest devices, for capping what one may claim.

    ``label_burst`` + ``labels_per_hour`` x hours since the base head was published: the most
    labels a device can have made on that head (it cannot have pulled it before it existed).
    ``clip_cap_factor`` x the median voice norm of the last ``history`` served rounds: the
    highest clip bound a buffer may set, so a buffer of mostly oversized voices is clipped too.
    """

    label_burst: float = 64.0
    labels_per_hour: float = 240.0
    clip_cap_factor: float = 3.0
    history: int = 20


@dataclass(frozen=True)
class RoundResult:
    aggregation_id: int
    base_head_version: int
    new_head_version: int
    n_updates: int
    devices: list[str]
    info: dict
    seconds: float
    served: bool = True  # False: the head gate refused the candidate, the served head did not move


def _chunks(ids: list[int], size: int = 500):
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


def aggregate_once(store: st.Store, strategy: Strategy, min_updates: int = 1, max_updates: int = 20000,
                   fault_pause_s: float = 0.0, *, policy: RoundPolicy = RoundPolicy(),
                   judge: Optional[Judge] = None) -> Optional[RoundResult]:
    """Aggregate if at least ``min_updates`` devices have updates buffered for the served package; else None."""
    t0 = time.perf_counter()
    with store.write() as conn:
        srv = store.lock_serving(conn)
        if srv is None:
            return None
        rows = _claimable(conn, srv.package_version, max_updates)
        if len({r.client_id for r in rows}) < max(1, min_updates):
            return None
        base = store.head(srv.head_version, conn)
        step = _step(conn, store, rows, base, strategy, policy, srv.package_version)
        new_flat = base.flat + step.delta
        if not np.isfinite(new_flat).all():
            raise st.StoreError("aggregation produced non-finite weights; nothing was changed")
        info = {**step.info, **_local_metrics(rows)}
        verdict = judge(srv.package_version, base, new_flat) if judge is not None else None
        served = verdict is None or bool(verdict["passed"])
        if verdict is not None:
            info["head_gate"] = verdict
        now = time.time()
        new_version = _insert_head(conn, store, base, new_flat, srv.package_version, now) if served else base.version
        devices = sorted({r.name for r in rows})
        ids = [r.id for r in rows]
        agg_id = conn.execute(insert(st.aggregations).values(
            created_at=now, package_version=srv.package_version, base_head_version=base.version,
            new_head_version=new_version, strategy=json.dumps(strategy.to_dict()), k=min_updates,
            info=json.dumps(info), devices=json.dumps(devices), update_ids=json.dumps(ids),
        ).returning(st.aggregations.c.id)).scalar_one()
        _mark(conn, ids, agg_id, "aggregated" if served else "refused")
        if served:
            conn.execute(update(st.serving).where(st.serving.c.id == 1).values(head_version=new_version, updated_at=now))
        conn.execute(insert(st.outbox).values(kind="aggregation", ref=str(agg_id), created_at=now, attempts=0))
        if fault_pause_s > 0:  # fault injection for the crash tests: hold the transaction open
            log.warning("aggregation %s: holding the transaction for %.1f s (fault injection)", agg_id, fault_pause_s)
            time.sleep(fault_pause_s)
    seconds = time.perf_counter() - t0
    outcome = f"head {new_version}" if served else f"refused by the head gate ({verdict['reason']}); head {base.version} stays"
    log.info("aggregation %s: %d updates from %d devices -> %s (%.3f s)", agg_id, len(ids), len(devices), outcome, seconds)
    return RoundResult(agg_id, base.version, new_version, len(ids), devices, info, seconds, served)


def _claimable(conn, package_version: str, max_updates: int) -> list:
    """The buffered updates of the served package, oldest first; others (raced a promotion) are superseded."""
    conn.execute(update(st.updates).where(st.updates.c.status == "buffered", st.updates.c.package_version != package_version)
                 .values(status="superseded"))
    return conn.execute(
        select(st.updates.c.id, st.updates.c.client_id, st.updates.c.base_head_version, st.updates.c.n_samples,
               st.updates.c.metrics, st.clients.c.name, st.heads.c.created_at.label("base_created_at"))
        .join(st.clients, st.clients.c.id == st.updates.c.client_id)
        .join(st.heads, st.heads.c.version == st.updates.c.base_head_version)
        .where(st.updates.c.status == "buffered", st.updates.c.package_version == package_version)
        .order_by(st.updates.c.id).limit(max_updates)).all()


def _step(conn, store: st.Store, rows: list, base, strategy: Strategy, policy: RoundPolicy, package_version: str):
    """The combined step: one voice per device, samples capped, clip bound capped by history."""
    deltas = _load_deltas(conn, [r.id for r in rows], base.flat.size)
    staleness = [max(0, base.version - r.base_head_version) for r in rows]
    now = time.time()
    caps = [label_cap(now - r.base_created_at, policy.label_burst, policy.labels_per_hour) for r in rows]
    reference = store.recent_voice_norm(package_version, policy.history, conn)
    norm_cap = None if reference is None else policy.clip_cap_factor * reference
    return aggregate_deltas(deltas, [r.n_samples for r in rows], staleness, strategy,
                            voices=[r.client_id for r in rows], sample_caps=caps, norm_cap=norm_cap)


def head_from_flat(base: st.HeadRecord, flat: np.ndarray, version: Optional[int] = None) -> OnlineHead:
    """A head with ``base``'s shapes, classes and parameters and the weights ``flat``."""
    params = HeadParams.from_dict(json.loads(_head_meta(base.blob))["params"])
    layers = unflatten(np.asarray(flat, np.float32), base.shapes)
    n_layers = len(layers) // 2
    return OnlineHead.from_arrays(layers[:n_layers], layers[n_layers:], tuple(_head_classes(base.blob)), params,
                                  version=base.version if version is None else version)


def _insert_head(conn, store: st.Store, base, new_flat: np.ndarray, package_version: str, now: float) -> int:
    """Store the stepped head as the next global version; returns that version."""
    version = store.next_head_version(conn)
    blob = head_from_flat(base, new_flat, version).to_bytes()
    conn.execute(insert(st.heads).values(version=version, package_version=package_version, parent_version=base.version,
                                         source="aggregation", blob=blob, sha256=hashlib.sha256(blob).hexdigest(),
                                         created_at=now))
    return version


def _mark(conn, ids: list[int], agg_id: int, status: str) -> None:
    claimed = 0
    for part in _chunks(ids):
        claimed += conn.execute(update(st.updates).where(st.updates.c.id.in_(part), st.updates.c.status == "buffered")
                                .values(status=status, aggregation_id=agg_id)).rowcount
    if claimed != len(ids):  # cannot happen while we hold the serving lock; refuse rather than double count
        raise st.StoreError(f"claimed {claimed} of {len(ids)} updates; aggregation rolled back")


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


def _local_metrics(rows, max_weight: float = 64.0) -> dict:
    """Sample-weighted means of the numeric local metrics devices reported (a claim counts at most ``max_weight``)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for r in rows:
        try:
            metrics = json.loads(r.metrics)
        except (TypeError, json.JSONDecodeError):
            continue
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
                w = min(float(r.n_samples), max_weight)
                sums[key] = sums.get(key, 0.0) + float(value) * w
                weights[key] = weights.get(key, 0.0) + w
    return {f"local_{k}": sums[k] / weights[k] for k in sums if weights[k] > 0}
