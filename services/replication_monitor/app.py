"""replication-monitor: polls every PostgreSQL node; publishes lag and health changes; metrics."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Gauge

from emrdr.bus.runtime import HandlerContext, Service, run_service
from emrdr.messages.base import Message
from emrdr.messages.commands import ObserveCluster
from emrdr.messages.events import (
    ClusterObserved,
    NodeHealthChanged,
    NodeObservation,
    ReplicationLagChanged,
)
from emrdr.monitor.thresholds import lag_transitions
from emrdr.pg.lsn import parse_lsn
from emrdr.pg.observe import observe_cluster

NAME = "replication-monitor"
POLL_SECONDS = 5.0
log = logging.getLogger(__name__)


class Monitor:
    """Polls the cluster; keeps the previous severity and health per node to publish changes."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.severity: dict[str, str] = {}
        self.healthy: dict[str, bool] = {}
        self.shape: tuple[tuple[str, str, bool], ...] = ()
        reg = service.registry
        self.g_lag_s = Gauge("emrdr_replication_lag_seconds", "Replay lag", ["node"], registry=reg)
        self.g_lag_b = Gauge("emrdr_replication_lag_bytes", "Lag in bytes", ["node"], registry=reg)
        self.g_up = Gauge(
            "emrdr_node_up", "1 when the node answers", ["node", "role"], registry=reg
        )
        self.g_primary = Gauge("emrdr_pg_is_primary", "1 for the primary", ["node"], registry=reg)
        self.g_lsn = Gauge("emrdr_pg_lsn_bytes", "Current/replayed LSN", ["node"], registry=reg)

    async def poll(self) -> list[NodeObservation]:
        s = self.service.settings
        return await observe_cluster(
            s.resolved_pg_nodes(),
            user=s.pg.user,
            password=s.pg.password,
            database="postgres",
            timeout=3.0,
        )

    def export(self, observations: list[NodeObservation]) -> None:
        for o in observations:
            self.g_up.labels(o.name, o.role).set(1 if o.reachable else 0)
            self.g_primary.labels(o.name).set(1 if o.role == "primary" else 0)
            lsn = o.current_lsn or o.replay_lsn
            if lsn:
                self.g_lsn.labels(o.name).set(parse_lsn(lsn))
            if o.role == "replica":
                self.g_lag_s.labels(o.name).set(o.lag_seconds or 0)
                self.g_lag_b.labels(o.name).set(o.lag_bytes or 0)

    async def changes(self, observations: list[NodeObservation], cause: Message | None) -> None:
        env = {"source": self.service.source, **(cause.caused() if cause else {})}
        t = self.service.settings.thresholds
        for tr in lag_transitions(self.severity, observations, t):  # type: ignore[arg-type]
            self.severity[tr.node] = tr.severity
            obs = next(o for o in observations if o.name == tr.node)
            await self.service.publish(
                ReplicationLagChanged(
                    **env,
                    node=tr.node,
                    severity=tr.severity,
                    previous=tr.previous,
                    lag_seconds=obs.lag_seconds,
                    lag_bytes=obs.lag_bytes,
                )
            )
        for o in observations:
            was = self.healthy.get(o.name)
            if was is None or was != o.reachable:
                self.healthy[o.name] = o.reachable
                if was is None and o.reachable:
                    continue
                await self.service.publish(
                    NodeHealthChanged(
                        **env,
                        node=o.name,
                        healthy=o.reachable,
                        role=o.role,
                        reason="answers again" if o.reachable else (o.error or "unreachable"),
                    )
                )

    async def observe(self, command: ObserveCluster, ctx: HandlerContext) -> None:
        observations = await self.poll()
        self.export(observations)
        await self.changes(observations, command)
        primaries = [o.name for o in observations if o.reachable and o.role == "primary"]
        await ctx.publish(
            ClusterObserved(
                **ctx.envelope(),
                nodes=observations,
                primary=primaries[0] if len(primaries) == 1 else None,
            )
        )

    async def publish_if_topology_changed(self, observations: list[NodeObservation]) -> None:
        """A role or reachability change is published as ClusterObserved (the dr-coordinator
        keeps the topology record from it)."""
        shape = tuple(sorted((o.name, o.role, o.reachable) for o in observations))
        if shape == self.shape:
            return
        self.shape = shape
        primaries = [o.name for o in observations if o.reachable and o.role == "primary"]
        await self.service.publish(
            ClusterObserved(
                source=self.service.source,
                nodes=observations,
                primary=primaries[0] if len(primaries) == 1 else None,
            )
        )

    async def loop(self) -> None:
        while True:
            try:
                observations = await self.poll()
                self.export(observations)
                await self.changes(observations, None)
                await self.publish_if_topology_changed(observations)
            except Exception:
                log.exception("poll failed")
            await asyncio.sleep(POLL_SECONDS)


def build(service: Service) -> None:
    monitor = Monitor(service)
    service.on_command("emrdr.cmd.monitor.>", monitor.observe)
    service.spawn(monitor.loop, "poll")


def main() -> int:
    return run_service(build, NAME)
