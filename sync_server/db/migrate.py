"""Bring a store's schema to the newest Alembic revision, on every start.

* a fresh store (no tables): created by running the migrations from the baseline;
* a store made by ``create_all`` before migrations (today's tables, no ``alembic_version``):
  stamped as the baseline, then upgraded;
* a store at an older revision: upgraded; at the newest: left alone (one read).

Several processes may start at once (gunicorn workers, the CLI): the upgrade runs in one
write transaction (``BEGIN IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL; DDL is
transactional on both), so the second finds the work done.
"""
from __future__ import annotations

import time

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

SCRIPT_LOCATION = "infantino.sync_server.db:migrations"
BASELINE = "0001_baseline"
BASELINE_TABLES = ("clients", "packages", "heads", "serving", "updates", "update_deltas", "aggregations",
                   "tracking_outbox", "crops", "gates", "locks")
_PG_LOCK_KEY = 0x1F0A_7100  # pg_advisory_xact_lock key of the store's migrations


def alembic_config(conn: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection):
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, attempts: int = 5) -> str:
    """Stamp (a pre-migration store) and upgrade to the newest revision; returns it."""
    head = head_revision()
    with engine.connect() as conn:
        if current_revision(conn) == head:
            return head
    for attempt in range(attempts):
        try:
            _upgrade_locked(engine)
            return head
        except (OperationalError, IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    return head


def _upgrade_locked(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execution_options(infantino_write=True)  # BEGIN IMMEDIATE on SQLite
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            cfg = alembic_config(conn)
            if current_revision(conn) is None and _made_by_create_all(conn):
                command.stamp(cfg, BASELINE)
            command.upgrade(cfg, "head")


def _made_by_create_all(conn: Connection) -> bool:
    """Today's tables and indexes without a revision: a store made by ``create_all``. (One from
    an older release, with a table or index missing, is completed by the baseline instead,
    which creates only what is missing.)"""
    insp = inspect(conn)
    if not all(insp.has_table(t) for t in BASELINE_TABLES):
        return False
    return {"ix_updates_status", "ix_updates_client_status"} <= {ix["name"] for ix in insp.get_indexes("updates")}
