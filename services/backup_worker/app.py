"""backup-worker: executes backup, restore, retention and key commands; owns the repository.

Also uploads the WAL spool (filled by ``archive_command``) to the repository every second and
publishes ``WalArchived`` — through the outbox when NATS is down, so archiving never waits on
the bus.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import Counter, Gauge

from emrdr.bus.runtime import HandlerContext, Service, run_service
from emrdr.engine import jobs
from emrdr.messages.commands import (
    EnforceRetention,
    RestoreTable,
    RotateKeys,
    SetLegalHold,
    StartBackup,
    StartRestore,
)
from emrdr.messages.events import BackupFailed, Event, WalArchived, WalArchiveFailed
from emrdr.monitor.repo_gauges import RepositoryGauges

NAME = "backup-worker"
log = logging.getLogger(__name__)


def build(service: Service) -> None:
    settings = service.settings
    reg = service.registry
    failures = Gauge(
        "emrdr_backup_consecutive_failures", "Failed backups in a row", ["type"], registry=reg
    )
    archived = Counter("emrdr_wal_archived_total", "WAL files uploaded", registry=reg)
    spool_depth = Gauge("emrdr_wal_spool_files", "WAL files waiting in the spool", registry=reg)
    repo_gauges = RepositoryGauges(settings, registry=reg)

    async def publish(event: Event) -> None:
        await service.publish(event)

    async def backup(cmd: StartBackup, ctx: HandlerContext) -> None:
        event = await jobs.backup_job(cmd, settings, ctx.envelope(), publish)
        if not cmd.dry_run:
            counter = failures.labels(cmd.kind)
            counter.inc() if isinstance(event, BackupFailed) else counter.set(0)
            repo_gauges.poke()
        await ctx.publish(event)

    async def restore(cmd: StartRestore, ctx: HandlerContext) -> None:
        await ctx.publish(await jobs.restore_job(cmd, settings, ctx.envelope(), publish))

    async def restore_table(cmd: RestoreTable, ctx: HandlerContext) -> None:
        await ctx.publish(await jobs.table_restore_job(cmd, settings, ctx.envelope(), publish))

    async def retention(cmd: EnforceRetention | SetLegalHold, ctx: HandlerContext) -> None:
        if isinstance(cmd, SetLegalHold):
            await ctx.publish(await jobs.hold_job(cmd, settings, ctx.envelope()))
        else:
            await ctx.publish(await jobs.retention_job(cmd, settings, ctx.envelope()))
            repo_gauges.poke()

    async def rotate(cmd: RotateKeys, ctx: HandlerContext) -> None:
        await ctx.publish(await jobs.rotate_job(cmd, settings, ctx.envelope()))

    async def restore_area(cmd: Any, ctx: HandlerContext) -> None:
        handler = restore_table if isinstance(cmd, RestoreTable) else restore
        await handler(cmd, ctx)

    async def upload_wal_forever() -> None:
        from emrdr.engine.wal import WalConflict, spool_dir, spool_names, upload_spool

        repo = None
        while True:
            events: list[Event] = []
            if repo is None:
                try:
                    repo = await asyncio.to_thread(jobs.repository, settings)
                except Exception as exc:
                    log.warning("repository not available for WAL upload: %s", exc)
                    await asyncio.sleep(5.0)
                    continue
            try:
                uploaded = await asyncio.to_thread(upload_spool, settings, repo)
            except WalConflict as exc:
                uploaded = exc.uploaded
                events += [
                    WalArchiveFailed(source=service.source, segment=name, error=str(exc))
                    for name in exc.segments
                ]
            except Exception as exc:
                log.warning("WAL upload failed: %s", exc)
                uploaded = []
            for seg in uploaded:
                archived.inc()
                events.append(
                    WalArchived(
                        source=service.source,
                        segment=seg.segment,
                        bytes_source=seg.bytes_source,
                        bytes_stored=seg.bytes_stored,
                        latency_ms=round(seg.latency_s * 1000, 1),
                    )
                )
            for event in events:
                await service.publish(event)
            spool_depth.set(len(spool_names(spool_dir(settings))))
            await asyncio.sleep(1.0)

    service.on_command("emrdr.cmd.backup.>", backup)
    service.on_command("emrdr.cmd.restore.>", restore_area)
    service.on_command("emrdr.cmd.retention.>", retention)
    service.on_command("emrdr.cmd.keys.>", rotate)
    service.spawn(upload_wal_forever, "wal-upload")
    service.spawn(repo_gauges.run, "repo-gauges")


def main() -> int:
    return run_service(build, NAME)
