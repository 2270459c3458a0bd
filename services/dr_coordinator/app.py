"""dr-coordinator: keeps the topology record; failover, switchover and DR-site activation."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from emrdr.bus.runtime import HandlerContext, NotAvailableYet, Service, run_service
from emrdr.bus.topology import KV_TOPOLOGY
from emrdr.messages.events import ClusterObserved

NAME = "dr-coordinator"


async def not_built(command: Any, ctx: HandlerContext) -> None:
    where = "issue #4" if command.type == "RecoverCorruption" else "issue #5"
    raise NotAvailableYet(f"{command.type}: the DR runbooks land with {where}")


async def record_topology(event: ClusterObserved, ctx: HandlerContext) -> None:
    """Keep the last observed topology, and the primary when exactly one is writable."""
    nc = ctx.service.nc
    assert nc is not None
    kv = await nc.jetstream().key_value(KV_TOPOLOGY)
    nodes = {n.name: n.model_dump(mode="json") for n in event.nodes}
    await kv.put("nodes", json.dumps(nodes).encode())
    primaries = [n for n in event.nodes if n.reachable and n.role == "primary"]
    if len(primaries) == 1:
        p = primaries[0]
        await kv.put(
            "primary",
            json.dumps(
                {
                    "node": p.name,
                    "host": p.host,
                    "port": p.port,
                    "observed_at": datetime.now(UTC).isoformat(),
                }
            ).encode(),
        )


def build(service: Service) -> None:
    service.on_command("emrdr.cmd.dr.>", not_built)
    service.on_event(ClusterObserved.subject, record_topology, durable="dr-coordinator-topology-v1")


def main() -> int:
    return run_service(build, NAME)
