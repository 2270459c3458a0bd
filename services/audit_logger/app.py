"""audit-logger: every command and event into the append-only, hash-chained AUDIT stream."""

from __future__ import annotations

from faststream.nats import NatsMessage

from emrdr.audit.log import AuditWriter
from emrdr.bus.runtime import HandlerContext, Service, run_service
from emrdr.bus.topology import EVENTS_SUBJECTS
from emrdr.messages.base import Message

NAME = "audit-logger"


async def build(service: Service) -> None:
    holder: dict[str, AuditWriter] = {}

    async def writer() -> AuditWriter:
        if "w" not in holder:
            assert service.nc is not None
            w = AuditWriter(service.nc.jetstream())
            await w.start()
            holder["w"] = w
        return holder["w"]

    async def record(message: Message, ctx: HandlerContext) -> None:
        await (await writer()).append_message(message)

    async def record_malformed(subject: str, raw: bytes, reason: str, msg: NatsMessage) -> None:
        await (await writer()).append_malformed(subject, raw, reason)

    service.on_event(
        EVENTS_SUBJECTS,
        record,
        durable="audit-logger-v1",
        deliver_new=False,
        raw_malformed=record_malformed,
    )


def main() -> int:
    return run_service(build, NAME)
