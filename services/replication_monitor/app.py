"""replication-monitor: polls every PostgreSQL node; publishes lag, archive and health changes;
hands its latest poll to the coordinators through the topology bucket; exports metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncpg
from nats.js.kv import KeyValue
from prometheus_client import Gauge

from emrdr.bus.runtime import HandlerContext, Service, run_service
from emrdr.bus.topology import KV_TOPOLOGY
from emrdr.config import PgNode
from emrdr.failover.observations import (
    ArchiveFacts,
    ObservationBatch,
    archive_lag_seconds,
    classify_archive_lag,
    fetch_archive,
    fetch_slots,
    fetch_sync_standbys,
    put_batch,
    storage_volumes,
    used_ratio,
)
from emrdr.messages.base import Message
from emrdr.messages.commands import ObserveCluster
from emrdr.messages.events import (
    ArchiveLagChanged,
    ClusterObserved,
    NodeHealthChanged,
    NodeObservation,
    ReplicationLagChanged,
    Severity,
)
from emrdr.monitor.thresholds import lag_transitions
from emrdr.pg.lsn import parse_lsn
from emrdr.pg.observe import observe_cluster

NAME = "replication-monitor"
PROBE_TIMEOUT_S = 1.0
log = logging.getLogger(__name__)


class Monitor:
    """Polls the cluster; keeps the previous severity and health per node to publish changes."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.severity: dict[str, Severity] = {}
        self.archive_severity: dict[str, Severity] = {}
        self.healthy: dict[str, bool] = {}
        self.shape: tuple[tuple[str, str, bool], ...] = ()
        self.seq = 0
        self.kv: KeyValue | None = None
        reg = service.registry
        self.g_lag_s = Gauge("emrdr_replication_lag_seconds", "Replay lag", ["node"], registry=reg)
        self.g_lag_b = Gauge("emrdr_replication_lag_bytes", "Lag in bytes", ["node"], registry=reg)
        self.g_up = Gauge(
            "emrdr_node_up", "1 when the node answers", ["node", "role"], registry=reg
        )
        self.g_primary = Gauge("emrdr_pg_is_primary", "1 for the primary", ["node"], registry=reg)
        self.g_lsn = Gauge("emrdr_pg_lsn_bytes", "Current/replayed LSN", ["node"], registry=reg)
        self.g_timeline = Gauge("emrdr_pg_timeline", "Timeline", ["node"], registry=reg)
        self.g_archive = Gauge(
            "emrdr_archive_lag_seconds", "Seconds WAL has waited to be archived (RPO exposure)",
            ["node"], registry=reg,
        )
        self.g_archive_pending = Gauge(
            "emrdr_archive_pending_segments", "WAL segments waiting for archive_command",
            ["node"], registry=reg,
        )
        self.g_archive_failed = Gauge(
            "emrdr_archive_failed_total", "archive_command failures (pg_stat_archiver)",
            ["node"], registry=reg,
        )
        self.g_slot = Gauge(
            "emrdr_replication_slot_retained_bytes", "WAL kept by a replication slot",
            ["node", "slot", "active"], registry=reg,
        )
        self.g_storage = Gauge(
            "emrdr_storage_used_ratio", "Used fraction of the filesystem", ["volume"],
            registry=reg,
        )
        self.g_poll = Gauge("emrdr_monitor_poll_seconds", "Duration of the last poll",
                            registry=reg)

    # --- observing ------------------------------------------------------------------------
    async def poll(self) -> list[NodeObservation]:
        s = self.service.settings
        return await observe_cluster(
            s.resolved_pg_nodes(), user=s.pg.user, password=s.pg.password,
            database="postgres", timeout=PROBE_TIMEOUT_S,
        )

    async def extras(
        self, observations: list[NodeObservation]
    ) -> tuple[dict[str, ArchiveFacts], list[str] | None]:
        """Archiver facts of every reachable node, slots (exported) and the primary's
        synchronous standbys (None when no primary answered)."""
        s = self.service.settings
        by_name = {n.name: n for n in s.resolved_pg_nodes()}
        archive: dict[str, ArchiveFacts] = {}
        sync: list[str] | None = None
        for o in observations:
            node = by_name.get(o.name)
            if not o.reachable or node is None:
                continue
            try:
                conn = await asyncpg.connect(
                    host=node.host, port=node.port, user=s.pg.user, password=s.pg.password,
                    database="postgres", timeout=PROBE_TIMEOUT_S,
                )
            except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                log.debug("extras of %s: %s", o.name, exc)
                continue
            try:
                async with asyncio.timeout(2 * PROBE_TIMEOUT_S):
                    archive[o.name] = await fetch_archive(conn, o.name)
                    if o.role == "primary":
                        for slot in await fetch_slots(conn):
                            self.g_slot.labels(o.name, slot.name, str(slot.active).lower()).set(
                                slot.retained_bytes or 0
                            )
                        sync = await fetch_sync_standbys(conn)
            except (TimeoutError, asyncpg.PostgresError) as exc:
                log.debug("extras of %s: %s", o.name, exc)
            finally:
                conn.terminate()
        return archive, sync

    def export(self, observations: list[NodeObservation]) -> None:
        for o in observations:
            for role in ("primary", "replica", "unknown"):
                self.g_up.labels(o.name, role).set(
                    1 if o.reachable and o.role == role else 0
                )
            self.g_primary.labels(o.name).set(1 if o.role == "primary" else 0)
            lsn = o.current_lsn or o.replay_lsn
            if lsn:
                self.g_lsn.labels(o.name).set(parse_lsn(lsn))
            if o.timeline:
                self.g_timeline.labels(o.name).set(o.timeline)
            if o.role == "replica":
                self.g_lag_s.labels(o.name).set(o.lag_seconds or 0)
                self.g_lag_b.labels(o.name).set(o.lag_bytes or 0)

    def export_storage(self, nodes: list[PgNode]) -> None:
        extra = {"spool": self.service.settings.spool_dir}
        for volume, path in storage_volumes(nodes, extra).items():
            ratio = used_ratio(path)
            if ratio is not None:
                self.g_storage.labels(volume).set(ratio)

    # --- publishing -----------------------------------------------------------------------
    async def changes(self, observations: list[NodeObservation], cause: Message | None) -> None:
        env = {"source": self.service.source, **(cause.caused() if cause else {})}
        t = self.service.settings.thresholds
        for tr in lag_transitions(self.severity, observations, t):
            self.severity[tr.node] = tr.severity
            obs = next(o for o in observations if o.name == tr.node)
            await self.service.publish(
                ReplicationLagChanged(
                    **env, node=tr.node, severity=tr.severity, previous=tr.previous,
                    lag_seconds=obs.lag_seconds, lag_bytes=obs.lag_bytes,
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
                        **env, node=o.name, healthy=o.reachable, role=o.role,
                        reason="answers again" if o.reachable else (o.error or "unreachable"),
                    )
                )

    async def archive_changes(self, archive: dict[str, ArchiveFacts]) -> None:
        t = self.service.settings.thresholds
        for name, facts in archive.items():
            self.g_archive.labels(name).set(archive_lag_seconds(facts))
            self.g_archive_pending.labels(name).set(facts.pending_segments)
            self.g_archive_failed.labels(name).set(facts.failed_count)
            severity = classify_archive_lag(facts, t)
            before = self.archive_severity.get(name, "ok")
            if severity == before:
                continue
            self.archive_severity[name] = severity
            await self.service.publish(
                ArchiveLagChanged(
                    source=self.service.source, node=name, severity=severity, previous=before,
                    pending_segments=facts.pending_segments,
                    last_archived=facts.last_archived_wal, last_failed=facts.last_failed_wal,
                )
            )

    async def hand_over(self, at: float, observations: list[NodeObservation],
                        sync: list[str] | None) -> None:
        """Put this poll where the coordinators read it (one key per monitor instance)."""
        if self.kv is None:
            assert self.service.nc is not None
            self.kv = await self.service.nc.jetstream().key_value(KV_TOPOLOGY)
        self.seq += 1
        batch = ObservationBatch(
            monitor=self.service.source, at=at, seq=self.seq, nodes=observations,
            sync_standbys=sync,
        )
        await put_batch(self.kv, batch)

    async def observe(self, command: ObserveCluster, ctx: HandlerContext) -> None:
        observations = await self.poll()
        self.export(observations)
        await self.changes(observations, command)
        primaries = [o.name for o in observations if o.reachable and o.role == "primary"]
        await ctx.publish(
            ClusterObserved(
                **ctx.envelope(), nodes=observations,
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
                source=self.service.source, nodes=observations,
                primary=primaries[0] if len(primaries) == 1 else None,
            )
        )

    async def once(self) -> list[NodeObservation]:
        """One poll: observe, hand over, export, publish changes."""
        at = time.time()
        started = time.monotonic()
        observations = await self.poll()
        archive, sync = await self.extras(observations)
        with contextlib.suppress(Exception):  # the bus may be down: keep polling and exporting
            await self.hand_over(at, observations, sync)
        self.g_poll.set(time.monotonic() - started)
        self.export(observations)
        self.export_storage(self.service.settings.resolved_pg_nodes())
        await self.changes(observations, None)
        await self.archive_changes(archive)
        await self.publish_if_topology_changed(observations)
        return observations

    async def loop(self) -> None:
        interval = self.service.settings.failover.poll_interval_s
        while True:
            started = time.monotonic()
            try:
                await self.once()
            except Exception:
                log.exception("poll failed")
            await asyncio.sleep(max(0.05, interval - (time.monotonic() - started)))


def build(service: Service) -> None:
    build_monitor(service)


def build_monitor(service: Service) -> Monitor:
    monitor = Monitor(service)
    service.on_command("emrdr.cmd.monitor.>", monitor.observe)
    service.spawn(monitor.loop, "poll")
    return monitor


def main() -> int:
    return run_service(build, NAME)
