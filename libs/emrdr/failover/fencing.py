"""Fencing at PostgreSQL itself: epochs recorded in the database, and fencing an old primary.

Every failover action carries the lease's epoch (:mod:`emrdr.failover.lease`). Each node keeps
the epochs that acted on it in ``emrdr_meta.fencing`` (database ``postgres``); the table
replicates, so a replica knows what its primary recorded. An actor whose epoch is lower than the
node's newest recorded epoch is refused with :class:`StaleEpochError`: a coordinator that lost
its lease without noticing cannot undo a newer coordinator's work.

Fencing an old primary (:func:`fence_old_primary`), by mode:

* ``read_only`` - record the epoch, ``ALTER SYSTEM SET default_transaction_read_only = on``,
  reload, terminate client sessions. A soft fence: a client may still ``SET`` it off, so use
  ``stop`` or ``hook`` where that matters.
* ``stop`` - record the epoch if reachable, ``pg_ctl stop -m immediate`` (local nodes only; a
  running node that does not answer is SIGKILLed, never resumed), and leave ``standby.signal``
  so a restart comes back in recovery, never as a second primary.
* ``hook`` - run the operator's command with ``EMRDR_FENCE_NODE``, ``_HOST``, ``_PORT``,
  ``_EPOCH``, ``_DATA_DIR`` in its environment (e.g. to cut power or a network port).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import asyncpg

from emrdr.config import PgNode
from emrdr.failover.settings import FenceMode
from emrdr.pg.instance import PgError, PgInstance

__all__ = [
    "FENCING_TABLE",
    "FenceResult",
    "FencingError",
    "StaleEpochError",
    "Target",
    "check_epoch",
    "connect_target",
    "disarm",
    "ensure_fencing_table",
    "fence_old_primary",
    "record_epoch",
    "recorded_epoch",
]

FENCING_TABLE = "emrdr_meta.fencing"

_SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS emrdr_meta;
CREATE TABLE IF NOT EXISTS emrdr_meta.fencing (
    epoch  bigint      NOT NULL,
    node   text        NOT NULL,
    action text        NOT NULL,
    actor  text        NOT NULL DEFAULT '',
    at     timestamptz NOT NULL DEFAULT now()
);
"""

Target = PgInstance | PgNode | str
"""A node to act on: a local instance, a configured node, or a ``postgresql://`` DSN."""


class FencingError(RuntimeError):
    """A fencing step could not be done; the message names the node and what failed."""


class StaleEpochError(FencingError):
    """The actor's epoch is older than one the node has already recorded."""


@dataclass(frozen=True)
class FenceResult:
    ok: bool
    mode: str
    detail: str


def _name(target: Target) -> str:
    if isinstance(target, PgInstance | PgNode):
        return target.name
    return target.rsplit("@", 1)[-1]


