"""The dr-coordinator's loop, Patroni-like: observe, decide, act (only while holding the lease).

Each cycle (every ``failover.poll_interval_s``):

1. read every replication-monitor's latest batch from the topology bucket into the health
   history (alerts from Alertmanager and ``NodeHealthChanged`` events are added as they come);
2. as lease holder: rejoin a former primary that is reachable again; record a primary when none
   is recorded; keep ``synchronous_standby_names`` in sync mode;
3. :func:`~emrdr.failover.decide.decide` on a snapshot, then FAILOVER (execute with the lease's
   epoch, every step an event), PAGE (notify staff and publish ``FailoverPaged``, once per
   situation) or nothing.

Manual promotion and switchover (commands) take the same lock as the loop, so only one action
runs at a time. The current primary is kept in the ``primary`` key of the topology bucket and in
``$EMRDR_HOME/run/primary.json`` (atomically replaced) for applications.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from emrdr.bus.topology import KV_TOPOLOGY
from emrdr.config import PgNode, Settings
from emrdr.failover.alert_http import AlertEndpoint
from emrdr.failover.decide import Action, Decision, Snapshot, decide
from emrdr.failover.execute import FailoverAborted, StepResult, execute_failover
from emrdr.failover.fencing import FencingError, connect_target
from emrdr.failover.judge import (
    AlertmanagerWebhook,
    HealthHistory,
    alert_signals,
    signal_from_health_event,
)
from emrdr.failover.lease import Lease, LeaseError, StaleLeaseError
from emrdr.failover.nodes import instances_for
from emrdr.failover.observations import read_batches
from emrdr.failover.rejoin import rejoin_as_replica
from emrdr.failover.switchover import execute_switchover
from emrdr.messages.base import Message
from emrdr.messages.commands import ActivateDrSite, PromoteNode, StartBackup, Switchover
from emrdr.messages.events import (
    ClusterObserved,
    FailoverCompleted,
    FailoverFailed,
    FailoverPaged,
    FailoverStepCompleted,
    NodeHealthChanged,
    NodeRejoined,
    NodeRejoinFailed,
    PrimaryChanged,
    StaffNotified,
)
from emrdr.notify import Notice, notifiers_from, notify_all
from emrdr.pg.instance import PgError, PgInstance

if TYPE_CHECKING:
    from emrdr.bus.runtime import HandlerContext, Service

__all__ = [
    "Coordinator",
    "NotLeaseHolder",
    "primary_record",
    "sync_standby_names",
    "write_connection_file",
]

log = logging.getLogger(__name__)


class NotLeaseHolder(RuntimeError):
    """This coordinator does not hold the lease (the command is redelivered to another)."""


def sync_standby_names(replicas: Sequence[str]) -> str:
    """``ANY 1 ("a", "b")``: a commit waits for any one of the replicas (empty: none)."""
    if not replicas:
        return ""
    names = ", ".join('"' + r.replace('"', '""') + '"' for r in sorted(replicas))
    return f"ANY 1 ({names})"


def primary_record(
    node: str, host: str, port: int, *, epoch: int | None, previous: str | None,
    by: str, database: str = "postgres",
) -> dict[str, Any]:
    """The one format of the current primary (topology key ``primary`` and ``primary.json``)."""
    return {
        "node": node,
        "host": host,
        "port": port,
        "epoch": epoch,
        "previous": previous,
        "dsn": f"postgresql://{host}:{port}/{database}",
        "since": datetime.now(UTC).isoformat(),
        "by": by,
    }


def write_connection_file(path: Path, record: Mapping[str, Any]) -> None:
    """Atomically replace ``path`` with ``record`` as JSON (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(record), indent=2) + "\n")
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _page_key(reason: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "#", reason)


