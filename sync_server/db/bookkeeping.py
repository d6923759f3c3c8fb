"""The statements around the round path, each taking a connection: clients and tokens,
the tracking outbox and leases, publish decisions (gates), consented crops, the metrics view."""
from __future__ import annotations

import json
from typing import Optional, Sequence

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from .queries import buffered_devices, serving_versions, status_counts
from .tables import aggregations, clients, crops, gates, locks, outbox, update_deltas, updates

_Q_CLIENT_BY_TOKEN = select(clients.c.id, clients.c.name, clients.c.kind, clients.c.revoked_at).where(
    clients.c.token_hash == bindparam("h"))


# --------------------------------------------------------------------------- clients


def client_by_token_hash(conn: Connection, token_hash: str):
    return conn.execute(_Q_CLIENT_BY_TOKEN, {"h": token_hash}).first()


def insert_client(conn: Connection, name: str, kind: str, token_hash: str, now: float) -> None:
    conn.execute(insert(clients).values(name=name, kind=kind, token_hash=token_hash, created_at=now))


def admin_client_id(conn: Connection) -> Optional[int]:
    return conn.execute(select(clients.c.id).where(clients.c.kind == "admin").order_by(clients.c.id)).scalar()


def client_id_by_name(conn: Connection, name: str, kind: Optional[str] = None) -> Optional[int]:
    q = select(clients.c.id).where(clients.c.name == name)
    if kind is not None:
        q = q.where(clients.c.kind == kind)
    cid = conn.execute(q).scalar()
    return None if cid is None else int(cid)


def set_token(conn: Connection, client_id: int, token_hash: str) -> None:
    conn.execute(update(clients).where(clients.c.id == client_id).values(token_hash=token_hash, revoked_at=None))


def revoke_client(conn: Connection, name: str, now: float) -> int:
    """Revoke the client named ``name`` if it is active; returns how many rows changed (0 or 1)."""
    return int(conn.execute(update(clients).where(clients.c.name == name, clients.c.revoked_at.is_(None))
                            .values(revoked_at=now)).rowcount)


def list_clients(conn: Connection) -> list[dict]:
    """Clients with ``last_update``: when the store last accepted an update from them."""
    last = select(func.max(updates.c.received_at)).where(updates.c.client_id == clients.c.id).scalar_subquery()
    rows = conn.execute(select(clients.c.name, clients.c.kind, clients.c.created_at, clients.c.revoked_at,
                               last.label("last_update")).order_by(clients.c.name)).all()
    return [dict(r._mapping) for r in rows]


def prune_deltas(conn: Connection, cutoff: float) -> int:
    """Drop the arrays of updates no longer buffered and received before ``cutoff`` (rows stay)."""
    done = select(updates.c.id).where(updates.c.status != "buffered", updates.c.received_at < cutoff)
    return int(conn.execute(update_deltas.delete().where(update_deltas.c.update_id.in_(done))).rowcount or 0)


def has_buffered(conn: Connection, k: int) -> bool:
    """Whether at least ``k`` updates are buffered (reads at most k index entries)."""
    return conn.execute(select(updates.c.id).where(updates.c.status == "buffered").order_by(updates.c.status, updates.c.id)
                        .offset(max(0, k - 1)).limit(1)).first() is not None


def buffered_count(conn: Connection, package_version: Optional[str] = None) -> int:
    q = select(func.count()).select_from(updates).where(updates.c.status == "buffered")
    if package_version is not None:
        q = q.where(updates.c.package_version == package_version)
    return int(conn.execute(q).scalar_one())


# --------------------------------------------------------------------------- outbox and leases


def acquire_lease(conn: Connection, name: str, owner: str, now: float, seconds: float) -> bool:
    row = conn.execute(select(locks).where(locks.c.name == name).with_for_update()).first()
    if row is None:
        try:
            with conn.begin_nested():
                conn.execute(insert(locks).values(name=name, owner=owner, until=now + seconds))
            return True
        except IntegrityError:
            return False
    if row.owner == owner or row.until < now:
        conn.execute(update(locks).where(locks.c.name == name).values(owner=owner, until=now + seconds))
        return True
    return False


def release_lease(conn: Connection, name: str, owner: str) -> None:
    conn.execute(update(locks).where(locks.c.name == name, locks.c.owner == owner).values(owner=None, until=0.0))


def pending_outbox(conn: Connection, limit: int) -> list[dict]:
    rows = conn.execute(select(outbox).where(outbox.c.done_at.is_(None)).order_by(outbox.c.id).limit(limit)).all()
    return [dict(r._mapping) for r in rows]


