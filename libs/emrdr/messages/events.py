"""Events: facts, past tense, published to the EVENTS stream (``emrdr.evt.>``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from emrdr.messages.base import Event, Issuer, Outcome, register

# --- commands as seen by the services that take them -------------------------------------


@register
class CommandReceived(Event):
    """A service took a command off the queue and checked who sent it (allowed or denied)."""

    subject: ClassVar[str] = "emrdr.evt.command.received"
    command_type: str
    command_id: str
    command_subject: str
    issuer: Issuer
    authorized: bool
    reason: str = Field(description="Why it was allowed or denied.")
    command: dict[str, Any] = Field(description="The command as received.")


@register
class CommandRejected(Event):
    """A command was refused (bad signature, role not allowed, engine not available)."""

    subject: ClassVar[str] = "emrdr.evt.command.rejected"
    outcome: ClassVar[Outcome | None] = "failure"
    command_type: str
    command_id: str
    actor: str
    reason: str


@register
class MessageDeadLettered(Event):
    """A message could not be processed and was moved aside, never silently dropped."""

    subject: ClassVar[str] = "emrdr.evt.deadletter.stored"
    outcome: ClassVar[Outcome | None] = "failure"
    original_subject: str
    stream_sequence: int | None = None
    deliveries: int
    reason: str
    payload_b64: str = Field(description="The original message bytes, base64.")


# --- backups ------------------------------------------------------------------------------


@register
class BackupStarted(Event):
    subject: ClassVar[str] = "emrdr.evt.backup.started"
    outcome: ClassVar[Outcome | None] = "progress"
    backup_id: str
    kind: Literal["full", "incremental"]
    source_node: str | None = None
    dry_run: bool = False


@register
class BackupProgressed(Event):
    subject: ClassVar[str] = "emrdr.evt.backup.progressed"
    outcome: ClassVar[Outcome | None] = "progress"
    backup_id: str
    bytes_done: int
    bytes_total: int
    files_done: int = 0
    files_total: int = 0


@register
class BackupCompleted(Event):
    subject: ClassVar[str] = "emrdr.evt.backup.completed"
    outcome: ClassVar[Outcome | None] = "success"
    backup_id: str
    kind: Literal["full", "incremental"]
    bytes_source: int = Field(description="Bytes read from the cluster.")
    bytes_stored: int = Field(description="New bytes written to the repository.")
    dedup_ratio: float
    duration_s: float
    throughput_mb_s: float
    start_lsn: str | None = None
    stop_lsn: str | None = None
    timeline: int | None = None
    degraded: bool = False
    verify_requested: bool = False
    dry_run: bool = False


@register
class BackupFailed(Event):
    subject: ClassVar[str] = "emrdr.evt.backup.failed"
    outcome: ClassVar[Outcome | None] = "failure"
    backup_id: str | None = None
    error: str


# --- restores -----------------------------------------------------------------------------


@register
class RestoreStarted(Event):
    subject: ClassVar[str] = "emrdr.evt.restore.started"
    outcome: ClassVar[Outcome | None] = "progress"
    backup_id: str
    target: str


@register
class RestoreProgressed(Event):
    subject: ClassVar[str] = "emrdr.evt.restore.progressed"
    outcome: ClassVar[Outcome | None] = "progress"
    backup_id: str
    bytes_done: int
    bytes_total: int


@register
class RestoreCompleted(Event):
    subject: ClassVar[str] = "emrdr.evt.restore.completed"
    outcome: ClassVar[Outcome | None] = "success"
    backup_id: str
    target: str
    bytes_restored: int
    duration_s: float
    reached: str | None = Field(default=None, description="Recovery point actually reached.")
    notes: list[str] = Field(
        default_factory=list,
        description="What the operator should know about the restored server (e.g. a setting "
        "that differs from its configuration until its next restart).",
    )


@register
class RestoreFailed(Event):
    subject: ClassVar[str] = "emrdr.evt.restore.failed"
    outcome: ClassVar[Outcome | None] = "failure"
    backup_id: str | None = None
    error: str


# --- WAL ----------------------------------------------------------------------------------


@register
class WalArchived(Event):
    subject: ClassVar[str] = "emrdr.evt.wal.archived"
    segment: str
    timeline: int | None = None
    bytes_source: int
    bytes_stored: int
    latency_ms: float


@register
class WalArchiveFailed(Event):
    subject: ClassVar[str] = "emrdr.evt.wal.archive_failed"
    outcome: ClassVar[Outcome | None] = "failure"
    segment: str
    error: str


# --- retention and keys -------------------------------------------------------------------


@register
class RetentionEnforced(Event):
    subject: ClassVar[str] = "emrdr.evt.retention.enforced"
    outcome: ClassVar[Outcome | None] = "success"
    dry_run: bool
    backups_removed: list[str] = Field(default_factory=list)
    wal_segments_removed: int = 0
    chunks_removed: int = 0
    bytes_freed: int = 0
    lines: list[str] = Field(
        default_factory=list, description="What was (or would be) removed or kept, and why."
    )


@register
class RetentionFailed(Event):
    subject: ClassVar[str] = "emrdr.evt.retention.failed"
    outcome: ClassVar[Outcome | None] = "failure"
    error: str


@register
class LegalHoldChanged(Event):
    subject: ClassVar[str] = "emrdr.evt.retention.hold_changed"
    outcome: ClassVar[Outcome | None] = "success"
    backup_id: str
    held: bool
    reason: str
    actor: str
    changed: bool = Field(description="False when the backup already was in that state.")


@register
class LegalHoldFailed(Event):
    subject: ClassVar[str] = "emrdr.evt.retention.hold_failed"
    outcome: ClassVar[Outcome | None] = "failure"
    backup_id: str
    error: str


@register
class KeysRotated(Event):
    subject: ClassVar[str] = "emrdr.evt.keys.rotated"
    outcome: ClassVar[Outcome | None] = "success"
    new_key_id: str
    rewrapped: int


@register
class KeyRotationFailed(Event):
    subject: ClassVar[str] = "emrdr.evt.keys.rotation_failed"
    outcome: ClassVar[Outcome | None] = "failure"
    error: str


# --- verification -------------------------------------------------------------------------


class CheckResult(BaseModel):
    """One check of a restore drill or integrity check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    passed: bool
    detail: str = ""