class Coordinator:
    """One dr-coordinator instance's state and actions."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings: Settings = service.settings
        self.fs = self.settings.failover
        self.cs = self.settings.coordinator
        self.history = HealthHistory()
        self.seen: dict[str, float] = {}
        self.sync_standbys: frozenset[str] = frozenset()
        self.acting = asyncio.Lock()
        self.in_progress: str | None = None
        self.pending_rejoin: set[str] = set()
        self.paged: str | None = None
        self.last: Decision | None = None
        self.lease: Lease | None = None
        self.topology: KeyValue | None = None
        self.endpoint: AlertEndpoint | None = None
        self.stop_event = asyncio.Event()
        self.notifiers = notifiers_from(self.settings.notify)
        self.step_hook: Callable[[StepResult], Awaitable[None]] | None = None
        """Test hook: awaited after each step's event is published (to pause between steps)."""

    # --- nodes ------------------------------------------------------------------------------
    def node_configs(self) -> list[PgNode]:
        return self.settings.resolved_pg_nodes()

    def instances(self) -> dict[str, PgInstance]:
        return instances_for(self.node_configs(), self.settings)

    @property
    def connection_file(self) -> Path:
        return self.settings.run_dir / "primary.json"

    # --- setup ------------------------------------------------------------------------------
    async def setup(self) -> None:
        nc = self.service.nc
        assert nc is not None, "start the service before the coordinator"
        js = nc.jetstream()
        self.topology = await js.key_value(KV_TOPOLOGY)
        leases = await js.key_value(self.cs.lease_bucket)
        self.lease = Lease(
            leases, self.service.source, key=self.cs.lease_key, ttl=self.fs.lease_ttl_s
        )
        with contextlib.suppress(KeyNotFoundError):
            entry = await self.topology.get("rejoin")
            if entry.value:
                self.pending_rejoin = set(json.loads(entry.value))
        if self.cs.alertmanager_port is not None:
            self.endpoint = await AlertEndpoint(
                self.on_alertmanager, host=self.cs.alertmanager_host,
                port=self.cs.alertmanager_port, token=self.cs.alertmanager_token,
            ).start()
            key = "alertmanager." + re.sub(r"[^A-Za-z0-9_=-]", "_", self.service.instance)
            await self.topology.put(key, json.dumps({"url": self.endpoint.url}).encode())
            log.info("Alertmanager webhook on %s", self.endpoint.url)

    async def close(self) -> None:
        self.stop_event.set()
        if self.endpoint is not None:
            await self.endpoint.stop()

    # --- loops ------------------------------------------------------------------------------
    async def lease_loop(self) -> None:
        assert self.lease is not None
        await self.lease.run(self.stop_event, on_change=lambda held, why: log.info("%s", why))

    async def loop(self) -> None:
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                await self.cycle()
            except Exception:
                log.exception("coordinator cycle failed")
            delay = self.fs.poll_interval_s - (time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), max(0.05, delay))

    # --- inputs -----------------------------------------------------------------------------
    async def ingest(self) -> int:
        """Add monitor batches not seen yet; returns how many."""
        assert self.topology is not None
        added = 0
        for batch in await read_batches(self.topology):
            if self.seen.get(batch.monitor, -1.0) >= batch.at:
                continue
            self.seen[batch.monitor] = batch.at
            self.history = self.history.observed(batch.at, batch.monitor, batch.nodes)
            if batch.sync_standbys is not None:
                self.sync_standbys = frozenset(batch.sync_standbys)
            added += 1
        return added

    async def on_alertmanager(self, payload: AlertmanagerWebhook) -> int:
        signals = alert_signals(payload, time.time(), self.node_configs())
        self.history = self.history.alerted(*signals)
        return len(signals)

    async def on_health_event(self, event: NodeHealthChanged, ctx: HandlerContext) -> None:
        self.history = self.history.alerted(signal_from_health_event(event, time.time()))

    async def read_primary(self) -> dict[str, Any] | None:
        assert self.topology is not None
        try:
            entry = await self.topology.get("primary")
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        data: dict[str, Any] = json.loads(entry.value)
        return data

    async def record_observed(self, event: ClusterObserved, ctx: HandlerContext) -> None:
        """Keep ``nodes``; set ``primary`` from an observation only when none is recorded or it
        is the recorded node (changes of primary are the lease holder's to make)."""
        assert self.topology is not None
        nodes = {n.name: n.model_dump(mode="json") for n in event.nodes}
        await self.topology.put("nodes", json.dumps(nodes).encode())
        primaries = [n for n in event.nodes if n.reachable and n.role == "primary"]
        if len(primaries) != 1:
            return
        p = primaries[0]
        current = await self.read_primary()
        if current is not None and current.get("node") != p.name:
            return
        if current is not None and (current.get("host"), current.get("port")) == (p.host, p.port):
            return
        await self.set_primary(
            p.name, p.host, p.port, epoch=(current or {}).get("epoch"),
            previous=(current or {}).get("previous"),
        )

    # --- outputs ----------------------------------------------------------------------------
    def _env(self, cause: Message | None) -> dict[str, Any]:
        return {"source": self.service.source, **(cause.caused() if cause else {})}

    async def set_primary(
        self, node: str, host: str, port: int, *, epoch: int | None, previous: str | None
    ) -> dict[str, Any]:
        assert self.topology is not None
        record = primary_record(
            node, host, port, epoch=epoch, previous=previous, by=self.service.source,
            database=self.settings.pg.database,
        )
        await self.topology.put("primary", json.dumps(record).encode())
        await asyncio.to_thread(write_connection_file, self.connection_file, record)
        return record

    async def _save_rejoin(self) -> None:
        if self.topology is not None:
            with contextlib.suppress(Exception):
                await self.topology.put("rejoin", json.dumps(sorted(self.pending_rejoin)).encode())

    async def notify(self, notice: Notice, cause: Message | None) -> None:
        deliveries = await notify_all(self.notifiers, notice)
        env = self._env(cause)
        if not deliveries:
            await self.service.publish(StaffNotified(
                **env, channel="page", recipients=[], delivered=False,
                summary=f"{notice.subject} (no notification channel configured)",
            ))
        for d in deliveries:
            if not d.delivered:
                log.warning("notification failed: %s", d.detail)
            await self.service.publish(StaffNotified(
                **env, channel=d.channel, recipients=list(d.recipients), delivered=d.delivered,
                summary=notice.subject,
            ))

    async def request_backup(self, epoch: int, cause: Message | None) -> None:
        if not self.cs.backup_after_failover:
            return
        from emrdr.security import load_identity

        try:
            identity = load_identity(self.settings.keys_dir, "dr-coordinator", "system")
        except (PermissionError, ValueError) as exc:
            log.warning("no full backup requested after failover: %s", exc)
            return
        command = identity.sign(StartBackup(
            issuer=identity.issuer, kind="full", schedule=f"after-failover-epoch-{epoch}",
            **(cause.caused() if cause else {}),
        ))
        await self.service.publish(command, msg_id=f"failover-backup:{epoch}")

    async def page(self, reason: str, primary: str | None, cause: Message | None = None) -> None:
        key = _page_key(reason)
        if key == self.paged:
            return
        self.paged = key
        epoch = self.lease.epoch if self.lease else None
        await self.service.publish(
            FailoverPaged(**self._env(cause), reason=reason, primary=primary, epoch=epoch)
        )
        await self.notify(
            Notice(subject=f"emrdr needs a person: {reason[:150]}", body=reason,
                   severity="emergency", kind="page",
                   facts={"primary": primary, "epoch": epoch}),
            cause,
        )

    # --- the cycle --------------------------------------------------------------------------
    def snapshot(self, primary: str | None) -> Snapshot:
        lease = self.lease
        return Snapshot.build(
            self.history, primary, time.time(), self.fs,
            lease_held=bool(lease and lease.is_held()),
            epoch=lease.epoch if lease else None,
            sync_standbys=self.sync_standbys, in_progress=self.in_progress,
        )

    async def cycle(self) -> Decision:
        await self.ingest()
        if self.acting.locked():
            return Decision(Action.WAIT, f"{self.in_progress or 'an action'} is in progress")
        async with self.acting:
            record = await self.read_primary()
            primary = record.get("node") if record else None
            snap = self.snapshot(primary)
            if not snap.nodes:
                return Decision(Action.WAIT, "no replication-monitor has reported yet")
            if snap.lease_held and snap.epoch is not None:
                if await self.rejoin_returning(snap, record):
                    return Decision(Action.WAIT, "rejoined a former primary this cycle")
                await self.adopt_primary(snap, record)
                if self.fs.sync_mode and self.cs.manage_sync_standbys and primary:
                    await self.manage_sync(snap, primary)
            d = decide(snap)
            if self.last is None or (d.action, d.reason) != (self.last.action, self.last.reason):
                log.info("decision: %s: %s", d.action.value, d.reason)
            self.last = d
            if d.action is Action.FAILOVER and snap.epoch is not None:
                await self.failover(d, snap, cause=None)
            elif d.action is Action.PAGE and snap.lease_held:
                await self.page(d.reason, primary)
            elif d.action is Action.NONE and snap.lease_held:
                self.paged = None
            return d

    async def adopt_primary(self, snap: Snapshot, record: dict[str, Any] | None) -> None:
        """Record the running primary when none is recorded, or when the recorded one failed
        and another already runs as primary."""
        running = snap.running_primaries()
        if len(running) != 1:
            return
        name = running[0]
        if record is not None and (record.get("node") == name or not snap.judgement.failed):
            return
        obs = snap.node(name)
        assert obs is not None
        previous = record.get("node") if record else None
        await self.set_primary(name, obs.host, obs.port, epoch=snap.epoch, previous=previous)
        log.info("recorded %s as the primary", name)
        if previous is not None and snap.epoch is not None:
            await self.service.publish(PrimaryChanged(
                source=self.service.source, node=name, host=obs.host, port=obs.port,
                epoch=snap.epoch, previous=previous,
            ))
            if previous in self.instances() and self.cs.auto_rejoin:
                self.pending_rejoin.add(previous)
                await self._save_rejoin()

    async def manage_sync(self, snap: Snapshot, primary: str) -> None:
        obs = snap.node(primary)
        if obs is None or not obs.reachable or obs.role != "primary":
            return
        want = sync_standby_names([n.name for n in self.node_configs() if n.name != primary])
        node = next((n for n in self.node_configs() if n.name == primary), None)
        if node is None:
            return
        try:
            conn = await connect_target(node, user=self.settings.pg.user,
                                        password=self.settings.pg.password, timeout=2)
        except FencingError as exc:
            log.warning("cannot manage synchronous_standby_names: %s", exc)
            return
        try:
            current = await conn.fetchval("SHOW synchronous_standby_names")
            if current != want:
                literal = "'" + want.replace("'", "''") + "'"
                await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = {literal}")
                await conn.execute("SELECT pg_reload_conf()")
                log.info("synchronous_standby_names on %s: %r -> %r", primary, current, want)
        except asyncpg.PostgresError as exc:
            log.warning("cannot set synchronous_standby_names on %s: %s", primary, exc)
        finally:
            await conn.close()

    # --- actions ----------------------------------------------------------------------------
    async def _publish_step(self, step: StepResult, epoch: int, cause: Message | None) -> None:
        await self.service.publish(FailoverStepCompleted(
            **self._env(cause), step=step.name, epoch=epoch,
            detail=("" if step.ok else "FAILED: ") + f"{step.detail} ({step.seconds:.2f} s)",
        ))
        if self.step_hook is not None:
            await self.step_hook(step)

    async def _check_lease(self, epoch: int, cause: Message | None) -> bool:
        assert self.lease is not None
        try:
            await self.lease.check(epoch)
        except (StaleLeaseError, LeaseError) as exc:
            await self.service.publish(
                FailoverFailed(**self._env(cause), step="lease", error=str(exc), epoch=epoch)
            )
            return False
        return True

    async def failover(
        self, d: Decision, snap: Snapshot, cause: Message | None, *, kind: str = "failover"
    ) -> bool:
        """Execute a FAILOVER decision; True when a new primary accepts writes."""
        assert d.target is not None and snap.epoch is not None
        epoch, old, target = snap.epoch, snap.primary, d.target
        if not await self._check_lease(epoch, cause):
            return False
        started = time.perf_counter()
        self.in_progress = f"{kind} to {target} (epoch {epoch})"
        instances = self.instances()
        old_obs = snap.node(old) if old else None
        try:
            steps = await execute_failover(
                d, instances, old_primary=old, epoch=epoch, settings=self.fs,
                old_primary_reachable=old_obs.reachable if old_obs else None,
                actor=self.service.source,
                on_step=lambda s: self._publish_step(s, epoch, cause),
            )
        except FailoverAborted as exc:
            steps = [StepResult("plan", False, str(exc), 0.0)]
        finally:
            self.in_progress = None
        return await self._finish(
            steps, old=old, target=target, epoch=epoch, reason=d.reason, cause=cause,
            started=started, instances=instances, rejoin_old=True,
        )

    async def _finish(
        self, steps: list[StepResult], *, old: str | None, target: str, epoch: int,
        reason: str, cause: Message | None, started: float,
        instances: Mapping[str, PgInstance], rejoin_old: bool,
    ) -> bool:
        env = self._env(cause)
        promoted = any(s.name == "record-epoch" and s.ok for s in steps)
        failed = [s for s in steps if not s.ok]
        if not promoted:
            first = failed[0] if failed else StepResult("unknown", False, "no step ran", 0.0)
            await self.service.publish(
                FailoverFailed(**env, step=first.name, error=first.detail, epoch=epoch)
            )
            await self.page(f"{reason}; step {first.name} failed: {first.detail}", old, cause)
            return False
        inst = instances[target]
        await self.set_primary(target, inst.host, inst.port, epoch=epoch, previous=old)
        await self.service.publish(
            PrimaryChanged(**env, node=target, host=inst.host, port=inst.port, epoch=epoch,
                           previous=old)
        )
        if rejoin_old and old and old in instances and self.cs.auto_rejoin:
            self.pending_rejoin.add(old)
            await self._save_rejoin()
        note = ""
        if failed:
            note = "; but " + "; ".join(f"{s.name} failed: {s.detail}" for s in failed)
        duration = round(time.perf_counter() - started, 3)
        await self.service.publish(FailoverCompleted(
            **env, old_primary=old, new_primary=target, epoch=epoch, reason=reason + note,
            duration_s=duration,
        ))
        await self.notify(
            Notice(
                subject=f"{target} is the new primary (was {old or 'none'})",
                body=(f"The DR coordinator made {target} ({inst.host}:{inst.port}) the primary "
                      f"at fencing epoch {epoch} in {duration:.1f} s. Reason: {reason}{note}. "
                      "Applications must reconnect to the new primary."),
                severity="critical",
                facts={"new_primary": target, "old_primary": old, "epoch": epoch,
                       "host": inst.host, "port": inst.port, "duration_s": duration},
            ),
            cause,
        )
        await self.request_backup(epoch, cause)
        return True

    async def rejoin_returning(self, snap: Snapshot, record: dict[str, Any] | None) -> bool:
        """Rejoin pending former primaries that answer again; True if one was handled."""
        primary = record.get("node") if record else None
        if not self.pending_rejoin or primary is None:
            return False
        instances = self.instances()
        for name in sorted(self.pending_rejoin):
            obs = snap.node(name)
            if name == primary or name not in instances or primary not in instances:
                self.pending_rejoin.discard(name)
                await self._save_rejoin()
                continue
            if obs is None or not obs.reachable:
                continue
            await self.rejoin(name, instances[name], instances[primary], cause=None)
            return True
        return False

    async def rejoin(
        self, name: str, node: PgInstance, primary: PgInstance, cause: Message | None
    ) -> bool:
        self.in_progress = f"rejoin of {name}"
        try:
            result = await asyncio.to_thread(rejoin_as_replica, node, primary)
        except (PgError, OSError) as exc:
            await self.service.publish(NodeRejoinFailed(**self._env(cause), node=name,
                                                        error=str(exc)[:2000]))
            await self.page(f"{name} could not rejoin as a replica of {primary.name}: {exc}",
                            primary.name, cause)
            return False
        finally:
            self.in_progress = None
            self.pending_rejoin.discard(name)
            await self._save_rejoin()
        await self.service.publish(NodeRejoined(
            **self._env(cause), node=name, primary=primary.name, method=result.method,
            detail=result.detail, duration_s=result.seconds,
        ))
        return True

    # --- commands ---------------------------------------------------------------------------
    def _require_lease(self) -> int:
        if self.lease is None or not self.lease.is_held() or self.lease.epoch is None:
            raise NotLeaseHolder(f"{self.service.source} does not hold the coordinator lease")
        return self.lease.epoch

    async def on_promote(self, command: PromoteNode, ctx: HandlerContext) -> None:
        self._require_lease()
        async with self.acting:
            await self.ingest()
            record = await self.read_primary()
            primary = record.get("node") if record else None
            if command.node == primary:
                await ctx.publish(FailoverFailed(
                    **ctx.envelope(), step="check-target",
                    error=f"{command.node} is already the primary", epoch=self.lease_epoch(),
                ))
                return
            snap = self.snapshot(primary)
            d = Decision(
                Action.FAILOVER,
                f"manual promotion of {command.node} requested by {command.issuer.actor}",
                target=command.node,
            )
            await self.failover(d, snap, cause=command, kind="manual promotion")

    def lease_epoch(self) -> int | None:
        return self.lease.epoch if self.lease else None

    async def on_switchover(self, command: Switchover, ctx: HandlerContext) -> None:
        epoch = self._require_lease()
        async with self.acting:
            record = await self.read_primary()
            primary = record.get("node") if record else None
            if primary is None:
                await ctx.publish(FailoverFailed(
                    **ctx.envelope(), step="check-target", epoch=epoch,
                    error="no primary is recorded; a switchover needs a running primary",
                ))
                return
            if not await self._check_lease(epoch, command):
                return
            started = time.perf_counter()
            self.in_progress = f"switchover to {command.to_node} (epoch {epoch})"
            instances = self.instances()
            try:
                steps = await execute_switchover(
                    instances, old_primary=primary, target=command.to_node, epoch=epoch,
                    actor=self.service.source,
                    on_step=lambda s: self._publish_step(s, epoch, command),
                )
            finally:
                self.in_progress = None
            await self._finish(
                steps, old=primary, target=command.to_node, epoch=epoch,
                reason=f"switchover to {command.to_node} requested by {command.issuer.actor}",
                cause=command, started=started, instances=instances, rejoin_old=False,
            )

    async def on_activate_dr_site(self, command: ActivateDrSite, ctx: HandlerContext) -> None:
        """Seed scenario 2: the primary site is lost; a new primary from the repository."""
        from emrdr.engine.repository import open_repository
        from emrdr.failover.drsite import activate_dr_site
        from emrdr.natsserver import free_port

        epoch = self._require_lease()
        async with self.acting:
            if not await self._check_lease(epoch, command):
                return
            record = await self.read_primary()
            old = record.get("node") if record else None
            target_dir = (Path(command.target_dir) if command.target_dir
                          else self.settings.home / "dr-site" / "data")
            port = command.port or free_port("127.0.0.1")
            started = time.perf_counter()
            self.in_progress = f"DR-site activation into {target_dir} (epoch {epoch})"
            try:
                repo = await asyncio.to_thread(open_repository, self.settings)
                result = await activate_dr_site(
                    self.settings, repo, target_dir, port,
                    on_step=lambda s: self._publish_step(s, epoch, command),
                    epoch=epoch, actor=self.service.source,
                )
                steps = result.steps
                name, host = result.node, result.host
            except Exception as exc:  # no repository, no key: nothing was started
                steps = [StepResult("open-repository", False,
                                    f"{type(exc).__name__}: {exc}", 0.0)]
                name, host = "dr-site", "127.0.0.1"
            finally:
                self.in_progress = None
            site = PgInstance(target_dir.parent, port, name, host=host,
                              bindir=self.settings.pg.bindir)
            await self._finish(
                steps, old=old, target=name, epoch=epoch,
                reason=f"DR-site activation requested by {command.issuer.actor}: newest backup "
                       f"and all archived WAL restored into {target_dir}",
                cause=command, started=started, instances={name: site}, rejoin_old=False,
            )
