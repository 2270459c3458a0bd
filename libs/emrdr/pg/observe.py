"""One look at PostgreSQL nodes: reachable? role, timeline, WAL positions and replication lag.

Observation is split into a read (:func:`fetch_facts`, one short connection per node) and pure
derivation (:func:`derive_observation`, :func:`replica_lag_seconds`) so the lag rules are tested
without servers.

Lag rules for a replica (the primary's own lag is not applicable and stays ``None``):

* bytes: primary's current LSN minus the replica's replay LSN when the primary was seen, else
  received minus replayed; never negative.
* seconds: 0 when the replica has replayed everything it received and everything the primary has
  written (an idle, caught-up replica has no lag however old its last replayed commit is);
  otherwise the primary's own measurement (``pg_stat_replication.replay_lag``) when it has one;
  otherwise the age of the last replayed commit if WAL is waiting to be replayed or the replica is
  not streaming; otherwise (streaming, only in-flight WAL missing) 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from emrdr.config import PgNode
from emrdr.messages.events import NodeObservation
from emrdr.pg.lsn import format_lsn, parse_lsn, timeline_of

__all__ = [
    "NodeFacts",
    "derive_observation",
    "fetch_facts",
    "observe_cluster",
    "observe_node",
    "pick_primary",
    "replica_lag_bytes",
    "replica_lag_seconds",
]


@dataclass(frozen=True)
class NodeFacts:
    """Raw facts read from one node in one connection."""

    node: PgNode
    reachable: bool
    error: str | None = None
    in_recovery: bool | None = None
    timeline: int | None = None
    current_lsn: int | None = None
    receive_lsn: int | None = None
    replay_lsn: int | None = None
    replay_age_s: float | None = None
    receiver_streaming: bool = False
    standby_replay_lag: dict[str, float | None] = field(default_factory=dict)
    """Primary only: ``application_name`` -> ``replay_lag`` seconds (None when not measured)."""


def _lsn(text: str | None) -> int | None:
    return parse_lsn(text) if text else None


_PRIMARY_SQL = """
SELECT pg_current_wal_lsn()::text AS lsn, pg_walfile_name(pg_current_wal_lsn()) AS walfile
"""
_SENDERS_SQL = """
SELECT application_name, EXTRACT(EPOCH FROM replay_lag)::float8 AS replay_lag
FROM pg_stat_replication
"""
_REPLICA_SQL = """
SELECT pg_last_wal_receive_lsn()::text AS receive_lsn,
       pg_last_wal_replay_lsn()::text AS replay_lsn,
       EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8 AS age,
       (SELECT received_tli FROM pg_stat_wal_receiver LIMIT 1) AS received_tli,
       (SELECT status FROM pg_stat_wal_receiver LIMIT 1) AS receiver_status,
       (SELECT timeline_id FROM pg_control_checkpoint()) AS checkpoint_tli
"""


async def _read(conn: asyncpg.Connection, node: PgNode) -> NodeFacts:
    in_recovery = bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
    if not in_recovery:
        row = await conn.fetchrow(_PRIMARY_SQL)
        senders = await conn.fetch(_SENDERS_SQL)
        return NodeFacts(
            node=node,
            reachable=True,
            in_recovery=False,
            timeline=timeline_of(row["walfile"]),
            current_lsn=_lsn(row["lsn"]),
            standby_replay_lag={
                str(s["application_name"]): s["replay_lag"] for s in senders
            },
        )
    row = await conn.fetchrow(_REPLICA_SQL)
    timeline = row["received_tli"] or row["checkpoint_tli"]
    return NodeFacts(
        node=node,
        reachable=True,
        in_recovery=True,
        timeline=int(timeline) if timeline else None,
        receive_lsn=_lsn(row["receive_lsn"]),
        replay_lsn=_lsn(row["replay_lsn"]),
        replay_age_s=max(0.0, float(row["age"])) if row["age"] is not None else None,
        receiver_streaming=row["receiver_status"] == "streaming",
    )


async def fetch_facts(
    node: PgNode,
    user: str = "postgres",
    password: str | None = None,
    database: str = "postgres",
    timeout: float = 5.0,
) -> NodeFacts:
    """Read one node; any failure (refused, timeout, auth, SQL) gives ``reachable=False``."""
    conn: asyncpg.Connection | None = None
    try:
        async with asyncio.timeout(timeout):
            conn = await asyncpg.connect(
                host=node.host, port=node.port, user=user, password=password,
                database=database, timeout=timeout,
            )
            return await _read(conn, node)
    except TimeoutError:
        return NodeFacts(node=node, reachable=False, error=f"no answer within {timeout}s")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        return NodeFacts(node=node, reachable=False, error=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a probe must report, never crash the poller
        return NodeFacts(node=node, reachable=False, error=f"{type(exc).__name__}: {exc}")
    finally:
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 1.0)
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                conn.terminate()


# --- pure derivation ----------------------------------------------------------------------


def replica_lag_bytes(
    *, receive_lsn: int | None, replay_lsn: int | None, primary_lsn: int | None
) -> int | None:
    """Bytes the replica's replay is behind the primary (or behind what it received)."""
    if replay_lsn is None:
        return None
    if primary_lsn is not None:
        return max(0, primary_lsn - replay_lsn)
    if receive_lsn is not None:
        return max(0, receive_lsn - replay_lsn)
    return None


