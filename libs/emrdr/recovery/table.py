"""Restore one table as of a point in time into a database of the live primary.

``emrdr restore table SCHEMA.TABLE --time T --target-db NAME [--as NEW_NAME]``:

1. ``check target``: names are plain identifiers; NAME exists on the primary; the table to
   create (``SCHEMA.NEW_NAME``, default ``SCHEMA.TABLE``) does not, unless ``replace``;
2. ``restore sandbox``: PITR to T into a temporary instance (always removed);
3. ``prepare copy``: in the sandbox (a throw-away copy) the table is renamed to NEW_NAME with its
   indexes and owned sequences (index names are per schema and would collide with the live
   table's), and its foreign keys are dropped: a restored copy for comparison must not be tied
   to, or cascade from, live rows.  The dropped constraints are reported by name;
4. ``dump``: ``pg_dump -Fc -t SCHEMA.NEW_NAME`` from the sandbox;
5. ``load``: one transaction on NAME: ``CREATE SCHEMA IF NOT EXISTS``, ``DROP TABLE`` of the old
   one when replacing, and the table with its data and indexes; a failure leaves NAME as it was;
6. ``verify``: the row count in NAME equals the sandbox's.

Typical use, after a bad ``UPDATE`` on prescriptions at 14:31::

    restore_table(settings, repo, "emr.prescriptions", at_14_30, "emr",
                  as_name="prescriptions_restored")
"""

from __future__ import annotations

import time as _clock
from dataclasses import dataclass, field
from datetime import datetime
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

__all__ = ["TableRestoreResult", "renamed_object", "restore_table", "split_table_name"]


@dataclass(frozen=True)
class TableRestoreResult:
    table: str
    restored_as: str
    target_db: str
    backup_id: str
    reached: str
    rows: int
    dropped_foreign_keys: list[str]
    duration_s: float
    steps: list[tuple[str, bool, str]] = field(default_factory=list)


def split_table_name(text: str) -> tuple[str, str]:
    """``schema.table`` -> (schema, table); ValueError names what is wrong."""
    schema, dot, table = text.partition(".")
    if not dot or not valid_identifier(schema) or not valid_identifier(table):
        raise ValueError(f"table {text!r} must be SCHEMA.TABLE with plain identifiers")
    return schema, table


def renamed_object(name: str, old_table: str, new_table: str) -> str:
    """The name of an index/sequence of ``old_table`` once the table is ``new_table``:
    the table-name prefix is replaced, else the new table name is prefixed (max 63)."""
    if name.startswith(old_table):
        return (new_table + name[len(old_table):])[:63]
    return f"{new_table}_{name}"[:63]


def _sql(settings: Settings, port: int, db: str, sql: str, host: str = "127.0.0.1") -> str:
    return pgcheck.psql(settings, port, sql, database=db, host=host)


def _prepare_copy(
    settings: Settings, port: int, db: str, schema: str, table: str, new: str
) -> tuple[int, list[str]]:
    """Rename the table (and its indexes and owned sequences) in the sandbox, drop its foreign
    keys; returns (rows, dropped foreign keys)."""
    qualified = f"{quote_ident(schema)}.{quote_ident(table)}"
    if _sql(settings, port, db, f"SELECT to_regclass('{schema}.{table}') IS NOT NULL") != "t":
        raise RecoveryError(f"table {schema}.{table} does not exist in {db} at that point in "
                            "time")
    rows = int(_sql(settings, port, db, f"SELECT count(*) FROM {qualified}"))
    fks = [ln for ln in _sql(
        settings, port, db, "SELECT conname FROM pg_constraint WHERE contype = 'f' AND "
        f"conrelid = '{schema}.{table}'::regclass ORDER BY 1").splitlines() if ln]
    statements = [f"ALTER TABLE {qualified} DROP CONSTRAINT {quote_ident(c)}" for c in fks]
    if new != table:
        indexes = [ln for ln in _sql(
            settings, port, db, "SELECT c.relname FROM pg_index i JOIN pg_class c ON "
            f"c.oid = i.indexrelid WHERE i.indrelid = '{schema}.{table}'::regclass"
        ).splitlines() if ln]
        sequences = [ln for ln in _sql(
            settings, port, db, "SELECT s.relname FROM pg_depend d JOIN pg_class s ON "
            "s.oid = d.objid WHERE s.relkind = 'S' AND d.deptype IN ('a', 'i') AND "
            f"d.refobjid = '{schema}.{table}'::regclass").splitlines() if ln]
        statements += [
            f"ALTER INDEX {quote_ident(schema)}.{quote_ident(i)} RENAME TO "
            f"{quote_ident(renamed_object(i, table, new))}" for i in indexes
        ] + [
            f"ALTER SEQUENCE {quote_ident(schema)}.{quote_ident(s)} RENAME TO "
            f"{quote_ident(renamed_object(s, table, new))}" for s in sequences
        ] + [f"ALTER TABLE {qualified} RENAME TO {quote_ident(new)}"]
    if statements:
        _sql(settings, port, db, "; ".join(statements))
    return rows, fks


