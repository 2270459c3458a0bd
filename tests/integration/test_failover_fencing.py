"""Fencing epochs recorded in PostgreSQL and the three ways to fence an old primary, on a real
PostgreSQL 15 server."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import asyncpg
import pytest

from emrdr.failover.fencing import (
    FencingError,
    StaleEpochError,
    check_epoch,
    fence_old_primary,
    record_epoch,
    recorded_epoch,
)
from tests.fixtures.pg import ClusterFactory

pytestmark = pytest.mark.pg


async def test_epochs_and_fencing_modes(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(n_replicas=0)
    node = cluster.primary
    conn = await node.connect()
    try:
        assert await recorded_epoch(conn) is None
        await record_epoch(conn, 5, node.name, "promoted", "test")
        assert await recorded_epoch(conn) == 5
        await record_epoch(conn, 5, node.name, "checked again", "test")  # same epoch is fine
        assert await check_epoch(conn, 6, node.name) == 5
        with pytest.raises(StaleEpochError, match="pg-primary refuses epoch 4: it has already "
                           "recorded epoch 5"):
            await check_epoch(conn, 4, node.name)
        with pytest.raises(StaleEpochError, match="refuses epoch 3"):
            await record_epoch(conn, 3, node.name, "promoted", "stale coordinator")
        rows = await conn.fetch("SELECT epoch, action FROM emrdr_meta.fencing ORDER BY at")
        assert [(r["epoch"], r["action"]) for r in rows] == [(5, "promoted"), (5, "checked again")]
    finally:
        await conn.close()

    # read-only fence: sessions are cut, new ones cannot write
    client = await node.connect()
    await client.execute("CREATE TABLE visits (id int)")
    with pytest.raises(StaleEpochError):
        await fence_old_primary(node, "read_only", epoch=4)
    result = await fence_old_primary(node, "read_only", epoch=6, actor="test")
    assert result.ok, result.detail
    assert result.detail == (
        "pg-primary fenced read-only at epoch 6 (default_transaction_read_only=on, reloaded) "
        "and 1 client session(s) terminated"
    )
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.AdminShutdownError,
                        asyncpg.InterfaceError, ConnectionError)):
        await client.execute("INSERT INTO visits VALUES (1)")
    client.terminate()
    fresh = await node.connect()
    try:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await fresh.execute("INSERT INTO visits VALUES (2)")
        assert await recorded_epoch(fresh) == 6
    finally:
        await fresh.close()

    # an operator hook receives the node's facts
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fenced"
        hook = (
            f'echo "$EMRDR_FENCE_NODE $EMRDR_FENCE_PORT $EMRDR_FENCE_EPOCH" > {out}; echo done'
        )
        result = await fence_old_primary(node, "hook", epoch=7, hook_command=hook)
        assert result.ok and result.detail == (
            "fencing hook for pg-primary succeeded at epoch 7: done"
        )
        assert out.read_text().split() == ["pg-primary", str(node.port), "7"]
        failing = await fence_old_primary(node, "hook", epoch=7, hook_command="echo no >&2; exit 3")
        assert not failing.ok and failing.detail == "fencing hook for pg-primary exited 3: no"
    with pytest.raises(FencingError, match="needs an operator command"):
        await fence_old_primary(node, "hook", epoch=7)

    # stop: the node goes down and cannot come back writable
    result = await fence_old_primary(node, "stop", epoch=8)
    assert result.ok, result.detail
    assert result.detail.startswith("pg-primary stopped at epoch 8; left standby.signal")
    assert not node.is_running()
    assert (node.data_dir / "standby.signal").exists()
    await asyncio.to_thread(node.start, 30)
    assert node.is_in_recovery()

    # a hung node is killed, never resumed (it could write again before stopping)
    node.sigstop()
    try:
        result = await fence_old_primary(node, "stop", epoch=9, timeout=1.0)
    finally:
        node.sigcont()
    assert result.ok, result.detail
    assert result.detail.startswith(
        "pg-primary stopped at epoch 9; running but not answering, so killed (SIGKILL) "
        "rather than resumed; not reachable (cannot connect to pg-primary"
    )
    assert not node.is_running()
    with pytest.raises(FencingError, match="cannot connect to pg-primary"):
        await fence_old_primary(node, "read_only", epoch=9)
