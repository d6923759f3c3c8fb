"""The server's data-access layer: the only code that writes SQL against the store's tables.

``tables`` (schema) · ``migrations`` + ``migrate`` (Alembic, run on start) · ``queries``
(the round path: serving, packages, heads, updates, aggregations, the outbox insert) ·
``bookkeeping`` (clients, outbox and leases, gates, crops, metrics) · ``committer`` (group
commit) · ``records`` (errors and records). Every statement takes the caller's connection;
``infantino.sync_server.store.Store`` owns the engine and the transactions.
"""
