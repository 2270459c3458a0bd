"""End to end on real servers: kill -9 the primary of a primary + 2 replicas cluster, judge from
repeated observations, decide, execute with a real lease epoch, and check the outcome an
operator would check."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from emrdr.config import PgNode
from emrdr.failover.decide import Action, Decision, Snapshot, decide
from emrdr.failover.execute import StepResult, execute_failover, failover_succeeded
from emrdr.failover.fencing import StaleEpochError, connect_target, record_epoch, recorded_epoch
from emrdr.failover.judge import HealthHistory, observation_lsn
from emrdr.failover.lease import Lease
from emrdr.failover.settings import FailoverSettings
from emrdr.pg.instance import PgError, PgInstance
from emrdr.pg.observe import observe_cluster
from tests.fixtures.pg import ClusterFactory

pytestmark = [pytest.mark.pg, pytest.mark.nats]


@pytest.fixture
async def lease_kv(nc: Client) -> AsyncIterator[KeyValue]:
    js = nc.jetstream()
    name = f"test_failover_{uuid.uuid4().hex[:8]}"
    kv = await js.create_key_value(
        KeyValueConfig(bucket=name, ttl=10.0, history=1, storage=StorageType.MEMORY)
    )
    yield kv
    await js.delete_key_value(name)


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():  # type: ignore[operator]
                return
        except PgError:
            pass
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


async def test_kill9_primary_fails_over_to_the_best_replica(
    make_cluster: ClusterFactory, lease_kv: KeyValue
) -> None:
    cluster = make_cluster(n_replicas=2)
    nodes: dict[str, PgInstance] = {i.name: i for i in cluster.instances}
    old = cluster.primary
    pg_nodes = [PgNode(name=i.name, host=i.host, port=i.port) for i in nodes.values()]
    old.psql("CREATE TABLE visits (id int PRIMARY KEY, note text)")
    old.psql("INSERT INTO visits SELECT g, 'before' FROM generate_series(1, 100) g")
    lsn = old.psql("SELECT pg_current_wal_lsn()")
    wait_for(
        lambda: nodes["pg-replica-2"].psql(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'") == "t",
        20, "replica-2 to replay",
    )
    # replica-2 loses its upstream and falls behind: the candidate must be replica-1
    nodes["pg-replica-2"].configure(primary_conninfo=None)
    nodes["pg-replica-2"].reload()
    wait_for(
        lambda: nodes["pg-replica-2"].psql("SELECT count(*) FROM pg_stat_wal_receiver") == "0",
        20, "replica-2's WAL receiver to stop",
    )
    old.psql("INSERT INTO visits SELECT g, 'only on replica-1' FROM generate_series(101, 5000) g")
    lsn = old.psql("SELECT pg_current_wal_lsn()")
    wait_for(
        lambda: nodes["pg-replica-1"].psql(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'") == "t",
        20, "replica-1 to replay",
    )

    settings = FailoverSettings(max_lag_bytes=64 * 1024 * 1024)
    lease = Lease(lease_kv, "coordinator-test", ttl=10.0)
    assert await lease.acquire()
    epoch = lease.epoch
    assert epoch is not None
    history = HealthHistory()
    decisions: list[Decision] = []
    steps: list[StepResult] = []
    start = time.monotonic()

    async def poll() -> Decision:
        nonlocal history
        now = time.monotonic() - start
        observed = await observe_cluster(pg_nodes, timeout=1.0)
        history = history.observed(now, "monitor-1", observed)
        snap = Snapshot.build(history, old.name, now, settings, lease_held=lease.is_held(),
                              epoch=lease.epoch)
        d = decide(snap)
        decisions.append(d)
        return d

    for _ in range(2):  # healthy polls: the primary's position is known
        assert (await poll()).action is Action.NONE
        await asyncio.sleep(settings.poll_interval_s)
    assert decisions[-1].reason == "pg-primary answered its last check"

    old.kill9()
    killed_at = time.monotonic()
    while True:
        d = await poll()
        if d.action is Action.FAILOVER:
            break
        assert d.action is Action.WAIT, d.reason
        assert time.monotonic() - killed_at < 15, [x.reason for x in decisions]
        await asyncio.sleep(settings.poll_interval_s)
    judged_at = time.monotonic()
    latest = history.latest()
    behind = observation_lsn(latest["pg-replica-2"]) or 0
    assert behind < (observation_lsn(latest["pg-replica-1"]) or 0)
    assert d.target == "pg-replica-1", d.reason
    assert d.reason.startswith("pg-primary failed 3 consecutive checks over ")
    assert "promoting pg-replica-1, the replica with the most WAL" in d.reason
    assert d.reason.endswith("0 bytes behind the failed primary)")
    assert [x.reason for x in decisions[2:-1]] == [
        "pg-primary failed 1 of 3 consecutive checks needed; not failed yet",
        "pg-primary failed 2 of 3 consecutive checks needed; not failed yet",
    ]

    result = await execute_failover(
        d, nodes, old_primary=old.name, epoch=epoch, settings=settings,
        old_primary_reachable=False, on_step=steps.append,
    )
    assert [s.name for s in result] == [
        "check-epoch", "fence-old-primary", "promote", "record-epoch", "repoint:pg-replica-2",
    ]
    assert failover_succeeded(result), result
    new = nodes["pg-replica-1"]
    new.psql("INSERT INTO visits VALUES (5001, 'after failover')")
    writable_at = time.monotonic()
    print(
        f"\nkill -9 -> failed judgement {judged_at - killed_at:.1f} s; "
        f"-> writable new primary {writable_at - killed_at:.1f} s; steps: "
        + ", ".join(f"{s.name} {s.seconds:.2f}s" for s in result)
    )
    assert writable_at - killed_at <= 10.0
    assert new.psql("SELECT count(*) FROM visits") == "5001"  # nothing acknowledged was lost

    # the fencing epoch is recorded on the new primary, and a stale one is refused there
    conn = await connect_target(new)
    try:
        assert await recorded_epoch(conn) == epoch
        with pytest.raises(StaleEpochError):
            await record_epoch(conn, epoch - 1, new.name, "promoted", "stale coordinator")
    finally:
        await conn.close()

    # the other replica follows the new primary and receives data written after failover
    other = nodes["pg-replica-2"]
    wait_for(
        lambda: other.psql("SELECT count(*) FROM visits WHERE id = 5001") == "1",
        30, "pg-replica-2 to replay a row written after the failover",
    )
    assert other.psql("SELECT max(epoch) FROM emrdr_meta.fencing") == str(epoch)
    assert other.is_in_recovery()

    # the old primary is down, and if it is restarted it comes back in recovery, not writable
    fence = next(s for s in result if s.name == "fence-old-primary")
    assert "left standby.signal" in fence.detail
    assert not old.is_running()
    await asyncio.to_thread(old.start, 30)
    assert old.is_in_recovery()
    with pytest.raises(PgError, match="read-only transaction"):
        old.psql("INSERT INTO visits VALUES (9999, 'split brain')")
    assert steps == result  # every step was reported as it happened

    # a coordinator with an older epoch is refused before it touches anything
    stale = await execute_failover(
        Decision(Action.FAILOVER, "stale view", target="pg-replica-2"), nodes,
        old_primary=new.name, epoch=epoch - 1,
    )
    assert [(s.name, s.ok) for s in stale] == [("check-epoch", False)]
    assert stale[0].detail.startswith(
        f"pg-replica-2 refuses epoch {epoch - 1}: it has already recorded epoch {epoch}"
    )
    assert not new.is_in_recovery()