def restore_table(
    settings: Settings,
    repo: Repository,
    table: str,
    time: datetime,
    target_db: str,
    as_name: str | None = None,
    on_step: StepCallback | None = None,
    *,
    replace: bool = False,
    source_db: str | None = None,
    backup_id: str | None = None,
    primary: PgNode | None = None,
    workers: int = 2,
    work_dir: Path | None = None,
    timeout: float = 3600.0,
) -> TableRestoreResult:
    """Restore ``table`` (SCHEMA.TABLE of ``source_db``, default ``settings.pg.database``) as
    it was at ``time`` into ``target_db`` on the primary, as ``as_name`` if given."""
    t0 = _clock.monotonic()
    step = StepRecorder(on_step)
    source = source_db or settings.pg.database
    try:
        schema, name = split_table_name(table)
        new = as_name or name
        if not valid_identifier(new) or not valid_identifier(target_db) or not (
                valid_identifier(source)):
            raise RecoveryError(f"not plain identifiers: {new!r}, {target_db!r}, {source!r}")
        if time.tzinfo is None:
            raise RecoveryError(f"time {time.isoformat()} has no time zone")
        node = find_primary(settings, primary)
        if not pgcheck.database_exists(settings, node.port, target_db, host=node.host):
            raise RecoveryError(f"database {target_db} does not exist on {node.name}")
        exists = _sql(settings, node.port, target_db,
                      f"SELECT to_regclass('{schema}.{new}') IS NOT NULL", node.host) == "t"
        if exists and not replace:
            raise RecoveryError(f"refused: table {schema}.{new} already exists in {target_db}; "
                                "choose another name (--as) or replace it (nothing was changed)")
    except (RecoveryError, pgcheck.PgCheckError, ValueError) as exc:
        raise step.fail("check target", exc) from exc
    step("check target", True, f"{schema}.{new} in {target_db} on {node.name}"
                               + (" (will be replaced)" if exists else " (new)"))

    with temp_instance(settings, "table", backup_id, work_dir) as inst:
        try:
            result = sandbox_restore(settings, repo, inst, backup_id,
                                     RecoveryTarget(time=time), workers, timeout)
        except Exception as exc:
            raise step.fail("restore sandbox", exc) from exc
        step("restore sandbox", True, f"backup {result.backup_id} recovered to "
                                      f"{time.isoformat()}: reached {result.reached}")
        try:
            rows, fks = _prepare_copy(settings, inst.port, source, schema, name, new)
        except Exception as exc:
            raise step.fail("prepare copy", exc) from exc
        step("prepare copy", True, f"{rows} rows" + (
            f"; foreign keys not copied: {', '.join(fks)}" if fks else ""))
        dump = inst.root / "table.pgdump"
        script = inst.root / "table.sql"
        try:
            run_client(settings, "pg_dump", [
                "-h", "127.0.0.1", "-p", str(inst.port), "-U", settings.pg.user, "-d", source,
                "-Fc", "-t", f"{quote_ident(schema)}.{quote_ident(new)}", "-f", str(dump)],
                f"dump of {schema}.{new}")
            stop_restored(settings, inst.data_dir)
            run_client(settings, "pg_restore", ["-f", str(script), str(dump)],
                       "rendering the dump as SQL")
        except Exception as exc:
            raise step.fail("dump", exc) from exc
        step("dump", True, f"{schema}.{new}: {dump.stat().st_size} bytes")
        prologue = f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)};\n"
        if exists:
            prologue += f"DROP TABLE {quote_ident(schema)}.{quote_ident(new)};\n"
        full = inst.root / "load.sql"
        full.write_text(prologue + script.read_text())
        try:
            run_client(settings, "psql", [
                "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction",
                "-h", node.host, "-p", str(node.port), "-U", settings.pg.user,
                "-d", target_db, "-f", str(full)], f"load into {target_db}")
        except Exception as exc:
            raise step.fail("load", exc) from exc
        step("load", True, f"{schema}.{new} created in {target_db} in one transaction")
    try:
        got = int(_sql(settings, node.port, target_db,
                       f"SELECT count(*) FROM {quote_ident(schema)}.{quote_ident(new)}",
                       node.host))
        if got != rows:
            raise RecoveryError(f"{schema}.{new} has {got} rows, the restored copy {rows}")
    except Exception as exc:
        raise step.fail("verify", exc) from exc
    step("verify", True, f"{schema}.{new}: {got} rows, equal to the point-in-time copy")
    return TableRestoreResult(f"{schema}.{name}", f"{schema}.{new}", target_db,
                              result.backup_id, result.reached, got, fks,
                              _clock.monotonic() - t0, step.steps)
