"""A planned change of primary with no data loss, one observable step at a time.

Steps (each a :class:`~emrdr.failover.execute.StepResult`):

1. ``check-target`` - the target is a running standby of the current primary.
2. ``check-epoch`` - neither node recorded a newer epoch than ours; ours is recorded on the old
   primary (it replicates to the target).
3. ``stop-old-primary`` - a clean (fast) shutdown: every committed transaction and the shutdown
   checkpoint are sent to connected standbys first. Its final checkpoint LSN is read back.
4. ``wait-replay`` - the target has replayed *past* that final LSN, i.e. the shutdown checkpoint
   record itself (nothing acknowledged is left behind, and the new timeline forks after the old
   primary's last record, so it can follow without a rewind); otherwise the old primary is
   restarted as it was and the switchover stops.
5. ``promote`` and ``record-epoch`` on the target.
6. ``rejoin-old-primary`` - the old primary follows the target (it stopped cleanly before the
   fork, so no rewind is needed), starts in recovery and is seen streaming from the target.
7. ``repoint:<node>`` for every other node.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Mapping

from emrdr.failover.execute import OnStep, StepLog, StepResult
from emrdr.failover.fencing import FencingError, check_epoch, connect_target, record_epoch
from emrdr.pg.instance import PgError, PgInstance
from emrdr.pg.lsn import format_lsn, parse_lsn
from emrdr.pg.osuser import run_as

__all__ = [
    "execute_switchover",
    "final_checkpoint_lsn",
    "parse_checkpoint_lsn",
    "replayed_past",
]


def parse_checkpoint_lsn(controldata: str) -> int:
    """``Latest checkpoint location`` from ``pg_controldata`` output."""
    m = re.search(r"^Latest checkpoint location:\s+([0-9A-Fa-f]+/[0-9A-Fa-f]+)\s*$",
                  controldata, re.M)
    if not m:
        raise PgError("pg_controldata output has no 'Latest checkpoint location'")
    return parse_lsn(m.group(1))


def final_checkpoint_lsn(node: PgInstance) -> int:
    """The last checkpoint of a stopped node (its shutdown checkpoint after a clean stop)."""
    try:
        proc = run_as(node.user, [node.bin("pg_controldata"), "-D", str(node.data_dir)],
                      cwd=node.base_dir, timeout=30)
    except subprocess.CalledProcessError as exc:
        raise PgError(f"pg_controldata of {node.name} failed: {exc.stderr.strip()}") from exc
    state = re.search(r"^Database cluster state:\s+(.*)$", proc.stdout, re.M)
    if state is None or state.group(1).strip() != "shut down":
        found = state.group(1).strip() if state else "unknown"
        raise PgError(f"{node.name} did not shut down cleanly (cluster state: {found})")
    return parse_checkpoint_lsn(proc.stdout)


async def _replayed(target: PgInstance) -> int | None:
    conn = await connect_target(target, timeout=3)
    try:
        value = await conn.fetchval("SELECT pg_last_wal_replay_lsn()::text")
    finally:
        await conn.close()
    return parse_lsn(value) if value else None


def replayed_past(replayed: int | None, final_checkpoint: int) -> bool:
    """Whether a standby replayed the old primary's shutdown checkpoint record.

    ``pg_last_wal_replay_lsn()`` is the *end* of the last replayed record and ``final_checkpoint``
    the *start* of the checkpoint record, so only ``>`` proves the record was replayed (the
    record before it may end exactly where it starts). Promoting before that forks the new
    timeline before the old primary's last record, and the old primary could not follow.
    """
    return replayed is not None and replayed > final_checkpoint


async def _streaming_from(node: PgInstance, upstream: PgInstance, timeout: float) -> str | None:
    """Wait until ``node``'s WAL receiver streams from ``upstream``; None, or why not."""
    deadline = time.monotonic() + timeout
    seen = "no WAL receiver"
    while True:
        try:
            conn = await connect_target(node, timeout=3)
            try:
                row = await conn.fetchrow(
                    "SELECT status, sender_port FROM pg_stat_wal_receiver"
                )
            finally:
                await conn.close()
            if row is not None:
                seen = f"WAL receiver {row['status']} (sender port {row['sender_port']})"
                if row["status"] == "streaming" and row["sender_port"] == upstream.port:
                    return None
        except FencingError as exc:
            seen = str(exc)
        if time.monotonic() >= deadline:
            return f"{node.name} is not streaming from {upstream.name} after {timeout:.0f}s: {seen}"
        await asyncio.sleep(0.1)


