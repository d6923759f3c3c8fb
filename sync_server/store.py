"""The server's durable state, in SQLAlchemy Core: SQLite by default, PostgreSQL by URL.

Everything a device is promised lives here before the server answers: an accepted update
is committed (and, on SQLite, fsynced: WAL with ``synchronous=FULL``) before its 2xx.

Concurrency works the same on both databases:
* every write transaction on SQLite starts with ``BEGIN IMMEDIATE`` (one writer at a
  time, readers go on in WAL mode); on PostgreSQL aggregation takes ``SELECT ... FOR
  UPDATE`` on the single ``serving`` row, so two aggregators (two gunicorn workers, the
  CLI) run one after the other and never claim the same update;
* an update's ``(client_id, idempotency_key)`` is unique, so a retried update is stored
  once even when both tries race through two workers;
* a group committer (``db.committer``, one thread per process) puts the updates that
  arrive together into one transaction, so one fsync acknowledges many devices.

The data-access layer is ``infantino.sync_server.db``: ``tables`` (the schema, under the
Alembic migrations in ``db/migrations``), ``queries`` and ``bookkeeping`` (statements that
take a connection), ``committer``, ``records``. ``Store`` owns the engine and transactions
and answers the callers that need one statement in a transaction of its own; the callers that
need several in one get them as a ``Unit`` (``change`` / ``look``), never ``queries`` directly.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from infantino.edge_runtime.core.head import OnlineHead

from .aggregate import flatten
from .db import bookkeeping as bk
from .db import migrate
from .db import queries as q
from .db.committer import GroupCommitter
from .db.unit import Unit
from .db.records import (Client, HeadRecord, IngestView, Receipt, Serving, StoreBusy, StoreError,  # noqa: F401 - the store's API
                         UpdateRecord)
from .db.tables import (aggregations, clients, crops, gates, heads, locks, metadata, outbox, packages,  # noqa: F401
                        serving, update_deltas, updates)
from .names import InvalidName, check_device_name


def hash_token(token: str) -> str:
    # Tokens are 256-bit random strings, so a plain digest is enough (no password stretching).
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _reason(exc: Exception) -> str:
    """The driver's first line (psycopg2: "connection to server ... failed: Connection refused")."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def sqlite_url(path: str | os.PathLike) -> str:
    return f"sqlite:///{os.path.abspath(path)}"


def _head_record(row) -> HeadRecord:
    """A head row as a record with read-only float32 arrays, read by the one head reader
    (``OnlineHead.from_bytes``: numpy only, no sklearn object)."""
    head = OnlineHead.from_bytes(bytes(row.blob))
    layers = tuple(np.asarray(a, np.float32) for a in head.weights())
    flat = flatten(layers)  # the one layers -> vector of the server (aggregate's)
    for a in layers:
        a.setflags(write=False)
    flat.setflags(write=False)
    return HeadRecord(row.version, row.package_version, bytes(row.blob), row.sha256, layers, flat, head.classes, head.params)


