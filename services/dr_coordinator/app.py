"""dr-coordinator: keeps the topology record; failover, switchover and rejoin (lease holder only).

The logic is :class:`emrdr.failover.coordinator.Coordinator`; this module wires it to the bus.
"""

from __future__ import annotations

import re
from typing import Any

from emrdr.bus.runtime import HandlerContext, NotAvailableYet, Service, run_service
from emrdr.engine.jobs import corruption_job
from emrdr.failover.coordinator import Coordinator
from emrdr.messages.commands import ActivateDrSite, PromoteNode, RecoverCorruption, Switchover
from emrdr.messages.events import ClusterObserved, NodeHealthChanged

NAME = "dr-coordinator"


def build(service: Service) -> None:
    build_coordinator(service)


def build_coordinator(service: Service) -> Coordinator:
    """Register handlers and loops; returns the coordinator (tests inspect it)."""
    coordinator = Coordinator(service)
    instance = re.sub(r"[^A-Za-z0-9_-]", "_", service.instance)

    async def dr_command(command: Any, ctx: HandlerContext) -> None:
        if isinstance(command, PromoteNode):
            await coordinator.on_promote(command, ctx)
        elif isinstance(command, Switchover):
            await coordinator.on_switchover(command, ctx)
        elif isinstance(command, ActivateDrSite):
            await coordinator.on_activate_dr_site(command, ctx)
        elif isinstance(command, RecoverCorruption):
            await ctx.publish(
                await corruption_job(command, service.settings, ctx.envelope(), ctx.publish)
            )
        else:
            raise NotAvailableYet(f"{command.type} is not handled by the dr-coordinator")

    service.on_command("emrdr.cmd.dr.>", dr_command)
    service.on_event(
        ClusterObserved.subject, coordinator.record_observed, durable="dr-coordinator-topology-v1"
    )
    service.on_event(
        NodeHealthChanged.subject,
        coordinator.on_health_event,
        durable=f"dr-coordinator-health-{instance}",
    )

    async def run() -> None:
        await coordinator.setup()
        service.spawn(coordinator.lease_loop, "lease")
        try:
            await coordinator.loop()
        finally:
            await coordinator.close()

    service.spawn(run, "coordinate")
    return coordinator


def main() -> int:
    return run_service(build, NAME)
