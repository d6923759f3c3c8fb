#!/usr/bin/env bash
# Start a local PostgreSQL for the store tests and print its SQLAlchemy URL on stdout.
#
#   url=$(.ci/pg.sh)                      # install if needed, start, create role + db
#   INFANTINO_TEST_PG_URL="$url" python -m pytest tests/test_server_store.py
#   .ci/pg.sh stop                        # stop the cluster again
#
# Debian/Ubuntu, run as root (apt-get, pg_ctlcluster). Listens on 127.0.0.1 only.
# Settings: PG_PORT (5432), PG_DB (infantino_test), PG_USER (infantino), PG_PASSWORD (infantino).
# Progress goes to stderr; stdout carries only the URL. Idempotent: safe to run twice.
set -euo pipefail

PG_PORT="${PG_PORT:-5432}"
PG_DB="${PG_DB:-infantino_test}"
PG_USER="${PG_USER:-infantino}"
PG_PASSWORD="${PG_PASSWORD:-infantino}"

say() { echo "pg.sh: $*" >&2; }

if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    say "installing postgresql (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
fi

PG_VERSION="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
CLUSTER=main

if [[ "${1:-}" == "stop" ]]; then
    pg_ctlcluster "$PG_VERSION" "$CLUSTER" stop >&2 || true
    say "stopped $PG_VERSION/$CLUSTER"
    exit 0
fi

if ! pg_lsclusters -h 2>/dev/null | awk '{print $1"/"$2}' | grep -qx "$PG_VERSION/$CLUSTER"; then
    say "creating cluster $PG_VERSION/$CLUSTER on port $PG_PORT"
    pg_createcluster "$PG_VERSION" "$CLUSTER" --port "$PG_PORT" >&2
fi

if ! pg_lsclusters -h | awk -v v="$PG_VERSION" -v c="$CLUSTER" '$1==v && $2==c {print $4}' | grep -q online; then
    say "starting $PG_VERSION/$CLUSTER"
    pg_ctlcluster "$PG_VERSION" "$CLUSTER" start -- -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT" >&2 \
        || pg_ctlcluster "$PG_VERSION" "$CLUSTER" start >&2
fi

port="$(pg_lsclusters -h | awk -v v="$PG_VERSION" -v c="$CLUSTER" '$1==v && $2==c {print $3}')"
for _ in $(seq 1 60); do
    if su postgres -c "pg_isready -q -h 127.0.0.1 -p $port" 2>/dev/null; then break; fi
    sleep 0.5
done
su postgres -c "pg_isready -h 127.0.0.1 -p $port" >&2

psql_admin() { su postgres -c "psql -v ON_ERROR_STOP=1 -q -p $port -tA -c \"$1\""; }

if [[ "$(psql_admin "SELECT 1 FROM pg_roles WHERE rolname='$PG_USER'")" != "1" ]]; then
    psql_admin "CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_PASSWORD' CREATEDB" >&2
fi
if [[ "$(psql_admin "SELECT 1 FROM pg_database WHERE datname='$PG_DB'")" != "1" ]]; then
    psql_admin "CREATE DATABASE $PG_DB OWNER $PG_USER" >&2
fi

say "PostgreSQL $PG_VERSION ready on 127.0.0.1:$port, database $PG_DB"
echo "postgresql+psycopg2://$PG_USER:$PG_PASSWORD@127.0.0.1:$port/$PG_DB"
