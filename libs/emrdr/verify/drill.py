"""Restore drill: prove that one backup restores into a working database, and measure it.

:func:`run_drill` restores the backup into a temporary instance (:mod:`emrdr.verify.sandbox`:
fresh temp directory, free port, always removed) and reports each check separately, in order:

1. ``manifest authenticates``: both sealed copies of the manifest open with the key;
2. ``WAL present and continuous``: every segment from the backup's start to its stop segment is
   in the repository (a gap is named by its first and last segment);
3. ``objects authenticate``: every chunk and WAL file read by the restore authenticates
   (AES-GCM with the object's identity, keyed-hash id re-checked);
4. ``files match manifest``: every restored file has the manifest's size and SHA-256 (the
   drill restores with ``verify_digests``: every chunk is re-hashed, unlike a plain restore);
5. ``recovery reaches consistency``: the server recovers to at least the backup's stop LSN,
   from the backup's timeline, and promotes;
6. ``pg_amcheck --heapallindexed`` on every database (server running);
7. ``canary row present``: the row the backup wrote just before it stopped;
8. ``EMR row counts plausible``: the backup counts rows just before ``pg_backup_stop`` and the
   drill recovers exactly to the stop point, so counts are equal on a quiet system; writes
   committed between count and stop may differ by a little (see
   :func:`emrdr.verify.pgcheck.counts_plausible`);
9. ``pg_checksums --check`` after a clean shutdown (run as the PostgreSQL OS user);
10. ``temporary instance removed``.

A check that makes the following ones meaningless (no manifest, WAL gap, restore failure)
ends the drill.  The result is stored as a sealed, immutable repository object
``verifications/<backup_id>/<when>.json`` (:func:`record_verification`), which ``emrdr backups
list`` shows and the corruption runbook uses to find the newest *verified* backup.

``restore_seconds`` is the measured RTO: from the first byte read until the restored server
accepts connections after recovery.  Library code: no NATS; the verifier service publishes.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from emrdr.config import Settings
from emrdr.engine.pitr import wal_gaps
from emrdr.engine.repository import Repository
from emrdr.engine.restore import ProgressCallback, RestoreError, restore_backup, stop_restored
from emrdr.messages.events import CheckResult
from emrdr.pg.lsn import parse_lsn
from emrdr.pg.osuser import OsUser, ensure_os_user
from emrdr.repo import IntegrityError, ObjectExists, ObjectNotFound, aad_for, open_sealed, seal
from emrdr.repo.manifest import Manifest, manifest_copy_key, manifest_key, verification_key
from emrdr.verify import pgcheck
from emrdr.verify.sandbox import TempInstance, checkpoint, cleanup_stale_drills, temp_instance

__all__ = [
    "CHECK_NAMES",
    "DrillError",
    "DrillReport",
    "canary_check",
    "classify_restore_error",
    "last_verification",
    "record_verification",
    "resolve_backup_id",
    "run_drill",
    "verification_records",
    "verified_backup_ids",
]

C_MANIFEST = "manifest authenticates"
C_WAL = "WAL present and continuous"
C_OBJECTS = "objects authenticate"
C_FILES = "files match manifest"
C_RECOVERY = "recovery reaches consistency"
C_AMCHECK = "pg_amcheck --heapallindexed"
C_CANARY = "canary row present"
C_COUNTS = "EMR row counts plausible"
C_CHECKSUMS = "pg_checksums --check"
C_CLEANUP = "temporary instance removed"
CHECK_NAMES = (C_MANIFEST, C_WAL, C_OBJECTS, C_FILES, C_RECOVERY, C_AMCHECK, C_CANARY,
               C_COUNTS, C_CHECKSUMS, C_CLEANUP)

CheckCallback = Callable[[CheckResult], None]
_BACKUP_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


class DrillError(RuntimeError):
    """The drill could not run at all (no backup, unknown id)."""


@dataclass
class DrillReport:
    """Every check of one drill, and the measured restore time."""

    backup_id: str
    started_at: datetime
    checks: list[CheckResult] = field(default_factory=list)
    restore_seconds: float = 0.0
    bytes_restored: int = 0
    total_seconds: float = 0.0
    reached: str = ""
    degraded: bool = False
    error: str | None = None
    record_key: str | None = None

    @property
    def throughput_mb_s(self) -> float:
        """Bytes restored per second of restore (MB = 10**6 bytes)."""
        if self.restore_seconds <= 0:
            return 0.0
        return self.bytes_restored / 1e6 / self.restore_seconds

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.passed for c in self.checks)

    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> str:
        """One line: what failed first, or the RTO."""
        if self.passed:
            return (f"backup {self.backup_id}: {len(self.checks)} checks passed; restored "
                    f"{self.bytes_restored / 1e6:.1f} MB in {self.restore_seconds:.1f} s")
        bad = self.failed()
        if bad:
            return f"backup {self.backup_id}: {bad[0].name} failed: {bad[0].detail}"
        return f"backup {self.backup_id}: {self.error or 'no checks ran'}"

    def to_record(self) -> dict[str, Any]:
        return {
            "backup_id": self.backup_id,
            "started_at": self.started_at.isoformat(),
            "passed": self.passed,
            "checks": [c.model_dump() for c in self.checks],
            "restore_seconds": round(self.restore_seconds, 3),
            "total_seconds": round(self.total_seconds, 3),
            "bytes_restored": self.bytes_restored,
            "throughput_mb_s": round(self.throughput_mb_s, 1),
            "reached": self.reached,
            "degraded": self.degraded,
            "error": self.error,
        }


# --- pure helpers ---------------------------------------------------------------------------


def resolve_backup_id(requested: str, backup_ids: list[str]) -> str:
    """``latest`` -> the newest complete backup; an id must exist."""
    if not backup_ids:
        raise DrillError("the repository has no complete backup to verify")
    if requested == "latest":
        return sorted(backup_ids)[-1]
    if requested not in backup_ids:
        raise DrillError(f"backup {requested} is not a complete backup in the repository")
    return requested


def classify_restore_error(message: str) -> str:
    """Which drill check a restore failure belongs to (objects, files or recovery)."""
    lowered = message.lower()
    if ("chunk " in lowered and ("missing" in lowered or "failed verification" in lowered)) or (
        "wal file" in lowered and ("missing" in lowered or "failed verification" in lowered)
    ):
        return C_OBJECTS
    if "sha-256" in lowered or re.search(r"restored \d+ bytes, the manifest says", lowered):
        return C_FILES
    return C_RECOVERY


def recovery_verdict(
    manifest: Manifest, reached_lsn: str | None, timeline: int | None, log: list[str]
) -> CheckResult:
    """Did recovery reach the backup's stop point on the expected timeline and promote?"""
    if reached_lsn is None or timeline is None:
        return CheckResult(name=C_RECOVERY, passed=False,
                           detail="the restored server did not report a replay position")
    if parse_lsn(reached_lsn) < parse_lsn(manifest.stop_lsn):
        return CheckResult(name=C_RECOVERY, passed=False,
                           detail=f"replay stopped at {reached_lsn}, before the backup's stop "
                                  f"LSN {manifest.stop_lsn}")
    if timeline <= manifest.timeline:
        return CheckResult(name=C_RECOVERY, passed=False,
                           detail=f"server is on timeline {timeline}, expected a new timeline "
                                  f"after the backup's {manifest.timeline}")
    consistent = any("consistent recovery state reached" in ln for ln in log)
    return CheckResult(
        name=C_RECOVERY, passed=True,
        detail=f"consistent at LSN {reached_lsn} (backup stop {manifest.stop_lsn}) replaying "
               f"timeline {manifest.timeline}, promoted to timeline {timeline}"
               + ("" if consistent else " (consistency line not found in the server log)"),
    )


