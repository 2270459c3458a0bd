"""What the backup-worker does for each command: one function per command, no NATS inside.

Each job takes the command, a repository and a ``report`` callback for progress; it returns the
typed event to publish.  The service (``services/backup_worker``) only decodes, calls, publishes.
Failures become ``*Failed`` events naming what went wrong; nothing here raises past the job
except programming errors.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emrdr.config import PgNode, Settings
from emrdr.engine.repository import Repository, open_repository
from emrdr.messages.commands import (
    EnforceRetention,
    RecoverCorruption,
    RestoreTable,
    RotateKeys,
    SetLegalHold,
    StartBackup,
    StartRestore,
)
from emrdr.messages.events import (
    BackupCompleted,
    BackupFailed,
    BackupProgressed,
    BackupStarted,
    CorruptionRecovered,
    CorruptionRecoveryFailed,
    Event,
    KeyRotationFailed,
    KeysRotated,
    LegalHoldChanged,
    LegalHoldFailed,
    MaintenanceChanged,
    RecoveryStepCompleted,
    RestoreCompleted,
    RestoreFailed,
    RestoreProgressed,
    RestoreStarted,
    RetentionEnforced,
    RetentionFailed,
)
from emrdr.pg.observe import observe_cluster

log = logging.getLogger(__name__)

Publish = Callable[[Event], Any]


def failure(exc: BaseException) -> str:
    """How a failed job names its error in the *Failed event."""
    return f"{type(exc).__name__}: {exc}"


class JobError(RuntimeError):
    """A job cannot run; the message names why."""


class Throttle:
    """Thread-safe latest-value holder: engine threads report progress, one task publishes it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.done = 0
        self.total = 0
        self.changed = False

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            self.done, self.total, self.changed = done, total, True

    def take(self) -> tuple[int, int] | None:
        with self._lock:
            if not self.changed:
                return None
            self.changed = False
            return self.done, self.total


async def pump_progress(
    throttle: Throttle, make: Callable[[int, int], Event], publish: Publish, every: float = 1.0
) -> None:
    """Publish the latest progress at most once per ``every`` seconds until cancelled."""
    while True:
        await asyncio.sleep(every)
        latest = throttle.take()
        if latest is not None:
            await publish(make(*latest))


async def find_node(settings: Settings, name: str | None) -> PgNode:
    """The node to back up: the named one, else the live primary (observed now)."""
    nodes = settings.resolved_pg_nodes()
    if not nodes:
        raise JobError("no PostgreSQL nodes are configured (and no running stack)")
    observations = await observe_cluster(
        nodes, user=settings.pg.user, password=settings.pg.password, timeout=5.0
    )
    by_name = {o.name: o for o in observations}
    if name is not None:
        node = next((n for n in nodes if n.name == name), None)
        if node is None:
            raise JobError(f"no node named {name!r}; nodes are {', '.join(n.name for n in nodes)}")
        if not by_name[name].reachable:
            raise JobError(f"node {name} is not reachable: {by_name[name].error}")
        return node.model_copy(update={"role": by_name[name].role})
    primaries = [o for o in observations if o.reachable and o.role == "primary"]
    if len(primaries) != 1:
        raise JobError(
            f"expected one reachable primary, found {len(primaries)}: "
            + ", ".join(f"{o.name}={o.role if o.reachable else 'down'}" for o in observations)
        )
    node = next(n for n in nodes if n.name == primaries[0].name)
    return node.model_copy(update={"role": "primary"})


def repository(settings: Settings) -> Repository:
    return open_repository(settings, create=True)


async def backup_job(
    cmd: StartBackup, settings: Settings, envelope: dict[str, Any], publish: Publish
) -> Event:
    from emrdr.engine.backup import run_backup

    started = time.monotonic()
    try:
        node = await find_node(settings, cmd.source_node)
        repo = await asyncio.to_thread(repository, settings)
    except Exception as exc:
        return BackupFailed(**envelope, error=failure(exc))
    throttle = Throttle()
    backup_id = "pending"
    await publish(
        BackupStarted(
            **envelope,
            backup_id=backup_id,
            kind=cmd.kind,
            source_node=node.name,
            dry_run=cmd.dry_run,
        )
    )
    pump = asyncio.create_task(
        pump_progress(
            throttle,
            lambda d, t: BackupProgressed(
                **envelope, backup_id=backup_id, bytes_done=d, bytes_total=t
            ),
            publish,
        )
    )
    try:
        result = await run_backup(
            settings,
            repo,
            node,
            kind=cmd.kind,
            on_progress=throttle,
            dry_run=cmd.dry_run,
            retention_days=cmd.retention_days,
        )
    except Exception as exc:
        log.exception("backup failed")
        return BackupFailed(
            **envelope,
            error=f"{failure(exc)} (after {time.monotonic() - started:.1f}s)",
        )
    finally:
        pump.cancel()
    return BackupCompleted(
        **envelope,
        backup_id=result.backup_id,
        kind=result.kind,
        bytes_source=result.bytes_source,
        bytes_stored=result.bytes_stored,
        dedup_ratio=round(result.dedup_ratio, 3),
        duration_s=round(result.duration_s, 3),
        throughput_mb_s=round(result.throughput_mb_s, 1),
        start_lsn=result.start_lsn,
        stop_lsn=result.stop_lsn,
        timeline=result.timeline,
        degraded=result.degraded,
        verify_requested=cmd.verify,
        dry_run=cmd.dry_run,
    )


