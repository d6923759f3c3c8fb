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
* a group committer (one thread per process) puts the updates that arrive together into
  one transaction, so one fsync acknowledges many devices.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from sqlalchemy import (Column, bindparam, Float, ForeignKey, Index, Integer, LargeBinary, MetaData, String, Table, Text,
                        UniqueConstraint, create_engine, event, func, insert, select, text, update)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from .names import InvalidName, check_device_name

metadata = MetaData()

clients = Table(
    "clients", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("kind", String(8), nullable=False),  # device | admin
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
)

packages = Table(
    "packages", metadata,
    Column("version", String(128), primary_key=True),
    Column("manifest", Text, nullable=False),
    Column("manifest_sha256", String(64), nullable=False),
    Column("folder", Text, nullable=False),  # relative to the data dir
    Column("created_at", Float, nullable=False),
    Column("mlflow_version", String(32)),
)

heads = Table(
    "heads", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),  # the global head version devices see
    Column("package_version", String(128), ForeignKey("packages.version"), nullable=False),
    Column("parent_version", Integer),
    Column("source", String(16), nullable=False),  # bootstrap | aggregation
    Column("blob", LargeBinary, nullable=False),  # OnlineHead npz, as served
    Column("sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("mlflow_version", String(32)),
)

serving = Table(
    "serving", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
    Column("package_version", String(128), ForeignKey("packages.version"), nullable=False),
    Column("head_version", Integer, ForeignKey("heads.version"), nullable=False),
    Column("updated_at", Float, nullable=False),
)

updates = Table(
    "updates", metadata,
    Column("id", Integer, primary_key=True),
    Column("client_id", Integer, ForeignKey("clients.id"), nullable=False),
    Column("idempotency_key", String(128), nullable=False),
    Column("body_sha256", String(64), nullable=False),
    Column("package_version", String(128), nullable=False),
    Column("base_head_version", Integer, ForeignKey("heads.version"), nullable=False),
    Column("n_samples", Integer, nullable=False),
    Column("metrics", Text, nullable=False),
    Column("delta_norm", Float, nullable=False),
    Column("status", String(12), nullable=False),  # buffered | aggregated | superseded
    Column("aggregation_id", Integer),
    Column("received_at", Float, nullable=False),
    UniqueConstraint("client_id", "idempotency_key", name="uq_update_key"),
    Index("ix_updates_status", "status", "id"),
    Index("ix_updates_client_status", "client_id", "status"),  # how many a device has waiting (added later: create_all makes it)
)

# The arrays live apart from the small, often-updated ``updates`` rows: marking 10,000 updates
# aggregated then rewrites a few hundred KB, not 185 MB of blobs. Pruned after a retention time.
update_deltas = Table(
    "update_deltas", metadata,
    Column("update_id", Integer, ForeignKey("updates.id"), primary_key=True, autoincrement=False),
    Column("delta", LargeBinary, nullable=False),  # flat little-endian float32, the head's layer order
)