# --- verification records -------------------------------------------------------------------


def record_verification(repo: Repository, report: DrillReport) -> str:
    """Store the report as a sealed immutable object; returns its key."""
    payload = json.dumps(report.to_record(), sort_keys=True).encode()
    when = report.started_at
    for _ in range(10):
        key = verification_key(report.backup_id, when)
        try:
            repo.storage.put(key, seal(repo.keyring.active, payload, aad_for("verification", key)))
            return key
        except ObjectExists:
            when += timedelta(seconds=1)
    raise DrillError(f"could not store the verification of {report.backup_id}: keys taken")


def _open_record(repo: Repository, key: str) -> dict[str, Any]:
    try:
        raw = open_sealed(repo.keyring, repo.storage.get(key), aad_for("verification", key))
        data: dict[str, Any] = json.loads(raw)
        data["key"] = key
        return data
    except (IntegrityError, ObjectNotFound, ValueError) as exc:
        return {"key": key, "passed": False, "error": f"verification record unreadable: {exc}"}


def verification_records(repo: Repository) -> dict[str, dict[str, Any]]:
    """The newest verification record of every backup that has one."""
    newest: dict[str, str] = {}
    for key in repo.storage.list("verifications/"):
        parts = key.split("/")
        if len(parts) == 3 and key.endswith(".json"):
            newest[parts[1]] = max(newest.get(parts[1], ""), key)
    return {bid: _open_record(repo, key) for bid, key in newest.items()}