async def restore_job(
    cmd: StartRestore, settings: Settings, envelope: dict[str, Any], publish: Publish
) -> Event:
    """Restore into a directory (full, or PITR), start it and report the point reached."""
    from emrdr.engine.restore import restore_backup, restore_to_point

    if cmd.target_dir is None:
        return await database_copy_job(cmd, settings, envelope, publish)
    try:
        repo = await asyncio.to_thread(open_repository, settings)
    except Exception as exc:
        return RestoreFailed(**envelope, backup_id=cmd.backup_id, error=failure(exc))
    throttle = Throttle()
    label = cmd.backup_id or "chosen for the target"
    await publish(RestoreStarted(**envelope, backup_id=label, target=cmd.target_dir))
    pump = asyncio.create_task(
        pump_progress(
            throttle,
            lambda d, t: RestoreProgressed(
                **envelope, backup_id=label, bytes_done=d, bytes_total=t
            ),
            publish,
        )
    )
    try:
        target = _recovery_target(cmd)
        if target is not None:
            result = await asyncio.to_thread(
                restore_to_point,
                settings,
                repo,
                target,
                Path(cmd.target_dir),
                backup_id=cmd.backup_id,
                on_progress=throttle,
                start=True,
            )
        else:
            if cmd.backup_id is None:
                raise JobError("restore full needs a backup id")
            result = await asyncio.to_thread(
                restore_backup,
                settings,
                repo,
                cmd.backup_id,
                Path(cmd.target_dir),
                on_progress=throttle,
                start=True,
            )
    except Exception as exc:
        log.exception("restore failed")
        return RestoreFailed(**envelope, backup_id=cmd.backup_id, error=failure(exc))
    finally:
        pump.cancel()
    return RestoreCompleted(
        **envelope,
        backup_id=result.backup_id,
        target=f"{result.target_dir} (running on 127.0.0.1:{result.port})",
        bytes_restored=result.bytes_restored,
        duration_s=round(result.duration_s, 3),
        reached=result.reached,
        notes=result.notes,
    )


def step_publisher(
    procedure: str, envelope: dict[str, Any], publish: Publish
) -> Callable[[str, bool, str], None]:
    """An ``on_step`` callback for engine threads: publishes RecoveryStepCompleted and waits."""
    loop = asyncio.get_running_loop()

    def on_step(step: str, ok: bool, detail: str) -> None:
        event = RecoveryStepCompleted(
            **envelope,
            procedure=procedure,
            step=step,
            ok=ok,
            detail=detail[:2000],
        )
        asyncio.run_coroutine_threadsafe(publish(event), loop).result(timeout=30)

    return on_step


def _recovery_target(cmd: StartRestore) -> Any:
    from emrdr.engine.pitr import RecoveryTarget

    if cmd.mode != "pitr":
        return None
    return RecoveryTarget(
        time=cmd.target_time, lsn=cmd.target_lsn, xid=cmd.target_xid, name=cmd.target_name
    )


async def database_copy_job(
    cmd: StartRestore, settings: Settings, envelope: dict[str, Any], publish: Publish
) -> Event:
    """``restore full|pitr ... --target-db NAME``: restore into a sandbox, copy one database."""
    from emrdr.recovery.dbcopy import restore_database_copy

    if not cmd.target_db:
        return RestoreFailed(**envelope, backup_id=cmd.backup_id, error="no target given")
    await publish(
        RestoreStarted(
            **envelope,
            backup_id=cmd.backup_id or "chosen for the target",
            target=f"database {cmd.target_db}",
        )
    )
    try:
        repo = await asyncio.to_thread(open_repository, settings)
        result = await asyncio.to_thread(
            restore_database_copy,
            settings,
            repo,
            cmd.backup_id,
            _recovery_target(cmd),
            None,
            cmd.target_db,
            cmd.replace,
            step_publisher("database_copy", envelope, publish),
        )
    except Exception as exc:
        return RestoreFailed(**envelope, backup_id=cmd.backup_id, error=failure(exc))
    return RestoreCompleted(
        **envelope,
        backup_id=result.backup_id,
        target=f"database {result.new_db} on {result.primary} (copy of {result.source_db})",
        bytes_restored=0,
        duration_s=round(result.duration_s, 3),
        reached=result.reached,
    )


