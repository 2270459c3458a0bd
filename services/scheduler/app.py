"""scheduler: fires backup, verification, retention and key-rotation commands on cron slots.

Also answers ``BulkImportCompleted`` from the EMR application with a full backup.
"""

from __future__ import annotations

import asyncio

from emrdr.bus.runtime import HandlerContext, Service, run_service
from emrdr.bus.topology import KV_SCHEDULER
from emrdr.messages.commands import StartBackup
from emrdr.messages.events import BulkImportCompleted
from emrdr.schedule.runner import Scheduler
from emrdr.security import load_identity

NAME = "scheduler"


def build(service: Service) -> None:
    identity = load_identity(service.settings.keys_dir, NAME, "system")

    async def run_schedules() -> None:
        assert service.nc is not None
        js = service.nc.jetstream()
        kv = await js.key_value(KV_SCHEDULER)
        scheduler = Scheduler(
            js,
            kv,
            service.settings.scheduler,
            sign=identity.sign,
            issuer=identity.issuer,
            instance=service.source,
        )
        await scheduler.run(asyncio.Event())

    async def backup_after_import(event: BulkImportCompleted, ctx: HandlerContext) -> None:
        command = identity.sign(
            StartBackup(
                issuer=identity.issuer, kind="full", schedule="bulk-import", **event.caused()
            )
        )
        await service.publish(command, msg_id=f"bulk-import:{event.event_id}")

    service.spawn(run_schedules, "schedules")
    service.on_event(
        BulkImportCompleted.subject, backup_after_import, durable="scheduler-bulk-import-v1"
    )


def main() -> int:
    return run_service(build, NAME)