aggregations = Table(
    "aggregations", metadata,
    Column("id", Integer, primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("package_version", String(128), nullable=False),
    Column("base_head_version", Integer, nullable=False),
    Column("new_head_version", Integer, nullable=False),
    Column("strategy", Text, nullable=False),
    Column("k", Integer, nullable=False),
    Column("info", Text, nullable=False),
    Column("devices", Text, nullable=False),
    Column("update_ids", Text, nullable=False),
)

outbox = Table(
    "tracking_outbox", metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),  # package | aggregation | serve
    Column("ref", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("done_at", Float),
    Index("ix_outbox_pending", "done_at", "id"),
)

crops = Table(
    "crops", metadata,  # consented, caregiver-labelled face crops (uploaded only by devices that opted in)
    Column("id", Integer, primary_key=True),
    Column("client_id", Integer, ForeignKey("clients.id"), nullable=False),
    Column("label", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("width", Integer, nullable=False),
    Column("pixels", LargeBinary, nullable=False),  # raw uint8, row-major
    Column("sha256", String(64), nullable=False),
    Column("package_version", String(128), nullable=False),
    Column("batch_key", String(128), nullable=False),  # the upload's idempotency key (several crops share one)
    Column("created_at", Float, nullable=False),
    UniqueConstraint("client_id", "sha256", name="uq_crops_client_sha"),  # a resent crop is stored once
)

gates = Table(
    "gates", metadata,  # every publish decision: both packages' scores on the held-out sets
    Column("id", Integer, primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("candidate_version", String(128), nullable=False),
    Column("current_version", String(128)),
    Column("passed", Integer, nullable=False),
    Column("decision", String(16), nullable=False),  # promoted | refused | forced | failed (promotion itself failed)
    Column("result", Text, nullable=False),  # JSON of gate.GateResult
)

locks = Table(
    "locks", metadata,
    Column("name", String(32), primary_key=True),
    Column("owner", String(64)),
    Column("until", Float, nullable=False),
)


_Q_CLIENT_BY_TOKEN = select(clients.c.id, clients.c.name, clients.c.kind, clients.c.revoked_at).where(
    clients.c.token_hash == bindparam("h"))
_Q_UPDATE_BY_KEY = select(updates.c.id, updates.c.body_sha256).where(
    updates.c.client_id == bindparam("cid"), updates.c.idempotency_key == bindparam("key"))
_Q_UPDATES_BY_KEYS = select(updates.c.id, updates.c.client_id, updates.c.idempotency_key, updates.c.body_sha256).where(
    updates.c.idempotency_key.in_(bindparam("keys", expanding=True)))
_Q_SERVING_VERSIONS = select(serving.c.package_version, serving.c.head_version).where(serving.c.id == 1)
_Q_BUFFERED_OF_CLIENT = select(func.count()).select_from(updates).where(
    updates.c.client_id == bindparam("cid"), updates.c.status == "buffered")


class StoreError(RuntimeError):
    """The store cannot do what was asked (one line, fit for an operator)."""


class StoreBusy(StoreError):
    """The database stayed locked or unreachable; the caller should retry."""


def hash_token(token: str) -> str:
    # Tokens are 256-bit random strings, so a plain digest is enough (no password stretching).
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def sqlite_url(path: str | os.PathLike) -> str:
    return f"sqlite:///{os.path.abspath(path)}"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Client:
    id: int
    name: str
    kind: str
    revoked: bool


@dataclass(frozen=True)
class HeadRecord:
    version: int
    package_version: str
    blob: bytes
    sha256: str
    layers: tuple  # tuple of float32 arrays (coef_0.., intercept_0..), read-only
    flat: np.ndarray  # float32 vector, read-only

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [a.shape for a in self.layers]


@dataclass(frozen=True)
class Serving:
    package_version: str
    head_version: int
    manifest: dict
    manifest_sha256: str
    folder: str
    head_sha256: str
    head_bytes: int
    bootstrap_head_version: Optional[int] = None


@dataclass
class UpdateRecord:
    """A validated update, ready to insert."""

    client_id: int
    idempotency_key: str
    body_sha256: str
    package_version: str
    base_head_version: int
    n_samples: int
    metrics: dict
    delta: bytes
    delta_norm: float


@dataclass(frozen=True)
class IngestView:
    existing: Optional[tuple[int, str]]  # (update id, body sha256) stored under this idempotency key
    served: Optional[tuple[str, int]]  # (package version, head version)
    waiting: int  # this device's buffered updates
    last_round: int  # id of the newest aggregation (0: none yet)


@dataclass(frozen=True)
class Receipt:
    update_id: int
    duplicate: bool
    conflict: bool = False  # same key, different body


@dataclass
class _Pending:
    record: UpdateRecord
    done: threading.Event = field(default_factory=threading.Event)
    receipt: Optional[Receipt] = None
    error: Optional[BaseException] = None


def parse_head_blob(blob: bytes) -> list[np.ndarray]:
    """Layers of a head npz without building an sklearn object."""
    import io

    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        n_layers = len(meta["params"]["hidden_layer_sizes"]) + 1
        coefs = [np.asarray(npz[f"coef_{i}"], np.float32) for i in range(n_layers)]
        intercepts = [np.asarray(npz[f"intercept_{i}"], np.float32) for i in range(n_layers)]
    return coefs + intercepts


# --------------------------------------------------------------------------- the store


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
        with self.engine.connect() as conn:
            if self.is_sqlite:
                conn.execution_options(infantino_autocommit=True)
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: BEGIN IMMEDIATE on SQLite (waits for the lock up front)."""
        try:
            with self.engine.connect() as conn:
                conn.execution_options(infantino_write=True)
                with conn.begin():
                    yield conn
        except OperationalError as exc:
            raise StoreBusy(f"database unavailable or locked: {str(exc.orig).splitlines()[0] if exc.orig else exc}") from exc

    def create_all(self) -> None:
        """Create missing tables; tolerates another process doing the same at the same moment."""
        for attempt in range(5):
            try:
                metadata.create_all(self.engine)
                for index in updates.indexes:  # indexes added to a table that already existed
                    index.create(self.engine, checkfirst=True)
                return
            except (OperationalError, IntegrityError, ProgrammingError):
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

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
                conn.execute(insert(clients).values(name=name, kind=kind, token_hash=hash_token(token), created_at=time.time()))
        except IntegrityError:
            raise StoreError(f"a client named {name!r} already exists") from None
        return token

    def rotate_admin(self, name: str = "admin") -> str:
        """Issue the admin token: the admin client is found by its kind, so a device that was
        named ``admin`` before names were checked cannot take its place."""
        token = f"ino_{secrets.token_urlsafe(32)}"
        with self.write() as conn:
            row = conn.execute(select(clients.c.id).where(clients.c.kind == "admin").order_by(clients.c.id)).first()
            if row is not None:
                conn.execute(update(clients).where(clients.c.id == row.id).values(token_hash=hash_token(token), revoked_at=None))
                return token
            taken = conn.execute(select(clients.c.id).where(clients.c.name == name)).first() is not None
            admin_name = f"{name}-{secrets.token_hex(3)}" if taken else name
            conn.execute(insert(clients).values(name=admin_name, kind="admin", token_hash=hash_token(token), created_at=time.time()))
        return token

    def list_clients(self) -> list[dict]:
        """Clients with ``last_update``: when the store last accepted an update from them."""
        last = select(func.max(updates.c.received_at)).where(updates.c.client_id == clients.c.id).scalar_subquery()
        with self.read() as conn:
            rows = conn.execute(select(clients.c.name, clients.c.kind, clients.c.created_at, clients.c.revoked_at,
                                       last.label("last_update")).order_by(clients.c.name)).all()
        return [dict(r._mapping) for r in rows]

    def revoke(self, name: str) -> None:
        with self.write() as conn:
            res = conn.execute(update(clients).where(clients.c.name == name, clients.c.revoked_at.is_(None)).values(revoked_at=time.time()))
            if res.rowcount != 1:
                exists = conn.execute(select(clients.c.id).where(clients.c.name == name)).first()
                raise StoreError(f"{name!r} is already revoked" if exists else f"no client named {name!r}")

    def client_for_token(self, token: str) -> Optional[Client]:
        with self.read() as conn:
            row = conn.execute(_Q_CLIENT_BY_TOKEN, {"h": hash_token(token)}).first()
        return None if row is None else Client(row.id, row.name, row.kind, row.revoked_at is not None)

    # ------------------------------------------------------------ packages, heads, serving
    def serving(self) -> Optional[Serving]:
        with self.read() as conn:
            row = conn.execute(
                select(serving.c.package_version, serving.c.head_version, packages.c.manifest, packages.c.manifest_sha256,
                       packages.c.folder, heads.c.sha256, func.length(heads.c.blob).label("head_bytes"))
                .join(packages, packages.c.version == serving.c.package_version)
                .join(heads, heads.c.version == serving.c.head_version)
                .where(serving.c.id == 1)).first()
            if row is None:
                return None
            boot = conn.execute(select(func.min(heads.c.version)).where(
                heads.c.package_version == row.package_version, heads.c.source == "bootstrap")).scalar()
        return Serving(row.package_version, row.head_version, json.loads(row.manifest), row.manifest_sha256, row.folder,
                       row.sha256, int(row.head_bytes), None if boot is None else int(boot))

    def package(self, version: str) -> Optional[dict]:
        with self.read() as conn:
            row = conn.execute(select(packages).where(packages.c.version == version)).first()
        return None if row is None else dict(row._mapping)

    def head(self, version: int, conn: Optional[Connection] = None) -> Optional[HeadRecord]:
        """A head by version; heads never change, so they are cached in the process."""
        cached = self._heads.get(version)
        if cached is not None:
            return cached
        if conn is None:
            with self.read() as c:
                row = c.execute(select(heads).where(heads.c.version == version)).first()
        else:
            row = conn.execute(select(heads).where(heads.c.version == version)).first()
        if row is None:
            return None
        layers = parse_head_blob(row.blob)
        flat = np.concatenate([a.ravel() for a in layers]).astype(np.float32)
        for a in layers:
            a.setflags(write=False)
        flat.setflags(write=False)
        rec = HeadRecord(row.version, row.package_version, bytes(row.blob), row.sha256, tuple(layers), flat)
        with self._heads_lock:
            if len(self._heads) > 64:
                self._heads.pop(next(iter(self._heads)))
            self._heads[version] = rec
        return rec

    def next_head_version(self, conn: Connection) -> int:
        return int(conn.execute(select(func.coalesce(func.max(heads.c.version), 0))).scalar_one()) + 1

    def lock_serving(self, conn: Connection):
        """The serving row, locked against other aggregators/promoters until the transaction ends."""
        return conn.execute(select(serving).where(serving.c.id == 1).with_for_update()).first()

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
        now = time.time()
        with self.write() as conn:
            seen: dict[tuple[int, str], tuple[int, str]] = {}
            if check_keys:
                keys = sorted({r.idempotency_key for r in records})
                seen = {(row.client_id, row.idempotency_key): (row.id, row.body_sha256)
                        for row in conn.execute(_Q_UPDATES_BY_KEYS, {"keys": keys})}
            fresh: list[UpdateRecord] = []
            for rec in records:
                key = (rec.client_id, rec.idempotency_key)
                if key not in seen:
                    seen[key] = (-1 - len(fresh), rec.body_sha256)  # placeholder until the INSERT returns ids
                    fresh.append(rec)
            ids: list[int] = []
            if fresh:
                rows = [{"client_id": r.client_id, "idempotency_key": r.idempotency_key, "body_sha256": r.body_sha256,
                         "package_version": r.package_version, "base_head_version": r.base_head_version,
                         "n_samples": r.n_samples, "metrics": json.dumps(r.metrics),
                         "delta_norm": r.delta_norm, "status": "buffered", "received_at": now} for r in fresh]
                ids = list(conn.execute(insert(updates).returning(updates.c.id, sort_by_parameter_order=True), rows).scalars())
                conn.execute(insert(update_deltas), [{"update_id": uid, "delta": r.delta} for uid, r in zip(ids, fresh)])
        out: list[Receipt] = []
        placed: set[int] = set()
        for rec in records:
            uid, digest = seen[(rec.client_id, rec.idempotency_key)]
            if uid < 0:
                real = ids[-1 - uid]
                first = -1 - uid not in placed
                placed.add(-1 - uid)
                out.append(Receipt(real, duplicate=not first, conflict=digest != rec.body_sha256))
            else:
                out.append(Receipt(uid, duplicate=True, conflict=digest != rec.body_sha256))
        return out

    def submit_update(self, record: UpdateRecord, timeout_s: float = 30.0, on_commit: Optional[Callable[[], None]] = None) -> Receipt:
        """Durably store one update through the group committer; returns once committed."""
        with self._committer_lock:
            if self._committer is None or not self._committer.alive():
                self._committer = GroupCommitter(self, on_commit=on_commit)
        return self._committer.submit(record, timeout_s)

    def find_update(self, client_id: int, key: str) -> Optional[tuple[int, str]]:
        """(update id, body sha256) of a stored update with this idempotency key, if any."""
        with self.read() as conn:
            row = conn.execute(_Q_UPDATE_BY_KEY, {"cid": client_id, "key": key}).first()
        return None if row is None else (row.id, row.body_sha256)

    def ingest_view(self, client_id: int, key: str) -> "IngestView":
        """One read for an incoming update: the stored update with this key, what is served, how many
        updates of this device wait, and the newest round (to know when the norm bound moved)."""
        with self.read() as conn:
            dup = conn.execute(_Q_UPDATE_BY_KEY, {"cid": client_id, "key": key}).first()
            srv = conn.execute(_Q_SERVING_VERSIONS).first()
            waiting = 0 if dup is not None else int(conn.execute(_Q_BUFFERED_OF_CLIENT, {"cid": client_id}).scalar_one())
            last_round = conn.execute(select(func.max(aggregations.c.id))).scalar()
        return IngestView(None if dup is None else (dup.id, dup.body_sha256),
                          None if srv is None else (srv.package_version, int(srv.head_version)), waiting, int(last_round or 0))

    def recent_voice_norm(self, package_version: str, history: int = 20, conn: Optional[Connection] = None) -> Optional[float]:
        """The median voice norm of the last ``history`` rounds that served a head on this package
        (what honest devices' updates measure), or None before the first."""
        q = (select(aggregations.c.info).where(aggregations.c.package_version == package_version,
                                               aggregations.c.new_head_version != aggregations.c.base_head_version)
             .order_by(aggregations.c.id.desc()).limit(history))
        if conn is None:
            with self.read() as c:
                infos = c.execute(q).scalars().all()
        else:
            infos = conn.execute(q).scalars().all()
        norms = []
        for raw in infos:
            info = json.loads(raw)
            value = info.get("voice_norm_median", info.get("delta_norm_median"))
            if isinstance(value, (int, float)) and value > 0:
                norms.append(float(value))
        return float(np.median(norms)) if norms else None

    def counts(self) -> dict[str, int]:
        with self.read() as conn:
            rows = conn.execute(select(updates.c.status, func.count()).group_by(updates.c.status)).all()
        return {status: int(n) for status, n in rows}

    def prune_deltas(self, older_than_s: float) -> int:
        """Drop the arrays of updates aggregated or superseded more than ``older_than_s`` ago (rows stay)."""
        cutoff = time.time() - older_than_s
        with self.write() as conn:
            done = select(updates.c.id).where(updates.c.status != "buffered", updates.c.received_at < cutoff)
            return int(conn.execute(update_deltas.delete().where(update_deltas.c.update_id.in_(done))).rowcount or 0)

    def has_buffered(self, k: int) -> bool:
        """Whether at least ``k`` updates are buffered (reads at most k index entries)."""
        with self.read() as conn:
            return conn.execute(select(updates.c.id).where(updates.c.status == "buffered").order_by(updates.c.status, updates.c.id)
                                .offset(max(0, k - 1)).limit(1)).first() is not None

    def buffered_devices(self) -> int:
        """How many devices have at least one update buffered (a round needs K of them)."""
        with self.read() as conn:
            return int(conn.execute(select(func.count(func.distinct(updates.c.client_id)))
                                    .where(updates.c.status == "buffered")).scalar_one())

    def buffered_count(self, package_version: Optional[str] = None) -> int:
        q = select(func.count()).select_from(updates).where(updates.c.status == "buffered")
        if package_version is not None:
            q = q.where(updates.c.package_version == package_version)
        with self.read() as conn:
            return int(conn.execute(q).scalar_one())

    def metrics_view(self) -> dict:
        """What ``GET /metrics`` reports about the durable state, in one read."""
        refused = aggregations.c.new_head_version == aggregations.c.base_head_version
        with self.read() as conn:
            by_status = {s: int(n) for s, n in conn.execute(select(updates.c.status, func.count()).group_by(updates.c.status))}
            waiting = int(conn.execute(select(func.count(func.distinct(updates.c.client_id)))
                                       .where(updates.c.status == "buffered")).scalar_one())
            rounds = {"refused" if r else "served": int(n)
                      for r, n in conn.execute(select(refused, func.count()).group_by(refused))}
            gate_rows = {d: int(n) for d, n in conn.execute(select(gates.c.decision, func.count()).group_by(gates.c.decision))}
            revoked = clients.c.revoked_at.is_not(None)
            devices = {"revoked" if r else "active": int(n) for r, n in conn.execute(
                select(revoked, func.count()).where(clients.c.kind == "device").group_by(revoked))}
            srv = conn.execute(_Q_SERVING_VERSIONS).first()
            pending = conn.execute(select(func.count(), func.min(outbox.c.id), func.min(outbox.c.created_at))
                                   .where(outbox.c.done_at.is_(None))).first()
            error = None if pending[1] is None else conn.execute(
                select(outbox.c.last_error).where(outbox.c.id == pending[1])).scalar_one_or_none()
        return {"updates": by_status, "buffered_devices": waiting, "rounds": {"served": 0, "refused": 0, **rounds},
                "package_gates": gate_rows, "devices": {"active": 0, "revoked": 0, **devices},
                "serving": None if srv is None else (srv.package_version, int(srv.head_version)),
                "outbox": {"pending": int(pending[0]), "oldest": pending[2], "last_error": error}}

    # ------------------------------------------------------------ outbox and leases
    def acquire_lease(self, name: str, owner: str, seconds: float) -> bool:
        now = time.time()
        with self.write() as conn:
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

    def release_lease(self, name: str, owner: str) -> None:
        with self.write() as conn:
            conn.execute(update(locks).where(locks.c.name == name, locks.c.owner == owner).values(owner=None, until=0.0))

    def pending_outbox(self, limit: int = 50) -> list[dict]:
        with self.read() as conn:
            rows = conn.execute(select(outbox).where(outbox.c.done_at.is_(None)).order_by(outbox.c.id).limit(limit)).all()
        return [dict(r._mapping) for r in rows]

    def outbox_done(self, item_id: int) -> None:
        with self.write() as conn:
            conn.execute(update(outbox).where(outbox.c.id == item_id).values(done_at=time.time(), last_error=None))

    def outbox_failed(self, item_id: int, error: str) -> None:
        with self.write() as conn:
            conn.execute(update(outbox).where(outbox.c.id == item_id)
                         .values(attempts=outbox.c.attempts + 1, last_error=error[:2000]))

    def set_mlflow_version(self, table: str, key, version: str) -> None:
        t = {"heads": heads, "packages": packages}[table]
        col = t.c.version
        with self.write() as conn:
            conn.execute(update(t).where(col == key).values(mlflow_version=str(version)))

    def aggregation(self, agg_id: int) -> Optional[dict]:
        with self.read() as conn:
            row = conn.execute(select(aggregations).where(aggregations.c.id == agg_id)).first()
        return None if row is None else dict(row._mapping)


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


# --------------------------------------------------------------------------- group commit


class GroupCommitter:
    """One thread per process that commits the updates waiting at that moment together."""

    def __init__(self, store: Store, max_batch: int = 128, on_commit: Optional[Callable[[], None]] = None):
        self.store = store
        self.max_batch = max_batch
        self.on_commit = on_commit
        self._queue: "queue.Queue[Optional[_Pending]]" = queue.Queue()
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="infantino-group-commit", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._pid == os.getpid() and self._thread.is_alive()

    def submit(self, record: UpdateRecord, timeout_s: float) -> Receipt:
        item = _Pending(record)
        self._queue.put(item)
        if not item.done.wait(timeout_s):
            raise StoreBusy("the store did not commit the update in time")
        if item.error is not None:
            raise item.error
        assert item.receipt is not None
        return item.receipt

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                receipts = self.store.insert_updates([p.record for p in batch])
                for p, r in zip(batch, receipts):
                    p.receipt = r
            except BaseException as exc:  # noqa: BLE001 - every waiter must hear about it
                err = exc if isinstance(exc, StoreError) else StoreBusy(f"store write failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                for p in batch:
                    p.error = err
            for p in batch:
                p.done.set()
            if self.on_commit is not None and any(p.receipt is not None for p in batch):
                try:
                    self.on_commit()
                except Exception:  # noqa: BLE001 - a failed trigger must not stop the committer
                    pass
