#!/bin/bash
# Runs once, when the official image initialises the primary's data directory: the
# replication role the replica streams from, and its pg_hba entry.
set -euo pipefail
: "${PG_REPLICATION_PASSWORD:?set PG_REPLICATION_PASSWORD}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v pw="$PG_REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'pw';
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
