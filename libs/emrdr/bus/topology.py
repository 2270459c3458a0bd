"""Streams, consumers and key-value buckets: declared here, in one place, and nowhere else.

Services bind to streams with ``declare=False``; only :func:`bootstrap` creates or updates them
(faststream would otherwise overwrite a stream's config with a service's idea of it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

log = logging.getLogger(__name__)

SEVEN_YEARS_S = 7 * 366 * 24 * 3600.0

COMMANDS_STREAM = "COMMANDS"
EVENTS_STREAM = "EVENTS"
AUDIT_STREAM = "AUDIT"

COMMANDS_SUBJECTS = "emrdr.cmd.>"
EVENTS_SUBJECTS = "emrdr.evt.>"
AUDIT_SUBJECTS = "emrdr.audit.>"
AUDIT_ENTRY_SUBJECT = "emrdr.audit.entry"

KV_TOPOLOGY = "emrdr_topology"
KV_LEASES = "emrdr_leases"
KV_HEARTBEATS = "emrdr_heartbeats"
KV_SCHEDULER = "emrdr_scheduler"


def commands_stream(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=COMMANDS_STREAM,
        description="Commands to emrdr services (work queue: each taken by one service)",
        subjects=[COMMANDS_SUBJECTS],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_age=30 * 24 * 3600.0,
        duplicate_window=3600.0,
        num_replicas=replicas,
    )


def events_stream(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=EVENTS_STREAM,
        description="Facts published by emrdr services and other systems",
        subjects=[EVENTS_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=90 * 24 * 3600.0,
        duplicate_window=3600.0,
        num_replicas=replicas,
    )


def audit_stream(replicas: int = 1) -> StreamConfig:
    """Append-only audit trail: nothing deletes, purges, rolls up or evicts an entry."""
    return StreamConfig(
        name=AUDIT_STREAM,
        description="Hash-chained audit trail; only the audit-logger publishes here",
        subjects=[AUDIT_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_age=SEVEN_YEARS_S,
        deny_delete=True,
        deny_purge=True,
        allow_rollup_hdrs=False,
        duplicate_window=3600.0,
        num_replicas=replicas,
    )


@dataclass(frozen=True)
class BucketSpec:
    name: str
    description: str
    ttl: float | None = None
    history: int = 1


BUCKETS: tuple[BucketSpec, ...] = (
    BucketSpec(KV_TOPOLOGY, "Cluster topology: current primary, nodes, fencing epoch", history=10),
    BucketSpec(KV_LEASES, "Coordinator lease (compare-and-set, TTL)", ttl=10.0),
    BucketSpec(KV_HEARTBEATS, "Service heartbeats", ttl=30.0),
    BucketSpec(KV_SCHEDULER, "Scheduler: last slot fired per schedule", history=5),
)


def stream_configs(replicas: int = 1) -> list[StreamConfig]:
    return [commands_stream(replicas), events_stream(replicas), audit_stream(replicas)]


async def bootstrap(js: JetStreamContext, replicas: int = 1) -> list[str]:
    """Create every stream and bucket; update streams whose config differs (never AUDIT's
    retention downward). Returns a line per action taken."""
    actions: list[str] = []
    for cfg in stream_configs(replicas):
        assert cfg.name is not None
        try:
            info = await js.stream_info(cfg.name)
        except NotFoundError:
            await js.add_stream(cfg)
            actions.append(f"created stream {cfg.name}")
            continue
        current = info.config
        if cfg.name == AUDIT_STREAM and (current.max_age or 0) > (cfg.max_age or 0):
            raise RuntimeError("refusing to shorten the AUDIT stream's retention")
        if _differs(current, cfg):
            await js.update_stream(cfg)
            actions.append(f"updated stream {cfg.name}")
    for spec in BUCKETS:
        try:
            await js.key_value(spec.name)
        except BucketNotFoundError:
            await js.create_key_value(
                KeyValueConfig(
                    bucket=spec.name,
                    description=spec.description,
                    ttl=spec.ttl,
                    history=spec.history,
                    storage=StorageType.FILE,
                    replicas=replicas,
                )
            )
            actions.append(f"created bucket {spec.name}")
    return actions


def _differs(current: StreamConfig, wanted: StreamConfig) -> bool:
    keys = (
        "subjects",
        "retention",
        "discard",
        "max_age",
        "deny_delete",
        "deny_purge",
        "allow_rollup_hdrs",
        "duplicate_window",
    )
    return any(getattr(current, k) != getattr(wanted, k) for k in keys)
