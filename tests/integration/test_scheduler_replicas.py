"""Scheduler replicas against a real nats-server: one command per slot, catch-up, restarts.

Commands go to a per-test subject under ``emrdr.cmd.test.<prefix>.`` (still stored by the
COMMANDS work queue, but consumed by no service) and are read back by sequence with
``get_msg`` -- no consumer is created, so nothing conflicts with other tests' consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from emrdr.bus.publish import MSG_ID
from emrdr.bus.topology import COMMANDS_STREAM, KV_SCHEDULER
from emrdr.config import ScheduleEntry, SchedulerSettings
from emrdr.messages import REGISTRY, Command
from emrdr.messages.commands import StartBackup
from emrdr.schedule import Scheduler, TickResult, dedup_id

pytestmark = pytest.mark.nats


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Sandbox:
    """A unique schedule prefix, its subjects, and reading back what was stored."""

    def __init__(self, js: JetStreamContext, kv: KeyValue) -> None:
        self.js = js
        self.kv = kv
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.filter = f"emrdr.cmd.test.{self.prefix}.>"
        self.names: list[str] = []

    def name(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        self.names.append(name)
        return name

    def subject_for(self, cmd: Command) -> str:
        return f"emrdr.cmd.test.{self.prefix}.{cmd.subject.removeprefix('emrdr.cmd.')}"

    def settings(self, schedules: dict[str, ScheduleEntry], **kw: Any) -> SchedulerSettings:
        return SchedulerSettings(schedules=schedules, **kw)

    async def stored(self) -> list[tuple[str, Command]]:
        """(Nats-Msg-Id, command) of every message stored on this test's subjects, in order."""
        info = await self.js.stream_info(COMMANDS_STREAM)
        seq = info.state.first_seq
        out: list[tuple[str, Command]] = []
        while True:
            try:
                msg = await self.js.get_msg(
                    COMMANDS_STREAM, seq=seq, subject=self.filter, next=True
                )
            except NotFoundError:
                return out
            assert msg.seq is not None and msg.data is not None
            cmd = REGISTRY.decode(msg.data)
            assert isinstance(cmd, Command)
            out.append(((msg.headers or {})[MSG_ID], cmd))
            seq = msg.seq + 1

    async def stored_ids(self) -> list[str]:
        return [msg_id for msg_id, _ in await self.stored()]

    async def cleanup(self) -> None:
        await self.js.purge_stream(COMMANDS_STREAM, subject=self.filter)
        for name in self.names:
            with contextlib.suppress(NotFoundError):
                await self.kv.purge(name)


@pytest.fixture
async def box(nc: Client) -> AsyncIterator[Sandbox]:
    js = nc.jetstream()
    sandbox = Sandbox(js, await js.key_value(KV_SCHEDULER))
    try:
        yield sandbox
    finally:
        await sandbox.cleanup()


@pytest.fixture
async def nc2(bootstrapped: str) -> AsyncIterator[Client]:
    """A second connection: the other replica."""
    client = await nats.connect(bootstrapped)
    try:
        yield client
    finally:
        await client.close()


async def replica(
    nc: Client,
    box: Sandbox,
    *,
    settings: SchedulerSettings,
    clock: Clock,
    instance: str,
    sign: Callable[[Command], Command] | None = None,
) -> Scheduler:
    js = nc.jetstream()
    kv = await js.key_value(KV_SCHEDULER)
    extra: dict[str, Any] = {"sign": sign} if sign else {}
    return Scheduler(
        js, kv, settings, clock=clock, instance=instance, subject_for=box.subject_for, **extra
    )


def fired(results: list[TickResult]) -> list[datetime]:
    return sorted(s for r in results for s in r.published)


def _signed(cmd: Command) -> Command:
    return cmd.model_copy(update={"signature": f"sig:{cmd.event_id}"})


