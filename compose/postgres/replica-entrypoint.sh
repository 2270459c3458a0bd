#!/bin/bash
# A streaming replica: on first start, clone the primary with pg_basebackup (-R writes
# primary_conninfo and standby.signal, -C -S creates its replication slot); afterwards
# start PostgreSQL as usual. WAL missing from the primary is fetched from the backup
# repository by restore_command (`emrdr wal fetch`).
set -euo pipefail
: "${PG_PRIMARY_HOST:?}" "${PG_REPLICATION_PASSWORD:?}" "${PG_SLOT_NAME:?}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA" && chown postgres:postgres "$PGDATA" && chmod 700 "$PGDATA"
  until pg_isready -h "$PG_PRIMARY_HOST" -p 5432 -q; do sleep 2; done
  gosu postgres env PGPASSWORD="$PG_REPLICATION_PASSWORD" pg_basebackup \
    -h "$PG_PRIMARY_HOST" -U replicator -D "$PGDATA" -R -X stream -C -S "$PG_SLOT_NAME" \
    --checkpoint=fast --progress
fi
exec docker-entrypoint.sh "$@"
