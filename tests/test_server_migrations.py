"""The store's schema under Alembic: a store made by the old ``create_all`` (today's tables, no
revision) is stamped and upgraded with every row kept, a fresh one is created by the upgrade,
and the migrated schema is exactly ``db.tables``. SQLite always, PostgreSQL with INFANTINO_TEST_PG_URL."""
from __future__ import annotations

import importlib
import uuid

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.operations import Operations

from server_helpers import BACKENDS, store_url_for
from infantino.sync_server import store as st
from infantino.sync_server.aggregate import Strategy
from infantino.sync_server.db import migrate
from infantino.sync_server.db.tables import metadata
from infantino.sync_server.models import promote_package
from infantino.sync_server.rounds import aggregate_once

baseline = importlib.import_module("infantino.sync_server.db.migrations.versions.0001_baseline")


def _create_all_without_alembic(url: str, skip: tuple[str, ...] = ()) -> None:
    """Today's schema as servers before migrations made it: the frozen baseline DDL, no
    ``alembic_version`` (``skip``: tables an older release did not have yet)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        with Operations.context(MigrationContext.configure(conn)):
            baseline.upgrade()
        for name in skip:
            conn.execute(sa.text(f"DROP TABLE {name}"))
    engine.dispose()


def _fill(store: st.Store, data_dir, package_dir) -> None:
    """A working server's rows: devices, a package and heads, updates aggregated and buffered, the outbox."""
    promote_package(store, data_dir, package_dir)
    names = ["cam-a", "cam-b"]
    for name in names:
        store.add_client(name)
    store.rotate_admin()
    serving = store.serving()
    size = store.head(serving.head_version).flat.size
    rng = np.random.default_rng(0)
    for round_ in range(2):
        recs = [st.UpdateRecord(client_id=cid, idempotency_key=uuid.uuid4().hex, body_sha256=f"{cid}{round_}".ljust(64, "0"),
                                package_version=serving.package_version, base_head_version=store.serving().head_version,
                                n_samples=3 + cid, metrics={"accuracy": 0.5}, delta_norm=0.1,
                                delta=rng.normal(0, 0.01, size).astype("<f4").tobytes()) for cid in (1, 2)]
        store.insert_updates(recs)
        if round_ == 0:
            assert aggregate_once(store, Strategy(rule="fedavg", clip_norm=None), min_updates=2) is not None
    store.acquire_lease("tracking", "someone", 60.0)


def _snapshot(url: str) -> dict:
    """Every row of every table, in primary-key order."""
    engine = sa.create_engine(url)
    out = {}
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            rows = conn.execute(sa.select(table).order_by(*table.primary_key.columns)).all()
            out[table.name] = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows]
    engine.dispose()
    return out


def _revision(url: str):
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rev = migrate.current_revision(conn)
    engine.dispose()
    return rev


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_store_made_by_create_all_is_stamped_and_upgraded_losing_nothing(backend, tmp_path, tiny_package_dir):
    with store_url_for(backend, tmp_path) as url:
        # Prepare: yesterday's server made its tables with create_all and has served for a while
        _create_all_without_alembic(url)
        old = st.Store(url)
        _fill(old, tmp_path, tiny_package_dir)
        old.dispose()
        before = _snapshot(url)
        assert _revision(url) is None and before["updates"] and before["update_deltas"] and before["aggregations"]
        # Execute: today's server starts on it
        store = st.Store(url)
        revision = store.create_all()
        # Assert: stamped and at the newest revision, every row as it was, and the store still works
        assert revision == migrate.head_revision() and _revision(url) == revision
        assert _snapshot(url) == before
        assert store.counts() == {"aggregated": 2, "buffered": 2}
        assert aggregate_once(store, Strategy(rule="fedavg", clip_norm=None), min_updates=2).n_updates == 2
        store.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fresh_store_is_created_by_the_upgrade_and_matches_the_tables(backend, tmp_path):
    with store_url_for(backend, tmp_path) as url:
        store = st.Store(url)
        assert store.create_all() == migrate.head_revision()
        assert store.create_all() == migrate.head_revision()  # a second start changes nothing
        with store.engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diffs == []
        store.dispose()


def test_a_store_from_a_release_with_fewer_tables_is_completed(tmp_path, tiny_package_dir):
    url = st.sqlite_url(tmp_path / "server.db")
    _create_all_without_alembic(url, skip=("gates", "crops"))
    old = st.Store(url)
    old.add_client("cam-a")
    old.dispose()
    store = st.Store(url)
    store.create_all()
    assert _revision(url) == migrate.head_revision()
    assert [c["name"] for c in store.list_clients()] == ["cam-a"]
    assert set(sa.inspect(store.engine).get_table_names()) >= {"gates", "crops", "alembic_version"}
    store.dispose()


def test_a_built_wheel_ships_the_migrations(built_wheel):
    """A non-editable install carries the migration scripts (package data), not only the checkout."""
    import zipfile

    wheel = built_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = "infantino/sync_server/db/migrations/"
    assert {migrations + "env.py", migrations + "script.py.mako", migrations + "versions/0001_baseline.py"} <= names


@pytest.mark.parametrize("backend", BACKENDS)
def test_processes_starting_together_on_a_fresh_store_all_come_up(backend, tmp_path):
    import threading

    # Prepare: four engines = four gunicorn workers starting at once on an empty database
    with store_url_for(backend, tmp_path) as url:
        stores = [st.Store(url) for _ in range(4)]
        results, errors = [], []
        start = threading.Barrier(len(stores))

        def boot(store):
            start.wait()
            try:
                results.append(store.create_all())
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(repr(exc))

        # Execute
        threads = [threading.Thread(target=boot, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # Assert: every one at the newest revision, the schema made once
        assert errors == [] and results == [migrate.head_revision()] * len(stores)
        with stores[0].engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
        for s in stores:
            s.dispose()