@register
class VerificationStarted(Event):
    subject: ClassVar[str] = "emrdr.evt.verification.started"
    outcome: ClassVar[Outcome | None] = "progress"
    backup_id: str


@register
class VerificationPassed(Event):
    subject: ClassVar[str] = "emrdr.evt.verification.passed"
    outcome: ClassVar[Outcome | None] = "success"
    backup_id: str
    checks: list[CheckResult]
    restore_seconds: float = Field(description="Measured restore time: the RTO evidence.")
    bytes_restored: int
    throughput_mb_s: float
    total_seconds: float | None = Field(
        default=None, description="Whole drill including the checks and cleanup."
    )
    reached: str | None = Field(default=None, description="Recovery point the drill reached.")
    record_key: str | None = Field(
        default=None, description="Repository object holding the sealed verification record."
    )


@register
class VerificationFailed(Event):
    subject: ClassVar[str] = "emrdr.evt.verification.failed"
    outcome: ClassVar[Outcome | None] = "failure"
    backup_id: str | None
    checks: list[CheckResult] = Field(default_factory=list)
    error: str
    restore_seconds: float | None = None
    bytes_restored: int | None = None
    throughput_mb_s: float | None = None
    total_seconds: float | None = None
    record_key: str | None = None


@register
class IntegrityChecked(Event):
    subject: ClassVar[str] = "emrdr.evt.verification.integrity_checked"
    outcome: ClassVar[Outcome | None] = "success"
    comprehensive: bool
    ok: bool
    problems: list[str] = Field(default_factory=list)
    backups: int | None = None
    bad_backups: list[str] = Field(default_factory=list)
    window_from: datetime | None = Field(
        default=None, description="Oldest point-in-time recovery target actually covered."
    )
    duration_s: float | None = None


# --- replication and health ---------------------------------------------------------------


