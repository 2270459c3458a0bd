"""Restore one database of a backup under another name on the live primary.

``emrdr restore full BACKUP --target-db NAME`` (and ``restore pitr ... --target-db NAME``):

1. ``check target``: NAME is a plain identifier, not a system database; on the live primary it
   must not exist unless ``replace``;
2. ``restore sandbox``: the backup (or the point in time) into a temporary instance
   (:mod:`emrdr.verify.sandbox`, always removed);
3. ``dump``: ``pg_dump -Fc`` of the source database (default ``settings.pg.database``) from the
   sandbox, with its EMR row counts;
4. ``load``: a new database ``<NAME>_emrdr_loading`` is created on the primary and loaded with
   ``pg_restore --exit-on-error``; only when that succeeded is an existing NAME dropped
   (``replace``) and the loaded one renamed to NAME, so a failed load never costs the old one;
5. ``verify``: EMR row counts of NAME equal the sandbox's.

No other database of the live cluster is touched.  ``on_step(name, ok, detail)`` reports each
step; a failed step raises :class:`~emrdr.recovery.live.RecoveryError` after reporting it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from emrdr.config import PgNode, Settings
from emrdr.engine.pitr import RecoveryTarget
from emrdr.engine.repository import Repository
from emrdr.engine.restore import stop_restored
from emrdr.recovery.live import (
    RecoveryError,
    StepRecorder,
    find_primary,
    run_client,
    sandbox_restore,
)
from emrdr.verify import pgcheck
from emrdr.verify.pgcheck import StepCallback, quote_ident, valid_identifier
from emrdr.verify.sandbox import temp_instance

__all__ = ["SYSTEM_DATABASES", "DbCopyResult", "check_new_db_name", "restore_database_copy"]

SYSTEM_DATABASES = frozenset({"postgres", "template0", "template1"})
EMR_TABLES_SQL = ("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = "
                  "c.relnamespace WHERE n.nspname = 'emr' AND c.relkind = 'r' ORDER BY 1")


@dataclass(frozen=True)
class DbCopyResult:
    backup_id: str
    source_db: str
    new_db: str
    primary: str
    reached: str
    replaced: bool
    row_counts: dict[str, int]
    duration_s: float
    steps: list[tuple[str, bool, str]] = field(default_factory=list)


def check_new_db_name(name: str, exists: bool, replace: bool) -> tuple[str, str]:
    """("create" | "replace" | "refuse", reason) for the target database name."""
    if not valid_identifier(name):
        return "refuse", f"{name!r} is not a plain database name (letters, digits, _; max 63)"
    if name in SYSTEM_DATABASES:
        return "refuse", f"{name} is a system database"
    if len(name) > 63 - len("_emrdr_loading"):
        return "refuse", f"{name!r} is too long (at most {63 - len('_emrdr_loading')} characters)"
    if exists and not replace:
        return "refuse", f"database {name} already exists on the primary: pass replace to drop it"
    if exists:
        return "replace", f"database {name} exists and will be replaced after a complete load"
    return "create", f"database {name} does not exist yet"


def _emr_counts(settings: Settings, port: int, host: str, db: str) -> dict[str, int]:
    tables = pgcheck.psql(settings, port, EMR_TABLES_SQL, database=db, host=host).splitlines()
    return {t: int(pgcheck.psql(settings, port, f"SELECT count(*) FROM emr.{quote_ident(t)}",
                                database=db, host=host))
            for t in tables if t}


def restore_database_copy(
    settings: Settings,
    repo: Repository,
    backup_id: str | None,
    target: RecoveryTarget | None,
    source_db: str | None,
    new_db: str,
    replace: bool = False,
    on_step: StepCallback | None = None,
    *,
    primary: PgNode | None = None,
    workers: int = 2,
    work_dir: Path | None = None,
    timeout: float = 3600.0,
) -> DbCopyResult:
    """Copy ``source_db`` as of ``backup_id`` / ``target`` into ``new_db`` on the primary."""
    t0 = time.monotonic()
    step = StepRecorder(on_step)
    source = source_db or settings.pg.database
    try:
        if not valid_identifier(source):
            raise RecoveryError(f"{source!r} is not a plain database name")
        node = find_primary(settings, primary)
        exists = pgcheck.database_exists(settings, node.port, new_db, host=node.host) if (
            valid_identifier(new_db)) else False
        action, reason = check_new_db_name(new_db, exists, replace)
        if action == "refuse":
            raise RecoveryError(f"refused: {reason} (nothing was changed)")
    except (RecoveryError, pgcheck.PgCheckError, ValueError) as exc:
        raise step.fail("check target", exc) from exc
    step("check target", True, f"{reason}; primary {node.name} ({node.host}:{node.port})")

    with temp_instance(settings, "dbcopy", backup_id, work_dir) as inst:
        try:
            result = sandbox_restore(settings, repo, inst, backup_id, target, workers, timeout)
        except Exception as exc:
            raise step.fail("restore sandbox", exc) from exc
        step("restore sandbox", True, f"backup {result.backup_id} restored, reached "
                                      f"{result.reached}")
        dump = inst.root / f"{source}.pgdump"
        try:
            if source not in pgcheck.list_databases(settings, inst.port):
                raise RecoveryError(f"database {source} is not in backup {result.backup_id}")
            counts = _emr_counts(settings, inst.port, "127.0.0.1", source)
            run_client(settings, "pg_dump", ["-h", "127.0.0.1", "-p", str(inst.port), "-U",
                                             settings.pg.user, "-d", source, "-Fc", "-f",
                                             str(dump)], f"dump of {source}")
            stop_restored(settings, inst.data_dir)
        except Exception as exc:
            raise step.fail("dump", exc) from exc
        step("dump", True, f"{source}: {dump.stat().st_size} bytes (pg_dump -Fc)")

        loading = f"{new_db}_emrdr_loading"
        conn = ["-h", node.host, "-p", str(node.port), "-U", settings.pg.user]
        try:
            pgcheck.psql(settings, node.port, f"DROP DATABASE IF EXISTS {quote_ident(loading)}",
                         host=node.host)
            pgcheck.psql(settings, node.port,
                         f"CREATE DATABASE {quote_ident(loading)} TEMPLATE template0",
                         host=node.host)
            try:
                run_client(settings, "pg_restore", [*conn, "-d", loading, "--exit-on-error",
                                                    "-j", str(max(1, workers)), str(dump)],
                           f"load into {loading}")
            except RecoveryError:
                pgcheck.psql(settings, node.port, f"DROP DATABASE IF EXISTS "
                             f"{quote_ident(loading)} WITH (FORCE)", host=node.host)
                raise
            if exists:
                pgcheck.psql(settings, node.port,
                             f"DROP DATABASE {quote_ident(new_db)} WITH (FORCE)", host=node.host)
            pgcheck.psql(settings, node.port, f"ALTER DATABASE {quote_ident(loading)} RENAME "
                         f"TO {quote_ident(new_db)}", host=node.host)
        except Exception as exc:
            raise step.fail("load", exc) from exc
        step("load", True, f"{source} loaded into {new_db} on {node.name}"
                           + (" (previous one dropped)" if exists else ""))
    try:
        got = _emr_counts(settings, node.port, node.host, new_db)
        if got != counts:
            raise RecoveryError(f"row counts of {new_db} {got} differ from the restored "
                                f"{source} {counts}")
    except Exception as exc:
        raise step.fail("verify", exc) from exc
    step("verify", True, f"{new_db}: EMR row counts equal the restored copy's "
                         f"({sum(got.values())} rows)" if got else f"{new_db}: no emr tables")
    return DbCopyResult(result.backup_id, source, new_db, node.name, result.reached, exists,
                        got, time.monotonic() - t0, step.steps)