def replica_lag_seconds(
    *,
    receive_lsn: int | None,
    replay_lsn: int | None,
    primary_lsn: int | None,
    replay_age_s: float | None,
    receiver_streaming: bool,
    upstream_replay_lag_s: float | None = None,
) -> float | None:
    """Seconds of replay lag by the rules in the module docstring (None when unknowable)."""
    if replay_lsn is None:
        return None
    caught_up_received = receive_lsn is None or replay_lsn >= receive_lsn
    caught_up_primary = primary_lsn is None or replay_lsn >= primary_lsn
    if caught_up_received and caught_up_primary:
        return 0.0
    if upstream_replay_lag_s is not None:
        return max(0.0, upstream_replay_lag_s)
    if not caught_up_received or not receiver_streaming:
        return replay_age_s
    return 0.0


def pick_primary(facts: Sequence[NodeFacts]) -> NodeFacts | None:
    """The reachable non-recovering node on the highest timeline (then highest LSN)."""
    primaries = [f for f in facts if f.reachable and f.in_recovery is False]
    if not primaries:
        return None
    return max(primaries, key=lambda f: (f.timeline or 0, f.current_lsn or 0))


def derive_observation(facts: NodeFacts, primary: NodeFacts | None = None) -> NodeObservation:
    """Turn raw facts (and, for a replica, the primary's) into a NodeObservation."""
    node = facts.node
    if not facts.reachable:
        return NodeObservation(
            name=node.name, host=node.host, port=node.port, reachable=False, error=facts.error
        )
    if facts.in_recovery is False:
        return NodeObservation(
            name=node.name,
            host=node.host,
            port=node.port,
            reachable=True,
            role="primary",
            timeline=facts.timeline,
            current_lsn=format_lsn(facts.current_lsn) if facts.current_lsn is not None else None,
        )
    primary_lsn = primary.current_lsn if primary is not None else None
    upstream = primary.standby_replay_lag.get(node.name) if primary is not None else None
    return NodeObservation(
        name=node.name,
        host=node.host,
        port=node.port,
        reachable=True,
        role="replica",
        timeline=facts.timeline,
        receive_lsn=format_lsn(facts.receive_lsn) if facts.receive_lsn is not None else None,
        replay_lsn=format_lsn(facts.replay_lsn) if facts.replay_lsn is not None else None,
        lag_bytes=replica_lag_bytes(
            receive_lsn=facts.receive_lsn, replay_lsn=facts.replay_lsn, primary_lsn=primary_lsn
        ),
        lag_seconds=replica_lag_seconds(
            receive_lsn=facts.receive_lsn,
            replay_lsn=facts.replay_lsn,
            primary_lsn=primary_lsn,
            replay_age_s=facts.replay_age_s,
            receiver_streaming=facts.receiver_streaming,
            upstream_replay_lag_s=upstream,
        ),
    )


# --- entry points -------------------------------------------------------------------------


async def observe_node(
    node: PgNode,
    user: str = "postgres",
    password: str | None = None,
    database: str = "postgres",
    timeout: float = 5.0,
    *,
    primary_lsn: int | str | None = None,
) -> NodeObservation:
    """Observe one node; pass the primary's current LSN to measure a replica against it."""
    facts = await fetch_facts(node, user, password, database, timeout)
    primary = None
    if primary_lsn is not None:
        lsn = parse_lsn(primary_lsn) if isinstance(primary_lsn, str) else primary_lsn
        primary = NodeFacts(
            node=PgNode(name="(primary)"), reachable=True, in_recovery=False, current_lsn=lsn
        )
    return derive_observation(facts, primary)


async def observe_cluster(
    nodes: Sequence[PgNode],
    user: str = "postgres",
    password: str | None = None,
    database: str = "postgres",
    timeout: float = 5.0,
) -> list[NodeObservation]:
    """Observe all nodes concurrently; replicas are measured against the primary found."""
    facts = await asyncio.gather(
        *(fetch_facts(n, user, password, database, timeout) for n in nodes)
    )
    primary = pick_primary(facts)
    return [derive_observation(f, primary) for f in facts]
