"""Carry out a FAILOVER decision on local nodes, one observable step at a time.

Steps, in order (each returns a :class:`StepResult` the service publishes as an event):

1. ``check-epoch`` - the target has not recorded a newer epoch than ours (else we are stale).
2. ``fence-old-primary`` - by the configured mode; an unreachable old primary is stopped and
   disarmed instead (its data directory is local), so it cannot come back writable.
3. ``promote`` - ``pg_ctl promote`` on the target, waiting until it leaves recovery.
4. ``record-epoch`` - write our epoch on the new primary: proof that it accepts writes.
5. ``repoint:<node>`` - every other node follows the new primary.

A failed step among 1-4 stops the failover (later steps are not run; the caller pages).
Re-pointing runs for every other node even if one of them fails.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from emrdr.failover.decide import Action, Decision
from emrdr.failover.fencing import (
    FencingError,
    check_epoch,
    connect_target,
    fence_old_primary,
    record_epoch,
)
from emrdr.failover.settings import FailoverSettings
from emrdr.pg.instance import PgError, PgInstance

__all__ = ["FailoverAborted", "StepResult", "execute_failover", "failover_succeeded"]

OnStep = Callable[["StepResult"], Awaitable[None] | None]


class FailoverAborted(RuntimeError):
    """The decision cannot be executed as given (not a failover, unknown target)."""


@dataclass(frozen=True)
class StepResult:
    name: str
    ok: bool
    detail: str
    seconds: float


class StepLog:
    """The steps of one procedure as they complete: each is timed, kept, and handed to
    ``on_step`` (sync or async) so a service can publish it as it happens."""

    def __init__(self, on_step: Callable[[StepResult], Any] | None = None) -> None:
        self.steps: list[StepResult] = []
        self.on_step = on_step

    async def record(self, name: str, ok: bool, detail: str, started: float) -> StepResult:
        result = StepResult(name, ok, detail, round(time.perf_counter() - started, 3))
        self.steps.append(result)
        if self.on_step is not None:
            out = self.on_step(result)
            if inspect.isawaitable(out):
                await out
        return result


def failover_succeeded(steps: list[StepResult]) -> bool:
    """Whether every step ran and succeeded up to and including ``record-epoch``."""
    names = {s.name for s in steps if s.ok}
    return "record-epoch" in names and all(s.ok for s in steps)


async def _fence(
    old: PgInstance | None,
    old_name: str | None,
    *,
    reachable: bool | None,
    epoch: int,
    settings: FailoverSettings,
    actor: str,
) -> tuple[bool, str]:
    if old is None:
        return True, f"no old primary to fence ({old_name or 'none recorded'})"
    mode = settings.fence_mode
    if mode == "hook":
        r = await fence_old_primary(
            old, "hook", epoch=epoch, actor=actor, hook_command=settings.fence_hook
        )
        return r.ok, r.detail
    if mode == "read_only" and reachable is not False:
        try:
            r = await fence_old_primary(old, "read_only", epoch=epoch, actor=actor)
            return r.ok, r.detail
        except FencingError as exc:
            if "cannot connect" not in str(exc):
                raise
            note = f"{old.name} not reachable for a read-only fence ({exc}); stopping it instead"
    else:
        note = (
            f"{old.name} not reachable; stopping it" if mode == "read_only" else ""
        )
    r = await fence_old_primary(old, "stop", epoch=epoch, actor=actor)
    return r.ok, (note + ": " if note else "") + r.detail


async def execute_failover(
    decision: Decision,
    nodes: Mapping[str, PgInstance],
    *,
    old_primary: str | None,
    epoch: int,
    settings: FailoverSettings | None = None,
    old_primary_reachable: bool | None = None,
    actor: str = "dr-coordinator",
    on_step: OnStep | None = None,
    promote_timeout: float = 60.0,
) -> list[StepResult]:
    """Perform ``decision`` (action FAILOVER) on ``nodes``; returns the steps run, in order.

    ``old_primary_reachable=False`` skips trying SQL on a primary known to be down.
    Raises FailoverAborted before doing anything if the decision is not a runnable failover.
    """
    if decision.action is not Action.FAILOVER or decision.target is None:
        raise FailoverAborted(
            f"not a failover decision: {decision.action.value}: {decision.reason}"
        )
    if decision.target not in nodes:
        raise FailoverAborted(f"failover target {decision.target} is not a known node")
    settings = settings or FailoverSettings()
    target = nodes[decision.target]
    old = nodes.get(old_primary) if old_primary else None
    log = StepLog(on_step)
    steps = log.steps
    step = log.record

    # 1. the target must not know a newer epoch than ours
    t = time.perf_counter()
    try:
        conn = await connect_target(target)
        try:
            recorded = await check_epoch(conn, epoch, target.name)
        finally:
            await conn.close()
        ok, detail = True, (
            f"{target.name} recorded epoch {recorded if recorded is not None else 'none'}; "
            f"ours is {epoch}"
        )
    except FencingError as exc:
        ok, detail = False, str(exc)
    if not (await step("check-epoch", ok, detail, t)).ok:
        return steps

    # 2. fence the old primary
    t = time.perf_counter()
    try:
        ok, detail = await _fence(
            old, old_primary, reachable=old_primary_reachable, epoch=epoch,
            settings=settings, actor=actor,
        )
    except (FencingError, PgError, OSError) as exc:
        ok, detail = False, f"fencing {old_primary} failed: {exc}"
    if not (await step("fence-old-primary", ok, detail, t)).ok:
        return steps

    # 3. promote
    t = time.perf_counter()
    try:
        await asyncio.to_thread(target.promote, promote_timeout)
        ok, detail = True, f"{target.name} promoted"
    except PgError as exc:
        ok, detail = False, str(exc)
    if not (await step("promote", ok, detail, t)).ok:
        return steps

    # 4. record our epoch on the new primary (and so prove it takes writes)
    t = time.perf_counter()
    try:
        conn = await connect_target(target)
        try:
            await record_epoch(conn, epoch, target.name, "promoted", actor)
        finally:
            await conn.close()
        ok, detail = True, f"{target.name} accepts writes; epoch {epoch} recorded"
    except FencingError as exc:
        ok, detail = False, str(exc)
    if not (await step("record-epoch", ok, detail, t)).ok:
        return steps

    # 5. every other node follows the new primary
    for name, inst in nodes.items():
        if name in (target.name, old_primary):
            continue
        t = time.perf_counter()
        try:
            detail = await asyncio.to_thread(inst.reconfigure_upstream, target)
            ok = True
        except (PgError, OSError) as exc:
            ok, detail = False, f"re-pointing {name} to {target.name} failed: {exc}"
        await step(f"repoint:{name}", ok, detail, t)
    return steps
