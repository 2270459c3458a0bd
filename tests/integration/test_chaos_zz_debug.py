from __future__ import annotations
import asyncio
from typing import Any
from emrdr.bus.publish import publish
from emrdr.messages.commands import Switchover
from tests.integration.test_coordinator_failover import Rig, bus, nats_srv, rig_factory  # noqa

async def test_dbg(rig_factory: Any) -> None:  # noqa
    rig: Rig = await rig_factory()
    js = rig.bus.jetstream()
    await asyncio.sleep(0.5)
    cmd = rig.operator.sign(Switchover(issuer=rig.operator.issuer, to_node="pg-replica-1"))
    before = len(rig.load.acked)
    await publish(js, cmd)
    await rig.wait_for(lambda: rig.of("FailoverCompleted") or rig.of("FailoverFailed"), 60, "x")
    await rig.wait_for(lambda: len(rig.load.acked) > before + 20, 10, "writes on the new primary")
    lost = await rig.lost_commits("pg-replica-1")
    rig.load.stop.set()
    await asyncio.sleep(0.5)
    lost2 = await rig.lost_commits("pg-replica-1")
    open("/tmp/dbg/out.txt", "a").write(f"first={lost} after-stop={lost2} acked={len(rig.load.acked)}\n")
    assert not lost2
