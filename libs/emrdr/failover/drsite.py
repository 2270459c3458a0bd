"""DR-site activation: a new primary at another location from the repository alone.

When the whole primary site is gone, :func:`activate_dr_site` builds a new primary from the
newest backup plus every archived WAL segment, one observable step at a time (each a
:class:`~emrdr.failover.execute.StepResult`):

1. ``upload-spool`` - WAL that PostgreSQL archived into the local spool but that was not yet
   uploaded goes to the repository first (when the spool is reachable from here).
2. ``restore`` - the newest backup is written into ``target_dir`` with every archived segment
   staged; recovery runs to the end of the archive on the newest timeline and promotes.
3. ``verify`` - the server answers, is out of recovery, takes a write; the backup's canary row
   is present and every EMR table holds at least the rows the backup counted.
4. ``record-epoch`` - the coordinator's fencing epoch is recorded on the new primary.

A failed step among 2-4 stops the activation (the caller pages). Data lost is what was
written after the last archived segment (bounded by ``archive_timeout``).

The topology record, ``PrimaryChanged`` and the staff notice are the dr-coordinator's
(:meth:`emrdr.failover.coordinator.Coordinator.on_activate_dr_site`).
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import asyncpg

from emrdr.config import Settings
from emrdr.engine.pitr import RecoveryTarget
from emrdr.engine.repository import Repository
from emrdr.engine.restore import RestoreResult, restore_backup
from emrdr.engine.wal import upload_spool
from emrdr.failover.execute import OnStep, StepResult
from emrdr.failover.fencing import FencingError, record_epoch
from emrdr.pg.emr_seed import read_canary, row_counts
from emrdr.pg.osuser import ensure_os_user, make_dir, run_as
from emrdr.repo.manifest import Manifest

__all__ = [
    "DrSiteError",
    "DrSiteResult",
    "activate_dr_site",
    "drop_recovery_target",
    "newest_backup",
    "shortfall",
]

PAST_THE_ARCHIVE = "FFFFFFFF/FFFFFFFF"
"""An LSN target no archive reaches: it makes the restore stage every archived segment; the
target itself is then removed so recovery ends at the end of the archive."""


class DrSiteError(RuntimeError):
    """The DR site cannot be activated; the message names what is missing."""


@dataclass(frozen=True)
class DrSiteResult:
    ok: bool
    node: str
    host: str
    port: int
    target_dir: Path
    steps: list[StepResult]
    backup_id: str | None = None
    wal_uploaded: int = 0
    wal_staged: int = 0
    reached_lsn: str | None = None
    timeline: int | None = None
    row_counts: dict[str, int] = field(default_factory=dict)
    canary_at: datetime | None = None
    duration_s: float = 0.0


# --- pure helpers ------------------------------------------------------------------------------


def newest_backup(manifests: list[Manifest]) -> Manifest:
    """The backup that stopped last (raises DrSiteError when there is none)."""
    if not manifests:
        raise DrSiteError("the repository holds no readable backup: nothing to activate from")
    return max(manifests, key=lambda m: (m.stopped_at, m.backup_id))


def drop_recovery_target(auto_conf: str) -> str:
    """``postgresql.auto.conf`` without ``recovery_target*`` settings except the timeline, so
    recovery replays every staged segment and promotes at the end of the archive."""
    kept = []
    for line in auto_conf.splitlines(keepends=True):
        name = line.split("=", 1)[0].strip()
        if name.startswith("recovery_target") and name != "recovery_target_timeline":
            continue
        kept.append(line)
    return "".join(kept)


def shortfall(expected: dict[str, int], found: dict[str, int]) -> list[str]:
    """Tables holding fewer rows than the backup counted (a sentence per table)."""
    return [
        f"{table}: {found.get(table, 0)} rows, the backup counted {n}"
        for table, n in sorted(expected.items())
        if found.get(table, 0) < n
    ]


# --- steps -------------------------------------------------------------------------------------


def _restore(
    settings: Settings, repo: Repository, manifest: Manifest, target_dir: Path, port: int,
    timeout: float,
) -> RestoreResult:
    """Restore ``manifest`` with every archived segment, then recover to the archive's end."""
    result = restore_backup(
        settings, repo, manifest.backup_id, target_dir, port=port, start=False,
        recovery=RecoveryTarget(lsn=PAST_THE_ARCHIVE), timeout=timeout,
        reason="DR-site activation: newest backup and every archived WAL segment",
    )
    auto = target_dir / "postgresql.auto.conf"
    auto.write_text(drop_recovery_target(auto.read_text()))
    user = ensure_os_user(settings.pg.os_user)
    log_dir = make_dir(target_dir / "log", user, 0o700)
    try:
        run_as(user, [str(settings.pg.bindir / "pg_ctl"), "start", "-D", str(target_dir),
                      "-l", str(log_dir / "dr-site.log"), "-w", "-t", str(int(timeout)), "-s"],
               timeout=timeout + 15)
    except Exception as exc:
        tail = _log_tail(log_dir / "dr-site.log")
        raise DrSiteError(
            f"the DR-site server in {target_dir} did not start: {exc}\n{tail}"
        ) from exc
    return result


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