def last_verification(repo: Repository, backup_id: str) -> dict[str, Any] | None:
    keys = sorted(k for k in repo.storage.list(f"verifications/{backup_id}/")
                  if k.endswith(".json"))
    return _open_record(repo, keys[-1]) if keys else None


def verified_backup_ids(repo: Repository) -> set[str]:
    """Backups whose most recent drill passed."""
    return {bid for bid, rec in verification_records(repo).items() if rec.get("passed") is True}


# --- the drill ------------------------------------------------------------------------------


def _manifest_check(repo: Repository, backup_id: str) -> tuple[Manifest | None, CheckResult]:
    problems: list[str] = []
    for key in (manifest_key(backup_id), manifest_copy_key(backup_id)):
        try:
            open_sealed(repo.keyring, repo.storage.get(key), aad_for("manifest", backup_id))
        except (IntegrityError, ObjectNotFound) as exc:
            problems.append(f"{key}: {exc}")
    try:
        manifest = repo.read_manifest(backup_id)
    except (IntegrityError, ObjectNotFound) as exc:
        return None, CheckResult(name=C_MANIFEST, passed=False, detail=str(exc))
    if problems:
        return manifest, CheckResult(
            name=C_MANIFEST, passed=False,
            detail="one copy is bad (the other was used): " + "; ".join(problems))
    return manifest, CheckResult(name=C_MANIFEST, passed=True,
                                 detail=f"both copies authenticate; {len(manifest.files)} files")


def _wal_check(repo: Repository, manifest: Manifest) -> CheckResult:
    names = repo.wal_names(manifest.timeline)
    gaps = wal_gaps(names, manifest.timeline, manifest.start_wal, manifest.stop_wal)
    if gaps:
        shown = ", ".join(a if a == b else f"{a} to {b}" for a, b in gaps)
        return CheckResult(name=C_WAL, passed=False,
                           detail=f"missing WAL segment(s) {shown} (backup needs "
                                  f"{manifest.start_wal} to {manifest.stop_wal})")
    return CheckResult(name=C_WAL, passed=True,
                       detail=f"{manifest.start_wal} to {manifest.stop_wal} present")


def _emr_database(settings: Settings, port: int) -> str:
    dbs = pgcheck.list_databases(settings, port)
    return settings.pg.database if settings.pg.database in dbs else "postgres"


def canary_check(settings: Settings, port: int, manifest: Manifest) -> CheckResult:
    if not manifest.canary_written:
        return CheckResult(name=C_CANARY, passed=False,
                           detail="the backup recorded no canary row, so recovery up to its end "
                                  "cannot be proven")
    if not _BACKUP_ID_RE.match(manifest.backup_id):
        return CheckResult(name=C_CANARY, passed=False, detail="unexpected backup id format")
    db = _emr_database(settings, port)
    try:
        written = pgcheck.psql(
            settings, port, "SELECT written_at FROM emrdr_meta.canary "
            f"WHERE backup_id = '{manifest.backup_id}'", database=db)
    except pgcheck.PgCheckError as exc:
        return CheckResult(name=C_CANARY, passed=False, detail=str(exc))
    if not written:
        return CheckResult(name=C_CANARY, passed=False,
                           detail=f"no canary row for {manifest.backup_id} in {db}.emrdr_meta")
    return CheckResult(name=C_CANARY, passed=True, detail=f"{db}: written at {written}")


def restored_row_counts(settings: Settings, port: int, tables: list[str]) -> dict[str, int]:
    db = _emr_database(settings, port)
    present = set(pgcheck.psql(
        settings, port, "SELECT relname FROM pg_class c JOIN pg_namespace n ON "
        "n.oid = c.relnamespace WHERE n.nspname = 'emr' AND c.relkind = 'r'", database=db,
    ).splitlines())
    out: dict[str, int] = {}
    for table in tables:
        if table in present and pgcheck.valid_identifier(table):
            out[table] = int(pgcheck.psql(settings, port, f"SELECT count(*) FROM emr.{table}",
                                          database=db))
    return out


def _counts_check(settings: Settings, port: int, manifest: Manifest) -> CheckResult:
    try:
        restored = restored_row_counts(settings, port, sorted(manifest.row_counts))
    except pgcheck.PgCheckError as exc:
        return CheckResult(name=C_COUNTS, passed=False, detail=str(exc))
    ok, detail = pgcheck.counts_plausible(manifest.row_counts, restored)
    return CheckResult(name=C_COUNTS, passed=ok, detail=detail)


