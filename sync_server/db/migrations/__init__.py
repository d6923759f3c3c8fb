"""Alembic migrations of the server's store (``script_location``: ``infantino.sync_server.db:migrations``)."""
