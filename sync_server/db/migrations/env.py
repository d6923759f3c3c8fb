"""Alembic environment: runs on the connection ``infantino.sync_server.db.migrate`` hands it
(``config.attributes["connection"]``), inside that connection's transaction."""
from __future__ import annotations

from alembic import context

from infantino.sync_server.db.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the store's migrations through infantino.sync_server.db.migrate (it passes a connection)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
