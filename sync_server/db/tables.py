"""The store's schema: every table the server keeps, in SQLAlchemy Core.

The tables are created and changed only by the Alembic migrations next to this module
(``infantino.sync_server.db.migrations``); ``infantino.sync_server.db.migrate`` brings a
store to the newest revision on start. Change a table here *and* add a migration.
"""
from __future__ import annotations

from sqlalchemy import Column, Float, ForeignKey, Index, Integer, LargeBinary, MetaData, String, Table, Text, UniqueConstraint

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
    Index("ix_updates_client_status", "client_id", "status"),  # how many a device has waiting
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