async def test_two_replicas_store_one_command_per_slot(
    nc: Client, nc2: Client, box: Sandbox
) -> None:
    """Two replicas ticking the same slots concurrently for a simulated day: one command each."""
    inc, full = box.name("inc"), box.name("full")
    settings = box.settings(
        {
            inc: ScheduleEntry(cron="0 */4 * * *", command="backup_incremental"),
            full: ScheduleEntry(cron="0 2 * * *", command="backup_full"),
        }
    )
    start = utc(2026, 11, 26, 1, 0)
    clock_a, clock_b = Clock(start), Clock(start + timedelta(seconds=1))
    a = await replica(nc, box, settings=settings, clock=clock_a, instance="replica-a", sign=_signed)
    b = await replica(
        nc2, box, settings=settings, clock=clock_b, instance="replica-b", sign=_signed
    )

    first = await asyncio.gather(a.tick(), b.tick())
    assert all(r.reason.startswith("first run: ") for rs in first for r in rs)

    published: list[datetime] = []
    duplicates = 0
    for step in range(1, 24 * 4 + 1):  # every 15 minutes for 24 h, replica b 3 s later
        clock_a.now = start + timedelta(minutes=15 * step, seconds=2)
        clock_b.now = clock_a.now + timedelta(seconds=3)
        ra, rb = await asyncio.gather(a.tick(), b.tick())
        published += fired(ra + rb)
        duplicates += sum(len(r.duplicates) for r in ra + rb)
        assert not [r.error for r in ra + rb if r.error]

    want = [dedup_id(inc, utc(2026, 11, 26, h)) for h in (4, 8, 12, 16, 20)]
    want += [dedup_id(inc, utc(2026, 11, 27, 0)), dedup_id(full, utc(2026, 11, 26, 2))]
    stored = await box.stored()
    assert sorted(msg_id for msg_id, _ in stored) == sorted(want)
    assert len(published) == len(want)  # the server acknowledged each as new exactly once

    by_id = dict(stored)
    cmd = by_id[dedup_id(full, utc(2026, 11, 26, 2))]
    assert isinstance(cmd, StartBackup) and cmd.kind == "full" and cmd.schedule == full
    assert cmd.signature == f"sig:{cmd.event_id}"
    assert cmd.occurred_at == utc(2026, 11, 26, 2)

    record = await a.read_record(inc)
    assert record is not None and record.slot == utc(2026, 11, 27, 0)
    assert record.by in {"replica-a", "replica-b"}


async def test_replicas_racing_on_the_same_instant(nc: Client, nc2: Client, box: Sandbox) -> None:
    """Same clock, many rounds: every slot is stored once whoever wins the record."""
    name = box.name("race")
    settings = box.settings({name: ScheduleEntry(cron="*/5 * * * *", command="retention")})
    clock = Clock(utc(2026, 11, 26, 9, 58))
    a = await replica(nc, box, settings=settings, clock=clock, instance="a")
    b = await replica(nc2, box, settings=settings, clock=clock, instance="b")
    raced = lost = 0
    for step in range(1, 13):
        clock.now = utc(2026, 11, 26, 10) + timedelta(minutes=5 * (step - 1), seconds=1)
        ra, rb = await asyncio.gather(a.tick(clock.now), b.tick(clock.now))
        assert len(fired(ra + rb)) == 1, (ra, rb)
        for r in ra + rb:
            if r.duplicates:
                assert r.reason.endswith("already stored by another replica")
        assert sum(r.recorded for r in ra + rb) >= 1
        raced += sum(len(r.duplicates) for r in ra + rb)
        lost += sum(not r.recorded and bool(r.duplicates) for r in ra + rb)
    # both replicas really did decide the same slot (the dedup id and the CAS were exercised)
    assert raced >= 1 and lost >= 1
    ids = await box.stored_ids()
    assert len(ids) == 12 and len(set(ids)) == 12
    assert ids[0] == f"schedule:{name}:2026-11-26T10:00Z"


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("latest", [16]),
        ("all", [8, 12, 16]),
        ("skip", []),
    ],
)
async def test_catch_up_after_downtime_follows_policy(
    nc: Client, box: Sandbox, policy: str, expected: list[int]
) -> None:
    name = box.name(f"down-{policy}")
    settings = box.settings(
        {name: ScheduleEntry(cron="0 */4 * * *", command="backup_incremental")}, catch_up=policy
    )
    clock = Clock(utc(2026, 11, 26, 3, 30))
    before = await replica(nc, box, settings=settings, clock=clock, instance="before")
    assert fired(await before.tick()) == []
    clock.now = utc(2026, 11, 26, 4, 0, 5)
    assert fired(await before.tick()) == [utc(2026, 11, 26, 4)]

    # down from 04:00 until 17:30: slots 08:00, 12:00, 16:00 are missed
    clock.now = utc(2026, 11, 26, 17, 30)
    after = await replica(nc, box, settings=settings, clock=clock, instance="after")
    (result,) = await after.tick()
    assert fired([result]) == [utc(2026, 11, 26, h) for h in expected]
    assert result.reason.startswith(f"missed 3 slots while down; policy '{policy}' fires")
    record = await after.read_record(name)
    assert record is not None and record.slot == utc(2026, 11, 26, 16) and record.by == "after"

    clock.now = utc(2026, 11, 26, 20, 0, 5)
    assert fired(await after.tick()) == [utc(2026, 11, 26, 20)]
    hours = [int(i.rsplit("T", 1)[1][:2]) for i in await box.stored_ids()]
    assert hours == [4, *expected, 20]


