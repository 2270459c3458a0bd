"""What replication-monitors hand to coordinators, and the extra facts monitors export.

A monitor keeps its latest poll in the ``emrdr_topology`` bucket under
``observations.<monitor>`` (one key per monitor, overwritten each poll: nothing floods the
audit trail). A coordinator reads every monitor's batch each cycle and feeds batches it has not
seen into its :class:`~emrdr.failover.judge.HealthHistory` (several monitors give a quorum).

Also here: archiver, replication-slot and synchronous-standby probes, and disk use, as small
functions over one connection or one path (pure derivations apart).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import asyncpg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field

from emrdr.config import PgNode, ThresholdSettings
from emrdr.messages.events import NodeObservation, Severity
from emrdr.monitor.thresholds import classify_lag

__all__ = [
    "OBSERVATIONS_PREFIX",
    "ArchiveFacts",
    "ObservationBatch",
    "SlotFacts",
    "archive_lag_seconds",
    "classify_archive_lag",
    "fetch_archive",
    "fetch_slots",
    "fetch_sync_standbys",
    "observation_key",
    "put_batch",
    "read_batches",
    "storage_volumes",
    "used_ratio",
]

OBSERVATIONS_PREFIX = "observations."


class ObservationBatch(BaseModel):
    """One monitor's poll of every node, as stored in the topology bucket."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    monitor: str
    at: float = Field(description="Wall-clock seconds (time.time()) when the poll started.")
    seq: int = 0
    nodes: list[NodeObservation]
    sync_standbys: list[str] | None = Field(
        default=None, description="Standbys the primary counted as sync/quorum (None: unknown)."
    )


def observation_key(monitor: str) -> str:
    """``observations.<monitor>`` with characters a KV key cannot hold replaced."""
    return OBSERVATIONS_PREFIX + re.sub(r"[^A-Za-z0-9_=-]", "_", monitor)


async def put_batch(kv: KeyValue, batch: ObservationBatch) -> int:
    return await kv.put(observation_key(batch.monitor), batch.model_dump_json().encode())


async def read_batches(kv: KeyValue) -> list[ObservationBatch]:
    """Every monitor's latest batch (unreadable entries are skipped)."""
    try:
        keys = await kv.keys()
    except Exception as exc:  # nats raises NoKeysError on an empty bucket
        if type(exc).__name__ == "NoKeysError":
            return []
        raise
    out: list[ObservationBatch] = []
    for key in keys:
        if not key.startswith(OBSERVATIONS_PREFIX):
            continue
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            continue
        if entry.value:
            try:
                out.append(ObservationBatch.model_validate_json(entry.value))
            except ValueError:
                continue
    return out


# --- archiver -------------------------------------------------------------------------------


class ArchiveFacts(BaseModel):
    model_config = ConfigDict(frozen=True)

    node: str
    pending_segments: int
    archived_count: int = 0
    failed_count: int = 0
    last_archived_wal: str | None = None
    last_archived_age_s: float | None = None
    last_failed_wal: str | None = None


_ARCHIVE_SQL = """
SELECT archived_count, failed_count, last_archived_wal, last_failed_wal,
       EXTRACT(EPOCH FROM clock_timestamp() - last_archived_time)::float8 AS age,
       (SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready') AS pending
FROM pg_stat_archiver
"""


async def fetch_archive(conn: asyncpg.Connection, node: str) -> ArchiveFacts:
    row = await conn.fetchrow(_ARCHIVE_SQL)
    return ArchiveFacts(
        node=node,
        pending_segments=int(row["pending"] or 0),
        archived_count=int(row["archived_count"] or 0),
        failed_count=int(row["failed_count"] or 0),
        last_archived_wal=row["last_archived_wal"],
        last_archived_age_s=row["age"],
        last_failed_wal=row["last_failed_wal"],
    )


def archive_lag_seconds(facts: ArchiveFacts) -> float:
    """RPO exposure: 0 when nothing waits; else how long ago the archiver last succeeded
    (a node that never archived but has segments waiting counts from 0, as unknown)."""
    if facts.pending_segments == 0:
        return 0.0
    return max(0.0, facts.last_archived_age_s or 0.0)


def classify_archive_lag(facts: ArchiveFacts, t: ThresholdSettings) -> Severity:
    """Severity of the archive lag, by the same thresholds as replication lag."""
    return classify_lag(archive_lag_seconds(facts), t)


# --- replication slots and synchronous standbys ---------------------------------------------


class SlotFacts(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    active: bool
    retained_bytes: int | None


_SLOTS_SQL = """
SELECT slot_name::text AS name, active,
       CASE WHEN restart_lsn IS NULL THEN NULL
            ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint END AS retained
FROM pg_replication_slots WHERE slot_type = 'physical'
"""


async def fetch_slots(conn: asyncpg.Connection) -> list[SlotFacts]:
    """Physical slots on a primary and the WAL each keeps (bytes behind the current LSN)."""
    rows = await conn.fetch(_SLOTS_SQL)
    return [
        SlotFacts(name=r["name"], active=r["active"], retained_bytes=r["retained"]) for r in rows
    ]


async def fetch_sync_standbys(conn: asyncpg.Connection) -> list[str]:
    """Standbys a primary currently counts for synchronous commit (``sync`` or ``quorum``)."""
    rows = await conn.fetch(
        "SELECT application_name FROM pg_stat_replication "
        "WHERE sync_state IN ('sync', 'quorum') ORDER BY 1"
    )
    return [str(r["application_name"]) for r in rows]


# --- disk -----------------------------------------------------------------------------------


def used_ratio(path: Path) -> float | None:
    """Fraction of the filesystem holding ``path`` that is used (None if it does not exist)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return usage.used / usage.total if usage.total else None


def storage_volumes(
    nodes: Iterable[PgNode], extra: dict[str, Path] | None = None
) -> dict[str, Path]:
    """Volumes to watch: each local node's data directory and WAL directory, plus ``extra``."""
    out: dict[str, Path] = {}
    for n in nodes:
        if n.data_dir is None:
            continue
        out[f"{n.name}:data"] = Path(n.data_dir)
        out[f"{n.name}:wal"] = Path(n.data_dir) / "pg_wal"
    out.update(extra or {})
    return out