def outbox_done(conn: Connection, item_id: int, now: float) -> None:
    conn.execute(update(outbox).where(outbox.c.id == item_id).values(done_at=now, last_error=None))


def outbox_failed(conn: Connection, item_id: int, error: str) -> None:
    conn.execute(update(outbox).where(outbox.c.id == item_id).values(attempts=outbox.c.attempts + 1, last_error=error[:2000]))


def outbox_dead(conn: Connection, item_id: int, error: str, now: float) -> None:
    """Set a row aside for good: done, with the error that stopped it kept (a dead letter)."""
    conn.execute(update(outbox).where(outbox.c.id == item_id).values(attempts=outbox.c.attempts + 1, done_at=now,
                                                                     last_error=error[:2000] or "failed"))


def dead_outbox(conn: Connection) -> int:
    """Rows set aside: done with an error (a row logged normally is done with none)."""
    return int(conn.execute(select(func.count()).where(outbox.c.done_at.is_not(None), outbox.c.last_error.is_not(None))).scalar_one())


# --------------------------------------------------------------------------- publish decisions


def insert_gate(conn: Connection, *, now: float, candidate_version: str, current_version: Optional[str], passed: bool,
                decision: str, result: dict) -> int:
    return int(conn.execute(insert(gates).values(
        created_at=now, candidate_version=candidate_version, current_version=current_version,
        passed=int(passed), decision=decision, result=json.dumps(result))).inserted_primary_key[0])


def gate_row(conn: Connection, gate_id: int):
    return conn.execute(select(gates).where(gates.c.id == gate_id)).first()


# --------------------------------------------------------------------------- crops


def known_crops(conn: Connection, client_id: int, digests: Sequence[str]) -> set[str]:
    return set(conn.execute(select(crops.c.sha256).where(crops.c.client_id == client_id, crops.c.sha256.in_(list(digests))))
               .scalars())


def insert_crops(conn: Connection, rows: list[dict]) -> None:
    conn.execute(insert(crops), rows)


def crop_counts(conn: Connection) -> list[dict]:
    """Crops per device and class: ``[{"device", "label", "n"}]``."""
    q = (select(clients.c.name, crops.c.label, func.count().label("n"))
         .join(clients, clients.c.id == crops.c.client_id)
         .group_by(clients.c.name, crops.c.label).order_by(clients.c.name, crops.c.label))
    return [{"device": r.name, "label": int(r.label), "n": int(r.n)} for r in conn.execute(q)]


def delete_crops(conn: Connection, client_id: int) -> int:
    return int(conn.execute(delete(crops).where(crops.c.client_id == client_id)).rowcount or 0)


def crop_rows(conn: Connection, client_id: Optional[int] = None):
    """Every stored crop (of one client if given) with its device's name, oldest first."""
    q = select(crops.c.id, crops.c.label, crops.c.height, crops.c.width, crops.c.pixels,
               crops.c.client_id, clients.c.name).join(clients, clients.c.id == crops.c.client_id).order_by(crops.c.id)
    if client_id is not None:
        q = q.where(crops.c.client_id == client_id)
    return conn.execute(q)


# --------------------------------------------------------------------------- metrics


def metrics_view(conn: Connection) -> dict:
    """What ``GET /metrics`` reports about the durable state."""
    refused = aggregations.c.new_head_version == aggregations.c.base_head_version
    rounds = {"refused" if r else "served": int(n) for r, n in conn.execute(select(refused, func.count()).group_by(refused))}
    gate_rows = {d: int(n) for d, n in conn.execute(select(gates.c.decision, func.count()).group_by(gates.c.decision))}
    revoked = clients.c.revoked_at.is_not(None)
    devices = {"revoked" if r else "active": int(n) for r, n in conn.execute(
        select(revoked, func.count()).where(clients.c.kind == "device").group_by(revoked))}
    pending = conn.execute(select(func.count(), func.min(outbox.c.id), func.min(outbox.c.created_at))
                           .where(outbox.c.done_at.is_(None))).first()
    error = None if pending[1] is None else conn.execute(
        select(outbox.c.last_error).where(outbox.c.id == pending[1])).scalar_one_or_none()
    return {"updates": status_counts(conn), "buffered_devices": buffered_devices(conn),
            "rounds": {"served": 0, "refused": 0, **rounds},
            "package_gates": gate_rows, "devices": {"active": 0, "revoked": 0, **devices},
            "serving": serving_versions(conn),
            "outbox": {"pending": int(pending[0]), "oldest": pending[2], "last_error": error, "dead": dead_outbox(conn)}}