async def test_restart_does_not_refire_a_recorded_slot(nc: Client, box: Sandbox) -> None:
    name = box.name("restart")
    settings = box.settings({name: ScheduleEntry(cron="0 2 * * *", command="backup_full")})
    clock = Clock(utc(2026, 11, 26, 1, 59))
    first = await replica(nc, box, settings=settings, clock=clock, instance="first")
    clock.now = utc(2026, 11, 26, 2, 0, 5)
    assert fired(await first.tick()) == [utc(2026, 11, 26, 2)]

    clock.now = utc(2026, 11, 26, 2, 0, 30)
    restarted = await replica(nc, box, settings=settings, clock=clock, instance="restarted")
    (result,) = await restarted.tick()
    assert result.published == [] and result.duplicates == []  # not even attempted
    assert result.reason == "no slot due since 2026-11-26T02:00Z"
    assert await box.stored_ids() == [f"schedule:{name}:2026-11-26T02:00Z"]


async def test_failed_publish_is_retried_next_tick(nc: Client, box: Sandbox) -> None:
    """A slot decided while the bus refuses publishes fires on a later tick, even past grace."""
    name = box.name("retry")
    settings = box.settings(
        {name: ScheduleEntry(cron="0 2 * * *", command="verify")}, catch_up="skip"
    )
    clock = Clock(utc(2026, 11, 26, 1, 59))
    broken = {"on": True}

    def subject_for(cmd: Command) -> str:
        return "emrdr.nostream.here" if broken["on"] else box.subject_for(cmd)

    js = nc.jetstream()
    sched = Scheduler(
        js,
        await js.key_value(KV_SCHEDULER),
        settings,
        clock=clock,
        subject_for=subject_for,
    )
    clock.now = utc(2026, 11, 26, 2, 0, 5)
    (result,) = await sched.tick()
    assert result.error is not None and "will retry next tick" in result.error
    assert await box.stored_ids() == []
    assert await sched.read_record(name) is None

    broken["on"] = False
    clock.now = utc(2026, 11, 26, 2, 10)
    (result,) = await sched.tick()
    assert result.published == [utc(2026, 11, 26, 2)]
    assert result.reason == (
        "no slot due since 2026-11-26T02:00Z; retried 2026-11-26T02:00Z after a failed publish"
    )
    assert await box.stored_ids() == [f"schedule:{name}:2026-11-26T02:00Z"]
    record = await sched.read_record(name)
    assert record is not None and record.slot == utc(2026, 11, 26, 2)


async def test_run_loops_until_stopped(nc: Client, box: Sandbox) -> None:
    """``run`` ticks every tick_seconds and returns promptly once the stop event is set."""
    name = box.name("run")
    settings = box.settings(
        {name: ScheduleEntry(cron="*/5 * * * *", command="key_rotation")}, tick_seconds=0.02
    )
    clock = Clock(utc(2026, 11, 26, 9, 59))
    sched = await replica(nc, box, settings=settings, clock=clock, instance="runner")
    stop = asyncio.Event()
    task = asyncio.create_task(sched.run(stop))
    for minute in (0, 5, 10):
        clock.now = utc(2026, 11, 26, 10, minute, 1)
        for _ in range(100):
            record = await sched.read_record(name)
            if record is not None and record.slot == utc(2026, 11, 26, 10, minute):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail(f"slot 10:{minute:02d} was not recorded by the running scheduler")
    stop.set()
    await asyncio.wait_for(task, timeout=2)
    ids = await box.stored_ids()
    assert ids == [f"schedule:{name}:2026-11-26T10:{m:02d}Z" for m in (0, 5, 10)]