def run_drill(
    settings: Settings,
    repo: Repository,
    backup_id: str = "latest",
    on_check: CheckCallback | None = None,
    *,
    workers: int = 2,
    work_dir: Path | None = None,
    timeout: float = 1800.0,
    record: bool = True,
    on_progress: ProgressCallback | None = None,
    os_user: OsUser | None = None,
    abort: threading.Event | None = None,
) -> DrillReport:
    """Restore ``backup_id`` (or ``latest``) into a temporary instance and check it.

    Raises :class:`DrillError` only when there is nothing to verify; every other problem is a
    failed check in the returned report.  With ``record`` the report is stored in the
    repository.  The temporary instance is always removed.  Setting ``abort`` (a stopping
    service) ends the drill at its next step with :class:`~emrdr.verify.sandbox.Interrupted`.
    """
    t0 = time.monotonic()
    user = os_user or ensure_os_user(settings.pg.os_user)
    cleanup_stale_drills(settings, user)
    bid = resolve_backup_id(backup_id, repo.backup_ids())
    report = DrillReport(backup_id=bid, started_at=datetime.now(UTC))

    def add(check: CheckResult) -> bool:
        report.checks.append(check)
        if on_check is not None:
            on_check(check)
        return check.passed

    try:
        _drill(settings, repo, bid, report, add, user, workers, work_dir, timeout, on_progress,
               abort)
    except Exception as exc:  # an unexpected failure is a failed drill, with its reason
        report.error = f"{type(exc).__name__}: {exc}"
    report.total_seconds = time.monotonic() - t0
    if record:
        try:
            report.record_key = record_verification(repo, report)
        except Exception as exc:
            add(CheckResult(name="result recorded", passed=False, detail=str(exc)))
    return report


def _drill(
    settings: Settings, repo: Repository, bid: str, report: DrillReport,
    add: Callable[[CheckResult], bool], user: OsUser, workers: int, work_dir: Path | None,
    timeout: float, on_progress: ProgressCallback | None, abort: threading.Event | None,
) -> None:
    manifest, check = _manifest_check(repo, bid)
    if not add(check) and manifest is None:
        return
    assert manifest is not None
    report.degraded = manifest.degraded
    if not add(_wal_check(repo, manifest)):
        return
    checkpoint(abort)
    with temp_instance(settings, "drill", bid, work_dir, user, abort) as inst:
        _in_sandbox(settings, repo, manifest, report, add, user, inst, workers, timeout,
                    on_progress, abort)
    gone = not inst.root.exists()
    add(CheckResult(name=C_CLEANUP, passed=gone,
                    detail=f"{inst.root} removed" if gone else f"{inst.root} remains"))


def _in_sandbox(
    settings: Settings, repo: Repository, manifest: Manifest, report: DrillReport,
    add: Callable[[CheckResult], bool], user: OsUser, inst: TempInstance, workers: int,
    timeout: float, on_progress: ProgressCallback | None, abort: threading.Event | None,
) -> None:
    bid = manifest.backup_id
    try:
        result = restore_backup(settings, repo, bid, inst.data_dir, workers=workers,
                                start=True, port=inst.port, os_user=user, timeout=timeout,
                                on_progress=on_progress, reason="restore drill",
                                verify_digests=True)
    except (RestoreError, IntegrityError, ObjectNotFound) as exc:
        which = classify_restore_error(str(exc))
        if which != C_OBJECTS:
            add(CheckResult(name=C_OBJECTS, passed=True,
                            detail="every chunk and WAL file read authenticated"))
        if which == C_RECOVERY:
            add(CheckResult(name=C_FILES, passed=True,
                            detail="every file's size and SHA-256 matched the manifest"))
        add(CheckResult(name=which, passed=False, detail=str(exc)[:2000]))
        return
    report.restore_seconds = result.duration_s
    report.bytes_restored = result.bytes_restored
    report.reached = result.reached
    chunks = sum(len(f.chunk_ids()) for f in manifest.files)
    add(CheckResult(name=C_OBJECTS, passed=True,
                    detail=f"{chunks} chunk reads and {result.wal_staged} WAL files "
                           "authenticated"))
    add(CheckResult(name=C_FILES, passed=True,
                    detail=f"{result.files} files, {result.bytes_restored} bytes: size and "
                           "SHA-256 equal to the manifest"))
    if not add(recovery_verdict(manifest, result.reached_lsn, result.timeline,
                                result.recovery_log)):
        return
    checkpoint(abort)
    relations = pgcheck.relation_map(settings, inst.port)
    add(pgcheck.amcheck_check(settings, inst.port, name=C_AMCHECK, relations=relations))
    checkpoint(abort)
    add(canary_check(settings, inst.port, manifest))
    add(_counts_check(settings, inst.port, manifest))
    stop_restored(settings, inst.data_dir, user, mode="fast")
    checkpoint(abort)
    add(pgcheck.checksums_check(settings, inst.data_dir, user, relations))
