"""``Unit``: one transaction's statements, handed out by ``Store.change()`` / ``Store.look()``.

A promotion, an aggregation round, a gate decision or a crop upload changes several rows that
must agree, so it runs several statements in one transaction. The server's modules get those
statements from a ``Unit`` bound to the store's connection instead of importing ``queries`` or
``bookkeeping`` and passing a connection around: the database is reached through ``Store``
alone, and a statement a module may use is one named here.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from sqlalchemy.engine import Connection

from . import bookkeeping as bk
from . import queries as q


def _bound(statement: Callable[..., Any]) -> Callable[..., Any]:
    """``statement(conn, ...)`` as a method of the unit, on the unit's connection."""
    @functools.wraps(statement)
    def method(self: "Unit", *args: Any, **kwargs: Any) -> Any:
        return statement(self.conn, *args, **kwargs)
    return method


class Unit:
    """The statements of one transaction (``conn`` is the store's, for the store's own readers)."""

    def __init__(self, conn: Connection):
        self.conn = conn

    # serving, packages, heads
    lock_serving = _bound(q.lock_serving)
    set_serving = _bound(q.set_serving)
    package_row = _bound(q.package_row)
    insert_package = _bound(q.insert_package)
    next_head_version = _bound(q.next_head_version)
    insert_head = _bound(q.insert_head)
    newest_head = _bound(q.newest_head)
    head_package = _bound(q.head_package)
    bootstrap_head = _bound(q.bootstrap_head)
    head_mlflow_version = _bound(q.head_mlflow_version)
    # updates and rounds
    supersede_buffered = _bound(q.supersede_buffered)
    claimable = _bound(q.claimable)
    load_deltas = _bound(q.load_deltas)
    insert_aggregation = _bound(q.insert_aggregation)
    mark_updates = _bound(q.mark_updates)
    enqueue_tracking = _bound(q.enqueue_tracking)
    # gates and crops
    insert_gate = _bound(bk.insert_gate)
    gate_row = _bound(bk.gate_row)
    client_id_by_name = _bound(bk.client_id_by_name)
    known_crops = _bound(bk.known_crops)
    insert_crops = _bound(bk.insert_crops)
    crop_counts = _bound(bk.crop_counts)
    crop_rows = _bound(bk.crop_rows)
    delete_crops = _bound(bk.delete_crops)
