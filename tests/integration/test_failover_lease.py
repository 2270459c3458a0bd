"""The coordinator lease against a real nats-server: acquire, renew, takeover after the TTL,
stale epochs refused."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from emrdr.bus.topology import BUCKETS, KV_LEASES
from emrdr.failover.lease import Lease, StaleLeaseError

pytestmark = pytest.mark.nats

TTL = 2.0


@pytest.fixture
async def kv(nc: Client) -> AsyncIterator[KeyValue]:
    """A fresh lease bucket with a short TTL, so takeovers take seconds, not ten."""
    js = nc.jetstream()
    name = f"test_leases_{uuid.uuid4().hex[:8]}"
    bucket = await js.create_key_value(
        KeyValueConfig(bucket=name, ttl=TTL, history=1, storage=StorageType.MEMORY)
    )
    yield bucket
    await js.delete_key_value(name)


async def test_production_bucket_has_a_ttl() -> None:
    spec = next(b for b in BUCKETS if b.name == KV_LEASES)
    assert spec.ttl is not None and spec.ttl > 0


async def test_only_one_holder(kv: KeyValue) -> None:
    a, b = Lease(kv, "coord-a", ttl=TTL), Lease(kv, "coord-b", ttl=TTL)
    assert await a.acquire()
    assert not await b.acquire()
    assert a.is_held() and not b.is_held()
    assert a.epoch is not None and b.epoch is None
    record = await b.current()
    assert record is not None and (record.holder, record.epoch) == ("coord-a", a.epoch)


async def test_renew_keeps_the_epoch_and_the_lease_past_the_ttl(kv: KeyValue) -> None:
    a, b = Lease(kv, "coord-a", ttl=TTL), Lease(kv, "coord-b", ttl=TTL)
    assert await a.acquire()
    epoch = a.epoch
    assert epoch is not None
    for _ in range(4):  # 4 x 0.6 s = 2.4 s > TTL
        await asyncio.sleep(0.6)
        assert await a.renew()
    assert a.epoch == epoch and a.revision is not None and a.revision > epoch
    assert not await b.acquire()
    await a.check(epoch)


async def test_standby_takes_over_after_the_ttl_with_a_higher_epoch(kv: KeyValue) -> None:
    a, b = Lease(kv, "coord-a", ttl=TTL), Lease(kv, "coord-b", ttl=TTL)
    assert await a.acquire()
    old_epoch = a.epoch
    assert old_epoch is not None
    started = time.monotonic()
    while not await b.acquire():  # a stops renewing (a hung or dead coordinator)
        assert time.monotonic() - started < TTL + 5, "lease never expired"
        await asyncio.sleep(0.2)
    took = time.monotonic() - started
    print(f"takeover {took:.1f} s after the last renewal (ttl {TTL} s)")
    assert took >= TTL * 0.8
    assert b.epoch is not None and b.epoch > old_epoch
    # the old holder finds out at its next renewal, and its epoch is refused
    assert not a.is_held()  # by its own clock as well
    assert not await a.renew()
    with pytest.raises(StaleLeaseError, match=f"epoch {old_epoch} refused.*held by coord-b"):
        await b.check(old_epoch)


async def test_a_holder_that_lost_cannot_renew_over_the_new_one(kv: KeyValue) -> None:
    """Compare-and-set: a renewal with an old revision fails even before the local TTL ends."""
    a, b = Lease(kv, "coord-a", ttl=TTL), Lease(kv, "coord-b", ttl=TTL)
    assert await a.acquire()
    await kv.delete("coordinator")  # the key vanished (expiry, an operator, a NATS failure)
    assert await b.acquire()
    assert not await a.renew()
    assert not a.is_held()
    record = await a.current()
    assert record is not None and record.holder == "coord-b"


async def test_release_hands_over_at_once(kv: KeyValue) -> None:
    a, b = Lease(kv, "coord-a", ttl=TTL), Lease(kv, "coord-b", ttl=TTL)
    assert await a.acquire()
    first = a.epoch
    await a.release()
    assert not a.is_held()
    assert await b.acquire()
    assert b.epoch is not None and first is not None and b.epoch > first
    with pytest.raises(StaleLeaseError):
        await b.check(first)


async def test_run_loops_hand_over_when_the_holder_stops(kv: KeyValue) -> None:
    events: list[tuple[str, bool, str]] = []
    a, b = Lease(kv, "coord-a", ttl=TTL), Lease(kv, "coord-b", ttl=TTL)
    stop_a, stop_b = asyncio.Event(), asyncio.Event()

    def on(name: str) -> Callable[[bool, str], None]:
        return lambda held, reason: events.append((name, held, reason))

    task_a = asyncio.create_task(a.run(stop_a, on("a")))
    await asyncio.sleep(0.3)
    task_b = asyncio.create_task(b.run(stop_b, on("b")))
    await asyncio.sleep(TTL + 0.5)  # a keeps renewing past the TTL; b keeps waiting
    assert a.is_held() and not b.is_held()
    first = a.epoch
    stop_a.set()
    await task_a  # releases on the way out
    deadline = time.monotonic() + TTL + 3
    while not b.is_held():
        assert time.monotonic() < deadline, f"b never took over: {events}"
        await asyncio.sleep(0.1)
    assert b.epoch is not None and first is not None and b.epoch > first
    stop_b.set()
    await task_b
    assert ("a", True, f"coord-a acquired the lease, epoch {first}") in events
    assert ("a", False, "coord-a released the lease") in events
    assert any(name == "b" and held for name, held, _ in events)


async def test_run_loop_notices_a_takeover(kv: KeyValue) -> None:
    events: list[tuple[bool, str]] = []
    a = Lease(kv, "coord-a", ttl=TTL, renew_every=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(a.run(stop, lambda held, why: events.append((held, why))))
    while not a.is_held():  # noqa: ASYNC110 - polling another task's state
        await asyncio.sleep(0.05)
    await kv.delete("coordinator")
    b = Lease(kv, "coord-b", ttl=TTL)
    assert await b.acquire()
    deadline = time.monotonic() + 2
    while not any(not held for held, _ in events):
        assert time.monotonic() < deadline, f"loss not noticed: {events}"
        await asyncio.sleep(0.05)
    assert events[-1] == (False, "coord-a lost the lease (taken over or expired)")
    stop.set()
    await task
    record = await b.current()
    assert record is not None and record.holder == "coord-b"  # a's exit did not delete b's lease