async def table_restore_job(
    cmd: RestoreTable, settings: Settings, envelope: dict[str, Any], publish: Publish
) -> Event:
    """``restore table SCHEMA.TABLE --time T --target-db NAME [--as NEW]``."""
    from emrdr.recovery.table import restore_table

    await publish(
        RestoreStarted(
            **envelope, backup_id="chosen for the target", target=f"{cmd.target_db}: {cmd.table}"
        )
    )
    try:
        repo = await asyncio.to_thread(open_repository, settings)
        result = await asyncio.to_thread(
            restore_table,
            settings,
            repo,
            cmd.table,
            cmd.target_time,
            cmd.target_db,
            cmd.as_name,
            step_publisher("table_restore", envelope, publish),
        )
    except Exception as exc:
        return RestoreFailed(**envelope, backup_id=None, error=failure(exc))
    dropped = (
        f"; foreign keys not copied: {', '.join(result.dropped_foreign_keys)}"
        if (result.dropped_foreign_keys)
        else ""
    )
    return RestoreCompleted(
        **envelope,
        backup_id=result.backup_id,
        target=f"{result.target_db}: {result.restored_as} ({result.rows} rows){dropped}",
        bytes_restored=0,
        duration_s=round(result.duration_s, 3),
        reached=result.reached,
    )


async def corruption_job(
    cmd: RecoverCorruption, settings: Settings, envelope: dict[str, Any], publish: Publish
) -> Event:
    """Seed scenario 3 as one command; every step published; stops at the first failure."""
    from emrdr.recovery.corruption import recover_corruption

    loop = asyncio.get_running_loop()

    def maintenance(active: bool, reason: str) -> None:
        event = MaintenanceChanged(**envelope, active=active, reason=reason)
        asyncio.run_coroutine_threadsafe(publish(event), loop).result(timeout=30)

    on_step = step_publisher("recover_corruption", envelope, publish)
    try:
        repo = await asyncio.to_thread(open_repository, settings)
        result = await asyncio.to_thread(
            lambda: recover_corruption(
                settings, repo, cmd.to_time, cmd.dry_run, on_step, maintenance=maintenance
            )
        )
    except Exception as exc:
        return CorruptionRecoveryFailed(
            **envelope, to_time=cmd.to_time, step="start", error=failure(exc)
        )
    if not result.ok:
        return CorruptionRecoveryFailed(
            **envelope,
            to_time=cmd.to_time,
            step=result.failed_step or "?",
            error=result.error or "failed",
        )
    return CorruptionRecovered(
        **envelope,
        to_time=cmd.to_time,
        dry_run=cmd.dry_run,
        backup_id=result.backup_id,
        reached=result.reached,
        plan=result.plan,
        damaged_data_dir=str(result.damaged_dir) if result.damaged_dir else None,
    )


async def retention_job(
    cmd: EnforceRetention, settings: Settings, envelope: dict[str, Any]
) -> Event:
    from emrdr.engine.retention import enforce_retention

    try:
        result = await asyncio.to_thread(enforce_retention, settings, None, cmd.dry_run)
    except Exception as exc:
        return RetentionFailed(**envelope, error=failure(exc))
    plan = result.plan
    return RetentionEnforced(
        **envelope,
        dry_run=cmd.dry_run,
        backups_removed=list(plan.remove_backups if cmd.dry_run else result.backups_removed),
        wal_segments_removed=len(plan.remove_wal) if cmd.dry_run else result.wal_removed,
        chunks_removed=result.chunks_removed,
        bytes_freed=result.bytes_freed,
        lines=result.lines(),
    )


async def hold_job(cmd: SetLegalHold, settings: Settings, envelope: dict[str, Any]) -> Event:
    """Place or lift a legal hold; the audit trail records who and why."""
    from emrdr.engine.retention import place_hold, release_hold

    def _apply() -> bool:
        repo = open_repository(settings)
        was = repo.is_held(cmd.backup_id)
        if cmd.held:
            place_hold(repo, cmd.backup_id, cmd.reason, cmd.issuer.actor)
        else:
            release_hold(repo, cmd.backup_id, cmd.issuer.actor, cmd.reason)
        return was != cmd.held

    try:
        changed = await asyncio.to_thread(_apply)
    except Exception as exc:
        return LegalHoldFailed(**envelope, backup_id=cmd.backup_id, error=failure(exc))
    return LegalHoldChanged(
        **envelope,
        backup_id=cmd.backup_id,
        held=cmd.held,
        reason=cmd.reason,
        actor=cmd.issuer.actor,
        changed=changed,
    )


async def rotate_job(cmd: RotateKeys, settings: Settings, envelope: dict[str, Any]) -> Event:
    def _rotate() -> tuple[str, int]:
        repo = open_repository(settings, create=True)
        key = repo.keyring.rotate()
        return key.id, len(repo.keyring.list_keys())

    try:
        key_id, count = await asyncio.to_thread(_rotate)
    except Exception as exc:
        return KeyRotationFailed(**envelope, error=failure(exc))
    return KeysRotated(**envelope, new_key_id=key_id, rewrapped=count)