async def _connect(settings: Settings, host: str, port: int, database: str,
                   timeout: float = 5.0) -> asyncpg.Connection:
    return await asyncpg.connect(host=host, port=port, user=settings.pg.user,
                                 password=settings.pg.password, database=database,
                                 timeout=timeout)


async def _wait_promoted(settings: Settings, host: str, port: int, timeout: float) -> str:
    """Wait until the server left recovery; returns its current WAL position."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            conn = await _connect(settings, host, port, "postgres", 3.0)
            try:
                if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                    return str(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
                last = "still in recovery"
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise DrSiteError(f"the DR-site server on port {port} did not finish recovery "
                              f"within {timeout:.0f}s ({last})")
        await asyncio.sleep(0.2)


async def _verify(
    settings: Settings, host: str, port: int, manifest: Manifest
) -> tuple[str, int, dict[str, int], datetime | None]:
    """Checks of the new primary; returns a sentence, its timeline, EMR counts, canary time."""
    conn = await _connect(settings, host, port, "postgres")
    try:
        if await conn.fetchval("SELECT pg_is_in_recovery()"):
            raise DrSiteError(f"the DR-site server on port {port} is still in recovery")
        await conn.execute("BEGIN READ WRITE")
        await conn.fetchval("SELECT pg_current_xact_id()")
        await conn.execute("COMMIT")
        timeline = int(await conn.fetchval(
            "SELECT timeline_id FROM pg_control_checkpoint()"))
        has_db = bool(await conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname = $1", settings.pg.database))
    finally:
        await conn.close()
    if not has_db:
        return (f"writable, timeline {timeline}; no {settings.pg.database} database to count",
                timeline, {}, None)
    conn = await _connect(settings, host, port, settings.pg.database)
    try:
        counts = await row_counts(conn)
        canary = await read_canary(conn, manifest.backup_id) if manifest.canary_written else None
    finally:
        await conn.close()
    short = shortfall(manifest.row_counts, counts)
    if short:
        raise DrSiteError("the DR-site database has fewer rows than the backup: "
                          + "; ".join(short))
    if manifest.canary_written and canary is None:
        raise DrSiteError(f"the canary row of backup {manifest.backup_id} is missing")
    canary_note = f"canary of {manifest.backup_id} present" if canary else "no canary recorded"
    return (f"writable, timeline {timeline}; {sum(counts.values())} EMR rows in "
            f"{len(counts)} tables (>= the backup's counts); {canary_note}",
            timeline, counts, canary)


async def activate_dr_site(
    settings: Settings,
    repo: Repository,
    target_dir: Path,
    port: int,
    on_step: OnStep | None = None,
    *,
    name: str = "dr-site",
    host: str = "127.0.0.1",
    epoch: int | None = None,
    actor: str = "dr-coordinator",
    timeout: float = 600.0,
) -> DrSiteResult:
    """Build a new primary ``name`` in ``target_dir`` on ``port`` from the repository."""
    started = time.perf_counter()
    target_dir = Path(target_dir).absolute()
    steps: list[StepResult] = []
    facts: dict[str, object] = {}

    async def step(step_name: str, ok: bool, detail: str, t: float) -> bool:
        result = StepResult(step_name, ok, detail, round(time.perf_counter() - t, 3))
        steps.append(result)
        if on_step is not None:
            out = on_step(result)
            if inspect.isawaitable(out):
                await out
        return ok

    def done(ok: bool) -> DrSiteResult:
        return DrSiteResult(
            ok=ok, node=name, host=host, port=port, target_dir=target_dir, steps=steps,
            duration_s=round(time.perf_counter() - started, 3), **facts,  # type: ignore[arg-type]
        )

    # 1. whatever PostgreSQL archived into the spool goes to the repository first
    t = time.perf_counter()
    try:
        uploaded = await asyncio.to_thread(upload_spool, settings, repo)
        facts["wal_uploaded"] = len(uploaded)
        await step("upload-spool", True, f"{len(uploaded)} spooled WAL file(s) uploaded", t)
    except Exception as exc:  # the spool may be on the lost site: go on with the repository
        await step("upload-spool", False, f"spooled WAL not uploaded ({type(exc).__name__}: "
                   f"{exc}); restoring from what the repository holds", t)

    # 2. newest backup + every archived segment, recovered to the end of the archive
    t = time.perf_counter()
    try:
        manifests = await asyncio.to_thread(_readable_manifests, repo)
        manifest = newest_backup(manifests)
        facts["backup_id"] = manifest.backup_id
        if target_dir.exists() and any(target_dir.iterdir()):
            raise DrSiteError(f"{target_dir} is not empty; choose an empty directory")
        restored = await asyncio.to_thread(
            _restore, settings, repo, manifest, target_dir, port, timeout)
        facts["wal_staged"] = restored.wal_staged
        lsn = await _wait_promoted(settings, host, port, timeout)
        facts["reached_lsn"] = lsn
        if restored.staging_dir is not None:
            shutil.rmtree(restored.staging_dir, ignore_errors=True)
        ok, detail = True, (f"backup {manifest.backup_id} + {restored.wal_staged} archived WAL "
                            f"file(s) recovered to the end of the archive; promoted at {lsn}, "
                            f"running on {host}:{port}")
    except Exception as exc:
        ok, detail = False, f"restore into {target_dir} failed: {type(exc).__name__}: {exc}"
    if not await step("restore", ok, detail, t):
        return done(False)

    # 3. verify
    t = time.perf_counter()
    try:
        detail, timeline, counts, canary = await _verify(settings, host, port, manifest)
        facts.update(timeline=timeline, row_counts=counts, canary_at=canary)
        ok = True
    except (DrSiteError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        ok, detail = False, f"verification of {name} failed: {exc}"
    if not await step("verify", ok, detail, t):
        return done(False)

    # 4. the fencing epoch on the new primary
    if epoch is not None:
        t = time.perf_counter()
        try:
            conn = await _connect(settings, host, port, "postgres")
            try:
                await record_epoch(conn, epoch, name, "activated as DR-site primary", actor)
            finally:
                await conn.close()
            ok, detail = True, f"{name} accepts writes; epoch {epoch} recorded"
        except (FencingError, OSError, asyncpg.PostgresError) as exc:
            ok, detail = False, str(exc)
        if not await step("record-epoch", ok, detail, t):
            return done(False)
    return done(True)


def _readable_manifests(repo: Repository) -> list[Manifest]:
    out: list[Manifest] = []
    for bid in repo.backup_ids():
        try:
            out.append(repo.read_manifest(bid))
        except Exception:  # an unreadable manifest is skipped; the newest readable one is used
            continue
    return out