class Store:
    def __init__(self, url: str, *, echo: bool = False, sqlite_timeout_s: float = 30.0):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.engine = create_engine(url, echo=echo, pool_size=20, max_overflow=20,
                                        connect_args={"timeout": sqlite_timeout_s, "check_same_thread": False})
            _sqlite_setup(self.engine)
        else:
            self.engine = create_engine(url, echo=echo, pool_pre_ping=True, pool_size=16, max_overflow=16)  # >= threads per worker
        self._heads: dict[int, HeadRecord] = {}
        self._heads_lock = threading.Lock()
        self._committer: Optional[GroupCommitter] = None
        self._committer_lock = threading.Lock()

    # ------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """Reads. On SQLite each statement runs on its own (no BEGIN/COMMIT round trips): WAL
        gives every statement a consistent snapshot and no caller needs two statements to agree."""
        try:
            with self.engine.connect() as conn:
                if self.is_sqlite:
                    conn.execution_options(infantino_autocommit=True)
                with conn.begin():
                    yield conn
        except (OperationalError, InterfaceError) as exc:  # down, restarting, a dropped connection: retry later
            raise StoreBusy(f"database unavailable: {_reason(exc)}") from exc

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: BEGIN IMMEDIATE on SQLite (waits for the lock up front)."""
        try:
            with self.engine.connect() as conn:
                conn.execution_options(infantino_write=True)
                with conn.begin():
                    yield conn
        except (OperationalError, InterfaceError) as exc:
            raise StoreBusy(f"database unavailable or locked: {_reason(exc)}") from exc

    @contextlib.contextmanager
    def change(self) -> Iterator[Unit]:
        """A write transaction as a ``Unit``: the statements a promotion, a round or a gate runs together."""
        with self.write() as conn:
            yield Unit(conn)

    @contextlib.contextmanager
    def look(self) -> Iterator[Unit]:
        """A read as a ``Unit`` (several statements that must agree)."""
        with self.read() as conn:
            yield Unit(conn)

    @contextlib.contextmanager
    def _reading(self, conn: Optional[Connection]) -> Iterator[Connection]:
        """The caller's connection (inside its transaction), or a read of our own."""
        if conn is not None:
            yield conn
        else:
            with self.read() as own:
                yield own

    def create_all(self) -> str:
        """Bring the schema to the newest migration (a fresh store is created, one made by
        ``create_all`` before migrations is stamped as the baseline first); returns the revision."""
        return migrate.upgrade(self.engine)

    def ping(self) -> None:
        with self.read() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        if self._committer:
            self._committer.stop()
        self.engine.dispose()

    # ------------------------------------------------------------ clients
    def add_client(self, name: str, kind: str = "device") -> str:
        """Create a client and return its token (shown once, stored hashed)."""
        if kind not in ("device", "admin"):
            raise StoreError(f"unknown client kind {kind!r}")
        if kind == "device":
            try:
                check_device_name(name)
            except InvalidName as exc:
                raise StoreError(str(exc)) from None
        token = f"ino_{secrets.token_urlsafe(32)}"
        try:
            with self.write() as conn:
                bk.insert_client(conn, name, kind, hash_token(token), time.time())
        except IntegrityError:
            raise StoreError(f"a client named {name!r} already exists") from None
        return token

    def rotate_admin(self, name: str = "admin") -> str:
        """Issue the admin token: the admin client is found by its kind, so a device that was
        named ``admin`` before names were checked cannot take its place."""
        token = f"ino_{secrets.token_urlsafe(32)}"
        with self.write() as conn:
            admin = bk.admin_client_id(conn)
            if admin is not None:
                bk.set_token(conn, admin, hash_token(token))
                return token
            taken = bk.client_id_by_name(conn, name) is not None
            bk.insert_client(conn, f"{name}-{secrets.token_hex(3)}" if taken else name, "admin", hash_token(token), time.time())
        return token

    def list_clients(self) -> list[dict]:
        """Clients with ``last_update``: when the store last accepted an update from them."""
        with self.read() as conn:
            return bk.list_clients(conn)

    def revoke(self, name: str) -> None:
        with self.write() as conn:
            if bk.revoke_client(conn, name, time.time()) != 1:
                exists = bk.client_id_by_name(conn, name) is not None
                raise StoreError(f"{name!r} is already revoked" if exists else f"no client named {name!r}")

    def client_for_token(self, token: str) -> Optional[Client]:
        with self.read() as conn:
            row = bk.client_by_token_hash(conn, hash_token(token))
        return None if row is None else Client(row.id, row.name, row.kind, row.revoked_at is not None)

    # ------------------------------------------------------------ packages, heads, serving
    def serving(self) -> Optional[Serving]:
        with self.read() as conn:
            row = q.serving_row(conn)
            if row is None:
                return None
            boot = q.bootstrap_head_version(conn, row.package_version)
        return Serving(row.package_version, row.head_version, json.loads(row.manifest), row.manifest_sha256, row.folder,
                       row.sha256, int(row.head_bytes), boot)

    def package(self, version: str) -> Optional[dict]:
        with self.read() as conn:
            row = q.package_row(conn, version)
        return None if row is None else dict(row._mapping)

    def head(self, version: int, conn: Optional[Connection] = None) -> Optional[HeadRecord]:
        """A head by version; heads never change, so they are cached in the process."""
        cached = self._heads.get(version)
        if cached is not None:
            return cached
        with self._reading(conn) as c:
            row = q.head_row(c, version)
        if row is None:
            return None
        rec = _head_record(row)
        with self._heads_lock:
            if len(self._heads) > 64:
                self._heads.pop(next(iter(self._heads)))
            self._heads[version] = rec
        return rec

    def next_head_version(self, conn: Connection) -> int:
        return q.next_head_version(conn)

    def lock_serving(self, conn: Connection):
        """The serving row, locked against other aggregators/promoters until the transaction ends."""
        return q.lock_serving(conn)

    # ------------------------------------------------------------ updates
    def insert_updates(self, records: Sequence[UpdateRecord]) -> list[Receipt]:
        """Insert a batch in one transaction; duplicates (same client+key) come back as such.

        The request already looked its key up, so the fast path only inserts; if a retry raced
        through another worker the unique key refuses the batch and it is redone with lookups."""
        try:
            return self._insert_batch(records, check_keys=False)
        except IntegrityError:
            return [self._insert_batch([r], check_keys=True)[0] for r in records]

    def _insert_batch(self, records: Sequence[UpdateRecord], check_keys: bool) -> list[Receipt]:
        """One transaction: (a lookup of the batch's keys,) one multi-row INSERT ... RETURNING."""
        with self.write() as conn:
            seen = q.updates_by_keys(conn, [r.idempotency_key for r in records]) if check_keys else {}
            fresh: list[UpdateRecord] = []
            for rec in records:
                key = (rec.client_id, rec.idempotency_key)
                if key not in seen:
                    seen[key] = (-1 - len(fresh), rec.body_sha256)  # placeholder until the INSERT returns ids
                    fresh.append(rec)
            ids = q.insert_updates(conn, fresh, time.time()) if fresh else []
        return _receipts(records, seen, ids)

    def submit_update(self, record: UpdateRecord, timeout_s: float = 30.0, on_commit: Optional[Callable[[], None]] = None) -> Receipt:
        """Durably store one update through the group committer; returns once committed."""
        with self._committer_lock:
            if self._committer is None or not self._committer.alive():
                self._committer = GroupCommitter(self.insert_updates, on_commit=on_commit)
        return self._committer.submit(record, timeout_s)

    def ingest_view(self, client_id: int, key: str) -> IngestView:
        """One read for an incoming update: the stored update with this key, what is served, how many
        updates of this device wait, and the newest round (to know when the norm bound moved)."""
        with self.read() as conn:
            dup = q.update_by_key(conn, client_id, key)
            served = q.serving_versions(conn)
            waiting = 0 if dup is not None else q.buffered_of_client(conn, client_id)
            last_round = q.last_round(conn)
        return IngestView(dup, served, waiting, last_round)

    def recent_voice_norm(self, package_version: str, history: int = 20, conn: Optional[Connection] = None) -> Optional[float]:
        """The median voice norm of the last ``history`` rounds that served a head on this package
        (what honest devices' updates measure), or None before the first."""
        with self._reading(conn) as c:
            infos = q.recent_round_infos(c, package_version, history)
        norms = []
        for raw in infos:
            info = json.loads(raw)
            value = info.get("voice_norm_median", info.get("delta_norm_median"))
            if isinstance(value, (int, float)) and value > 0:
                norms.append(float(value))
        return float(np.median(norms)) if norms else None

    def counts(self) -> dict[str, int]:
        with self.read() as conn:
            return q.status_counts(conn)

    def prune_deltas(self, older_than_s: float) -> int:
        """Drop the arrays of updates aggregated or superseded more than ``older_than_s`` ago (rows stay)."""
        with self.write() as conn:
            return bk.prune_deltas(conn, time.time() - older_than_s)

    def has_buffered(self, k: int) -> bool:
        """Whether at least ``k`` updates are buffered (reads at most k index entries)."""
        with self.read() as conn:
            return bk.has_buffered(conn, k)

    def buffered_devices(self) -> int:
        """How many devices have at least one update buffered (a round needs K of them)."""
        with self.read() as conn:
            return q.buffered_devices(conn)

    def buffered_count(self, package_version: Optional[str] = None) -> int:
        with self.read() as conn:
            return bk.buffered_count(conn, package_version)

    def metrics_view(self) -> dict:
        """What ``GET /metrics`` reports about the durable state, in one read."""
        with self.read() as conn:
            return bk.metrics_view(conn)

    # ------------------------------------------------------------ outbox and leases
    def acquire_lease(self, name: str, owner: str, seconds: float) -> bool:
        with self.write() as conn:
            return bk.acquire_lease(conn, name, owner, time.time(), seconds)

    def release_lease(self, name: str, owner: str) -> None:
        with self.write() as conn:
            bk.release_lease(conn, name, owner)

    def pending_outbox(self, limit: int = 50) -> list[dict]:
        with self.read() as conn:
            return bk.pending_outbox(conn, limit)

    def outbox_done(self, item_id: int) -> None:
        with self.write() as conn:
            bk.outbox_done(conn, item_id, time.time())

    def outbox_failed(self, item_id: int, error: str) -> None:
        with self.write() as conn:
            bk.outbox_failed(conn, item_id, error)

    def outbox_dead(self, item_id: int, error: str) -> None:
        with self.write() as conn:
            bk.outbox_dead(conn, item_id, error, time.time())

    def dead_outbox(self) -> int:
        with self.read() as conn:
            return bk.dead_outbox(conn)

    def set_mlflow_version(self, table: str, key, version: str) -> None:
        with self.write() as conn:
            q.set_mlflow_version(conn, table, key, version)

    def aggregation(self, agg_id: int) -> Optional[dict]:
        with self.read() as conn:
            row = q.aggregation_row(conn, agg_id)
        return None if row is None else dict(row._mapping)


def _receipts(records: Sequence[UpdateRecord], seen: dict, ids: list[int]) -> list[Receipt]:
    """A receipt per record in order: placeholders (negative) resolve to the ids the INSERT returned;
    a second record with the same key in one batch is its first one's duplicate."""
    out: list[Receipt] = []
    placed: set[int] = set()
    for rec in records:
        uid, digest = seen[(rec.client_id, rec.idempotency_key)]
        if uid < 0:
            first = -1 - uid not in placed
            placed.add(-1 - uid)
            out.append(Receipt(ids[-1 - uid], duplicate=not first, conflict=digest != rec.body_sha256))
        else:
            out.append(Receipt(uid, duplicate=True, conflict=digest != rec.body_sha256))
    return out


def _sqlite_setup(engine: Engine) -> None:
    """WAL, fsync on commit, foreign keys, and transactions we begin ourselves."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # let SQLAlchemy's begin emit our BEGIN
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        if conn.get_execution_options().get("infantino_autocommit", False):
            return
        immediate = conn.get_execution_options().get("infantino_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
