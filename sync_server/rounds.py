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

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from infantino.edge_runtime.core.head import OnlineHead

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


def aggregate_once(store: st.Store, strategy: Strategy, min_updates: int = 1, max_updates: int = 20000,
                   fault_pause_s: float = 0.0, *, policy: RoundPolicy = RoundPolicy(),
                   judge: Optional[Judge] = None) -> Optional[RoundResult]:
    """Aggregate if at least ``min_updates`` devices have updates buffered for the served package; else None."""
    t0 = time.perf_counter()
    with store.change() as u:
        srv = u.lock_serving()
        if srv is None:
            return None
        u.supersede_buffered(srv.package_version)  # raced a promotion: can never be aggregated
        rows = u.claimable(srv.package_version, max_updates)
        if len({r.client_id for r in rows}) < max(1, min_updates):
            return None
        base = store.head(srv.head_version, u.conn)
        step = _step(u, store, rows, base, strategy, policy, srv.package_version)
        new_flat = base.flat + step.delta
        if not np.isfinite(new_flat).all():
            raise st.StoreError("aggregation produced non-finite weights; nothing was changed")
        info = {**step.info, **_local_metrics(rows)}
        verdict = judge(srv.package_version, base, new_flat) if judge is not None else None
        served = verdict is None or bool(verdict["passed"])
        if verdict is not None:
            info["head_gate"] = verdict
        now = time.time()
        new_version = _insert_head(u, base, new_flat, srv.package_version, now) if served else base.version
        devices = sorted({r.name for r in rows})
        ids = [r.id for r in rows]
        agg_id = u.insert_aggregation(now=now, package_version=srv.package_version, base_head_version=base.version,
                                      new_head_version=new_version, strategy=strategy.to_dict(), k=min_updates,
                                      info=info, devices=devices, update_ids=ids)
        u.mark_updates(ids, agg_id, "aggregated" if served else "refused")
        if served:
            u.set_serving(srv.package_version, new_version, now)
        u.enqueue_tracking("aggregation", str(agg_id), now)
        if fault_pause_s > 0:  # fault injection for the crash tests: hold the transaction open
            log.warning("aggregation %s: holding the transaction for %.1f s (fault injection)", agg_id, fault_pause_s)
            time.sleep(fault_pause_s)
    seconds = time.perf_counter() - t0
    outcome = f"head {new_version}" if served else f"refused by the head gate ({verdict['reason']}); head {base.version} stays"
    log.info("aggregation %s: %d updates from %d devices -> %s (%.3f s)", agg_id, len(ids), len(devices), outcome, seconds)
    return RoundResult(agg_id, base.version, new_version, len(ids), devices, info, seconds, served)


def _step(u: st.Unit, store: st.Store, rows: list, base, strategy: Strategy, policy: RoundPolicy, package_version: str):
    """The combined step: one voice per device, samples capped, clip bound capped by history."""
    deltas = u.load_deltas([r.id for r in rows], base.flat.size)
    staleness = [max(0, base.version - r.base_head_version) for r in rows]
    now = time.time()
    caps = [label_cap(now - r.base_created_at, policy.label_burst, policy.labels_per_hour) for r in rows]
    reference = store.recent_voice_norm(package_version, policy.history, u.conn)
    norm_cap = None if reference is None else policy.clip_cap_factor * reference
    return aggregate_deltas(deltas, [r.n_samples for r in rows], staleness, strategy,
                            voices=[r.client_id for r in rows], sample_caps=caps, norm_cap=norm_cap)


def head_from_flat(base: st.HeadRecord, flat: np.ndarray, version: Optional[int] = None) -> OnlineHead:
    """A head with ``base``'s shapes, classes and parameters and the weights ``flat``."""
    layers = unflatten(np.asarray(flat, np.float32), base.shapes)
    n_layers = len(layers) // 2
    return OnlineHead.from_arrays(layers[:n_layers], layers[n_layers:], base.classes, base.params,
                                  version=base.version if version is None else version)


def _insert_head(u: st.Unit, base: st.HeadRecord, new_flat: np.ndarray, package_version: str, now: float) -> int:
    """Store the stepped head as the next global version; returns that version."""
    version = u.next_head_version()
    u.insert_head(version, package_version, base.version, "aggregation", head_from_flat(base, new_flat, version).to_bytes(), now)
    return version


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