async def connect_target(
    target: Target,
    *,
    user: str = "postgres",
    password: str | None = None,
    database: str = "postgres",
    timeout: float = 5.0,
) -> asyncpg.Connection:
    """An asyncpg connection to ``target`` (raises FencingError naming it when it fails)."""
    try:
        if isinstance(target, PgInstance):
            return await target.connect(database, timeout=timeout)
        if isinstance(target, PgNode):
            return await asyncpg.connect(
                host=target.host, port=target.port, user=user, password=password,
                database=database, timeout=timeout,
            )
        return await asyncpg.connect(target, timeout=timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise FencingError(
            f"cannot connect to {_name(target)}: {type(exc).__name__}: {exc}"
        ) from exc


async def ensure_fencing_table(conn: asyncpg.Connection) -> None:
    await conn.execute(_SCHEMA_SQL)


async def recorded_epoch(conn: asyncpg.Connection) -> int | None:
    """The newest epoch recorded on this node (None if none, or no table yet)."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", FENCING_TABLE)
    if not exists:
        return None
    value = await conn.fetchval(f"SELECT max(epoch) FROM {FENCING_TABLE}")
    return int(value) if value is not None else None


def _refuse(node: str, epoch: int, recorded: int) -> StaleEpochError:
    return StaleEpochError(
        f"{node} refuses epoch {epoch}: it has already recorded epoch {recorded}, so a newer "
        "coordinator has acted; this one must stand down"
    )


async def check_epoch(conn: asyncpg.Connection, epoch: int, node: str) -> int | None:
    """Raise :class:`StaleEpochError` if ``node`` recorded a newer epoch; returns the recorded."""
    recorded = await recorded_epoch(conn)
    if recorded is not None and recorded > epoch:
        raise _refuse(node, epoch, recorded)
    return recorded


async def record_epoch(
    conn: asyncpg.Connection, epoch: int, node: str, action: str, actor: str = ""
) -> None:
    """Record that ``actor`` did ``action`` on ``node`` at ``epoch``; refuse a stale epoch.

    Runs in one read-write transaction holding a lock on the table, committed locally (a
    synchronous standby that is gone must not hang the fence). Raises FencingError when the
    node cannot write (a standby, say).
    """
    try:
        await conn.execute("BEGIN READ WRITE")
        try:
            await conn.execute("SET LOCAL synchronous_commit = local")
            await ensure_fencing_table(conn)
            await conn.execute(f"LOCK TABLE {FENCING_TABLE} IN SHARE ROW EXCLUSIVE MODE")
            recorded = await conn.fetchval(f"SELECT max(epoch) FROM {FENCING_TABLE}")
            if recorded is not None and int(recorded) > epoch:
                raise _refuse(node, epoch, int(recorded))
            await conn.execute(
                f"INSERT INTO {FENCING_TABLE} (epoch, node, action, actor) VALUES ($1, $2, $3, $4)",
                epoch, node, action, actor,
            )
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        await conn.execute("COMMIT")
    except asyncpg.PostgresError as exc:
        raise FencingError(f"cannot record epoch {epoch} on {node}: {exc}") from exc


def disarm(instance: PgInstance) -> str:
    """Leave ``standby.signal`` in a local data directory so a restart cannot bring the node
    back as a writable primary."""
    signal_file = instance.data_dir / "standby.signal"
    if not instance.data_dir.is_dir():
        return f"{instance.name}: no data directory at {instance.data_dir}; nothing to disarm"
    signal_file.write_text("")
    if not instance.user.is_current:
        os.chown(signal_file, instance.user.uid, instance.user.gid)
    return f"left standby.signal in {instance.name}'s data directory (a restart stays in recovery)"


async def _read_only(target: Target, epoch: int, actor: str, timeout: float) -> FenceResult:
    node = _name(target)
    conn = await connect_target(target, timeout=timeout)
    try:
        await conn.execute("SET default_transaction_read_only = off")  # re-fencing is allowed
        await check_epoch(conn, epoch, node)
        await record_epoch(conn, epoch, node, "fenced read-only", actor)
        await conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        await conn.execute("SELECT pg_reload_conf()")
        terminated = await conn.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
    except asyncpg.PostgresError as exc:
        raise FencingError(f"fencing {node} read-only failed: {exc}") from exc
    finally:
        await conn.close()
    confirmed = await _confirm_read_only(target, timeout)
    detail = (
        f"{node} fenced read-only at epoch {epoch} (default_transaction_read_only=on, "
        f"reloaded) and {terminated} client session(s) terminated"
    )
    if not confirmed:
        return FenceResult(False, "read_only", detail + ", but a new session is still read-write")
    return FenceResult(True, "read_only", detail)


async def _confirm_read_only(target: Target, timeout: float) -> bool:
    """A new session sees ``default_transaction_read_only = on`` (the reload is asynchronous)."""
    deadline = time.monotonic() + min(timeout, 5.0)
    while True:
        conn = await connect_target(target, timeout=timeout)
        try:
            if await conn.fetchval("SHOW default_transaction_read_only") == "on":
                return True
        finally:
            await conn.close()
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)


async def _stop(target: Target, epoch: int, actor: str, timeout: float) -> FenceResult:
    if not isinstance(target, PgInstance):
        raise FencingError(f"fence mode 'stop' needs a local node; {_name(target)} is not one")
    notes: list[str] = []
    reachable = True
    try:
        conn = await connect_target(target, timeout=min(timeout, 2.0))
    except FencingError as exc:
        reachable = False
        notes.append(f"not reachable ({exc}), epoch not recorded there")
    else:
        try:
            await check_epoch(conn, epoch, target.name)
            await record_epoch(conn, epoch, target.name, "fenced by stop", actor)
        except FencingError as exc:
            if isinstance(exc, StaleEpochError):
                raise
            notes.append(f"epoch not recorded ({exc})")
        finally:
            await conn.close()
    was_running = target.is_running()
    if was_running and not reachable:
        # Hung (SIGSTOP, stuck I/O): resuming it for a clean stop would let it write again.
        await asyncio.to_thread(target.kill9)
        notes.insert(0, "running but not answering, so killed (SIGKILL) rather than resumed")
    else:
        try:
            await asyncio.to_thread(target.stop, "immediate", timeout)
        except PgError as exc:
            notes.append(f"pg_ctl stop failed ({exc}); killed it")
            await asyncio.to_thread(target.kill9)
    if target.is_running():
        return FenceResult(False, "stop", f"{target.name} is still running after stop and kill")
    notes.append(disarm(target))
    state = "stopped" if was_running else "not running"
    return FenceResult(
        True, "stop", f"{target.name} {state} at epoch {epoch}; " + "; ".join(notes)
    )


async def _hook(
    target: Target, epoch: int, command: str | None, timeout: float
) -> FenceResult:
    if not command:
        raise FencingError("fence mode 'hook' needs an operator command (fence_hook)")
    env = dict(os.environ, EMRDR_FENCE_NODE=_name(target), EMRDR_FENCE_EPOCH=str(epoch))
    if isinstance(target, PgInstance | PgNode):
        env["EMRDR_FENCE_HOST"] = target.host
        env["EMRDR_FENCE_PORT"] = str(target.port)
        data_dir = target.data_dir
        if data_dir is not None:
            env["EMRDR_FENCE_DATA_DIR"] = str(data_dir)
    proc = await asyncio.create_subprocess_shell(
        command, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return FenceResult(False, "hook", f"fencing hook for {_name(target)} ran over {timeout}s")
    text = out.decode(errors="replace").strip()[-500:]
    if proc.returncode != 0:
        return FenceResult(
            False, "hook", f"fencing hook for {_name(target)} exited {proc.returncode}: {text}"
        )
    return FenceResult(
        True, "hook", f"fencing hook for {_name(target)} succeeded at epoch {epoch}"
        + (f": {text}" if text else "")
    )


async def fence_old_primary(
    target: Target,
    mode: FenceMode,
    *,
    epoch: int,
    actor: str = "dr-coordinator",
    hook_command: str | None = None,
    timeout: float = 10.0,
) -> FenceResult:
    """Fence ``target`` by ``mode``. Raises StaleEpochError if the node recorded a newer epoch,
    FencingError when the mode cannot be applied (unreachable for read_only, not local for
    stop, no command for hook); a hook's non-zero exit is a result with ``ok=False``."""
    if mode == "read_only":
        return await _read_only(target, epoch, actor, timeout)
    if mode == "stop":
        return await _stop(target, epoch, actor, timeout)
    if mode == "hook":
        return await _hook(target, epoch, hook_command, timeout)
    raise ValueError(f"fence mode must be read_only, stop or hook, not {mode!r}")