class NodeObservation(BaseModel):
    """What one poll saw of one PostgreSQL node."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    host: str
    port: int
    reachable: bool
    role: Literal["primary", "replica", "unknown"] = "unknown"
    timeline: int | None = None
    current_lsn: str | None = None
    receive_lsn: str | None = None
    replay_lsn: str | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    error: str | None = None


@register
class ClusterObserved(Event):
    """A full poll of the cluster (on demand or periodic)."""

    subject: ClassVar[str] = "emrdr.evt.replication.observed"
    outcome: ClassVar[Outcome | None] = "success"
    nodes: list[NodeObservation]
    primary: str | None


Severity = Literal["ok", "warning", "critical", "emergency"]


@register
class ReplicationLagChanged(Event):
    """Replication lag of a replica crossed a threshold (or cleared)."""

    subject: ClassVar[str] = "emrdr.evt.replication.lag"
    node: str
    severity: Severity
    previous: Severity
    lag_seconds: float | None
    lag_bytes: int | None


@register
class NodeHealthChanged(Event):
    subject: ClassVar[str] = "emrdr.evt.node.health"
    node: str
    healthy: bool
    role: Literal["primary", "replica", "unknown"]
    reason: str


@register
class ArchiveLagChanged(Event):
    """WAL archiving fell behind (RPO exposure) or caught up."""

    subject: ClassVar[str] = "emrdr.evt.archive.lag"
    node: str
    severity: Severity
    previous: Severity
    pending_segments: int
    last_archived: str | None = None
    last_failed: str | None = None


# --- failover and DR ----------------------------------------------------------------------


@register
class FailoverStepCompleted(Event):
    subject: ClassVar[str] = "emrdr.evt.failover.step"
    outcome: ClassVar[Outcome | None] = "progress"
    step: str
    detail: str
    epoch: int


@register
class FailoverCompleted(Event):
    subject: ClassVar[str] = "emrdr.evt.failover.completed"
    outcome: ClassVar[Outcome | None] = "success"
    old_primary: str | None
    new_primary: str
    epoch: int
    reason: str
    duration_s: float


@register
class FailoverFailed(Event):
    subject: ClassVar[str] = "emrdr.evt.failover.failed"
    outcome: ClassVar[Outcome | None] = "failure"
    step: str
    error: str
    epoch: int | None = None


@register
class PrimaryChanged(Event):
    """Applications reconnect to the new primary."""

    subject: ClassVar[str] = "emrdr.evt.primary.changed"
    node: str
    host: str
    port: int
    epoch: int
    previous: str | None = None


@register
class StaffNotified(Event):
    subject: ClassVar[str] = "emrdr.evt.notification.sent"
    channel: Literal["email", "webhook", "page"]
    recipients: list[str] = Field(default_factory=list)
    summary: str
    delivered: bool


@register
class MaintenanceChanged(Event):
    """Applications should pause (active=True) or resume writes."""

    subject: ClassVar[str] = "emrdr.evt.maintenance.changed"
    active: bool
    reason: str


# --- events from other systems ------------------------------------------------------------


@register
class BulkImportCompleted(Event):
    """Published by the EMR application after a bulk import; emrdr answers with a backup."""

    subject: ClassVar[str] = "emrdr.evt.app.bulk_import_completed"
    rows: int = Field(ge=0)
    tables: list[str] = Field(default_factory=list)
    finished_at: datetime | None = None


# --- failover: paging and rejoin (issue #5) ------------------------------------------------


@register
class FailoverPaged(Event):
    """The coordinator will not act automatically and needs a person (published on change)."""

    subject: ClassVar[str] = "emrdr.evt.failover.paged"
    reason: str
    primary: str | None = None
    epoch: int | None = None


@register
class NodeRejoined(Event):
    """A former primary follows the new primary as a replica again."""

    subject: ClassVar[str] = "emrdr.evt.failover.rejoined"
    outcome: ClassVar[Outcome | None] = "success"
    node: str
    primary: str
    method: Literal["pg_rewind", "basebackup", "restart"]
    detail: str
    duration_s: float


@register
class NodeRejoinFailed(Event):
    """A former primary could not be rejoined; it stays fenced and a person is paged."""

    subject: ClassVar[str] = "emrdr.evt.failover.rejoin_failed"
    outcome: ClassVar[Outcome | None] = "failure"
    node: str
    error: str


# --- verification and recovery procedures (issue #4) ---------------------------------------


@register
class IntegrityCheckFailed(Event):
    """The repository integrity check found problems (each bad object, backup and gap named)."""

    subject: ClassVar[str] = "emrdr.evt.verification.integrity_failed"
    outcome: ClassVar[Outcome | None] = "failure"
    comprehensive: bool
    problems: list[str] = Field(default_factory=list)
    bad_backups: list[str] = Field(default_factory=list)
    backups: int | None = None
    window_from: datetime | None = None
    duration_s: float | None = None
    error: str | None = Field(default=None, description="Set when the check could not run.")


@register
class RecoveryStepCompleted(Event):
    """One step of a recovery procedure (table restore, database copy, corruption runbook)
    finished, successfully or not."""

    subject: ClassVar[str] = "emrdr.evt.recovery.step"
    procedure: Literal["database_copy", "table_restore", "recover_corruption"]
    step: str
    ok: bool
    detail: str = ""


@register
class CorruptionRecovered(Event):
    """Scenario 3 finished: the primary runs on data restored to the point in time (or, with
    dry_run, the plan was produced)."""

    subject: ClassVar[str] = "emrdr.evt.recovery.corruption_recovered"
    outcome: ClassVar[Outcome | None] = "success"
    to_time: datetime
    dry_run: bool = False
    backup_id: str | None = None
    reached: str | None = None
    plan: list[str] = Field(default_factory=list)
    damaged_data_dir: str | None = Field(
        default=None, description="Where the damaged data directory was moved (kept)."
    )


@register
class CorruptionRecoveryFailed(Event):
    """Scenario 3 stopped at a failed step; nothing after it was attempted."""

    subject: ClassVar[str] = "emrdr.evt.recovery.corruption_failed"
    outcome: ClassVar[Outcome | None] = "failure"
    to_time: datetime
    step: str
    error: str