async def execute_switchover(
    nodes: Mapping[str, PgInstance],
    *,
    old_primary: str,
    target: str,
    epoch: int,
    actor: str = "dr-coordinator",
    on_step: OnStep | None = None,
    timeout: float = 60.0,
) -> list[StepResult]:
    """Switch the primary role from ``old_primary`` to ``target``; returns the steps run.

    A failed step stops the switchover; before the promotion, the old primary is restarted as
    primary so the cluster is as it was.
    """
    log = StepLog(on_step)
    steps = log.steps

    async def step(name: str, ok: bool, detail: str, started: float) -> bool:
        return (await log.record(name, ok, detail, started)).ok

    t = time.perf_counter()
    missing = [n for n in (old_primary, target) if n not in nodes]
    if missing or old_primary == target:
        why = (f"{', '.join(missing)} not a local node" if missing
               else f"{target} is already the primary")
        await step("check-target", False, why, t)
        return steps
    old, new = nodes[old_primary], nodes[target]
    try:
        in_recovery = await asyncio.to_thread(new.is_in_recovery)
        ok = in_recovery and new.is_running()
        detail = (f"{target} is a running standby" if ok
                  else f"{target} is not a standby (it runs as a primary)")
    except PgError as exc:
        ok, detail = False, f"{target} does not answer: {exc}"
    if not await step("check-target", ok, detail, t):
        return steps

    t = time.perf_counter()
    try:
        for inst in (new, old):
            conn = await connect_target(inst)
            try:
                await check_epoch(conn, epoch, inst.name)
                if inst is old:
                    await record_epoch(conn, epoch, old.name, f"switchover to {target}", actor)
            finally:
                await conn.close()
        ok, detail = True, f"epoch {epoch} recorded on {old_primary}"
    except FencingError as exc:
        ok, detail = False, str(exc)
    if not await step("check-epoch", ok, detail, t):
        return steps

    t = time.perf_counter()
    try:
        await asyncio.to_thread(old.stop, "fast", timeout)
        final = await asyncio.to_thread(final_checkpoint_lsn, old)
        ok, detail = True, f"{old_primary} stopped cleanly; final checkpoint {format_lsn(final)}"
    except PgError as exc:
        ok, detail, final = False, f"stopping {old_primary} cleanly failed: {exc}", 0
    if not await step("stop-old-primary", ok, detail, t):
        if not old.is_running():
            await asyncio.to_thread(old.start, timeout)
        return steps

    t = time.perf_counter()
    deadline = time.monotonic() + timeout
    replayed: int | None = None
    while True:
        try:
            replayed = await _replayed(new)
        except FencingError:
            replayed = None
        if replayed_past(replayed, final):
            assert replayed is not None
            ok, detail = True, (f"{target} replayed {format_lsn(replayed)}, past the final "
                                f"checkpoint {format_lsn(final)}")
            break
        if time.monotonic() >= deadline:
            seen = format_lsn(replayed) if replayed is not None else "nothing"
            ok, detail = False, (f"{target} replayed only {seen} of {format_lsn(final)} "
                                 f"within {timeout}s; {old_primary} restarted as primary")
            break
        await asyncio.sleep(0.05)
    if not ok:
        await asyncio.to_thread(old.start, timeout)
    if not await step("wait-replay", ok, detail, t):
        return steps

    t = time.perf_counter()
    try:
        await asyncio.to_thread(new.promote, timeout)
        ok, detail = True, f"{target} promoted"
    except PgError as exc:
        ok, detail = False, str(exc)
    if not await step("promote", ok, detail, t):
        return steps

    t = time.perf_counter()
    try:
        conn = await connect_target(new)
        try:
            await record_epoch(conn, epoch, target, "promoted by switchover", actor)
        finally:
            await conn.close()
        ok, detail = True, f"{target} accepts writes; epoch {epoch} recorded"
    except FencingError as exc:
        ok, detail = False, str(exc)
    if not await step("record-epoch", ok, detail, t):
        return steps

    t = time.perf_counter()
    try:
        follow = await asyncio.to_thread(old.reconfigure_upstream, new)
        await asyncio.to_thread(old.start, timeout)
        problem = await _streaming_from(old, new, min(timeout, 15.0))
        ok = problem is None
        detail = f"{follow}; started in recovery" + (f"; but {problem}" if problem else
                                                     f"; streaming from {target}")
    except (PgError, OSError) as exc:
        ok, detail = False, f"{old_primary} could not rejoin as a standby: {exc}"
    await step("rejoin-old-primary", ok, detail, t)

    for name, inst in nodes.items():
        if name in (target, old_primary):
            continue
        t = time.perf_counter()
        try:
            detail = await asyncio.to_thread(inst.reconfigure_upstream, new)
            ok = True
        except (PgError, OSError) as exc:
            ok, detail = False, f"re-pointing {name} to {target} failed: {exc}"
        await step(f"repoint:{name}", ok, detail, t)
    return steps
