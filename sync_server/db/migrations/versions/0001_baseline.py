"""Baseline: the schema servers created with ``metadata.create_all`` before migrations.

A store that has these tables but no ``alembic_version`` is stamped with this revision on
start (``infantino.sync_server.db.migrate``); a fresh store is created by running it. The
DDL is written out here, frozen, rather than taken from ``tables.py``, which moves on.
Like ``create_all`` it creates only what is missing, so a store from a release that had
fewer tables (no ``crops``, no ``gates``) is completed rather than refused.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-12-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    _identity()
    _models()
    _updates()
    _bookkeeping()


def _table(name: str, *columns) -> None:
    if not sa.inspect(op.get_bind()).has_table(name):
        op.create_table(name, *columns)


def _index(name: str, table: str, columns: list[str]) -> None:
    if name not in {ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes(table)}:
        op.create_index(name, table, columns)


def _identity() -> None:
    _table(
        "clients",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
    )
    _table(
        "locks",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(64)),
        sa.Column("until", sa.Float, nullable=False),
    )


def _models() -> None:
    _table(
        "packages",
        sa.Column("version", sa.String(128), primary_key=True),
        sa.Column("manifest", sa.Text, nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("folder", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("mlflow_version", sa.String(32)),
    )
    _table(
        "heads",
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("package_version", sa.String(128), sa.ForeignKey("packages.version"), nullable=False),
        sa.Column("parent_version", sa.Integer),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("blob", sa.LargeBinary, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("mlflow_version", sa.String(32)),
    )
    _table(
        "serving",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("package_version", sa.String(128), sa.ForeignKey("packages.version"), nullable=False),
        sa.Column("head_version", sa.Integer, sa.ForeignKey("heads.version"), nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def _updates() -> None:
    _table(
        "updates",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("client_id", sa.Integer, sa.ForeignKey("clients.id"), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("body_sha256", sa.String(64), nullable=False),
        sa.Column("package_version", sa.String(128), nullable=False),
        sa.Column("base_head_version", sa.Integer, sa.ForeignKey("heads.version"), nullable=False),
        sa.Column("n_samples", sa.Integer, nullable=False),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.Column("delta_norm", sa.Float, nullable=False),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("aggregation_id", sa.Integer),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.UniqueConstraint("client_id", "idempotency_key", name="uq_update_key"),
    )
    _index("ix_updates_status", "updates", ["status", "id"])
    _index("ix_updates_client_status", "updates", ["client_id", "status"])
    _table(
        "update_deltas",
        sa.Column("update_id", sa.Integer, sa.ForeignKey("updates.id"), primary_key=True, autoincrement=False),
        sa.Column("delta", sa.LargeBinary, nullable=False),
    )
    _table(
        "aggregations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("package_version", sa.String(128), nullable=False),
        sa.Column("base_head_version", sa.Integer, nullable=False),
        sa.Column("new_head_version", sa.Integer, nullable=False),
        sa.Column("strategy", sa.Text, nullable=False),
        sa.Column("k", sa.Integer, nullable=False),
        sa.Column("info", sa.Text, nullable=False),
        sa.Column("devices", sa.Text, nullable=False),
        sa.Column("update_ids", sa.Text, nullable=False),
    )


def _bookkeeping() -> None:
    _table(
        "tracking_outbox",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ref", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("done_at", sa.Float),
    )
    _index("ix_outbox_pending", "tracking_outbox", ["done_at", "id"])
    _table(
        "crops",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("client_id", sa.Integer, sa.ForeignKey("clients.id"), nullable=False),
        sa.Column("label", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("pixels", sa.LargeBinary, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("package_version", sa.String(128), nullable=False),
        sa.Column("batch_key", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("client_id", "sha256", name="uq_crops_client_sha"),
    )
    _table(
        "gates",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("candidate_version", sa.String(128), nullable=False),
        sa.Column("current_version", sa.String(128)),
        sa.Column("passed", sa.Integer, nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("result", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("gates", "crops", "tracking_outbox", "aggregations", "update_deltas", "updates", "serving", "heads",
                  "packages", "locks", "clients"):
        op.drop_table(table)
