"""Commands: imperative requests published to the COMMANDS work queue (``emrdr.cmd.>``).

Each command is consumed by exactly one service (the one owning its subject prefix).
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field

from emrdr.messages.base import Command, register

BackupKind = Literal["full", "incremental"]


@register
class StartBackup(Command):
    """Take a base backup of the cluster into the repository."""

    subject: ClassVar[str] = "emrdr.cmd.backup.start"
    kind: BackupKind = Field(default="full", description="Full or incremental.")
    verify: bool = Field(default=False, description="Run a restore drill once it completes.")
    retention_days: int | None = Field(
        default=None, ge=1, description="Override the policy's retention for this backup."
    )
    dry_run: bool = Field(default=False, description="Plan only: report what would be copied.")
    source_node: str | None = Field(
        default=None, description="Node to back up from (primary or a standby); default primary."
    )
    schedule: str | None = Field(default=None, description="Schedule that fired it, if any.")


@register
class StartRestore(Command):
    """Restore a backup (optionally to a point in time) into a directory or a database name."""

    subject: ClassVar[str] = "emrdr.cmd.restore.start"
    mode: Literal["full", "pitr"] = "full"
    backup_id: str | None = Field(default=None, description="Backup to restore; None picks one.")
    target_dir: str | None = Field(default=None, description="Empty directory to restore into.")
    target_db: str | None = Field(default=None, description="Database name to restore into.")
    target_time: datetime | None = None
    target_lsn: str | None = None
    target_xid: int | None = None
    target_name: str | None = None
    replace: bool = Field(default=False, description="Replace an existing target database.")


@register
class RestoreTable(Command):
    """Restore one table as of a point in time into a database (optionally under a new name)."""

    subject: ClassVar[str] = "emrdr.cmd.restore.table"
    table: str = Field(description="SCHEMA.TABLE", examples=["public.prescriptions"])
    target_time: datetime
    target_db: str
    as_name: str | None = None


@register
class EnforceRetention(Command):
    """Apply the retention policy; with dry_run, only report what would be removed."""

    subject: ClassVar[str] = "emrdr.cmd.retention.enforce"
    dry_run: bool = False
    schedule: str | None = None


@register
class SetLegalHold(Command):
    """Place (held=True) or lift a legal hold on a backup; a held backup outlives retention."""

    subject: ClassVar[str] = "emrdr.cmd.retention.hold"
    backup_id: str
    held: bool = True
    reason: str = Field(min_length=3, description="Why: case number, request, ...")


@register
class RotateKeys(Command):
    """Create a new data key and rewrap existing ones; old backups stay restorable."""

    subject: ClassVar[str] = "emrdr.cmd.keys.rotate"
    schedule: str | None = None


@register
class StartVerification(Command):
    """Restore drill: prove a backup restores into a working database."""

    subject: ClassVar[str] = "emrdr.cmd.verify.start"
    backup_id: str = Field(default="latest", description="Backup id or 'latest'.")
    schedule: str | None = None


@register
class CheckIntegrity(Command):
    """Check the whole repository: chunks present, objects authenticate, WAL continuous."""

    subject: ClassVar[str] = "emrdr.cmd.verify.integrity"
    comprehensive: bool = False


@register
class ObserveCluster(Command):
    """Poll every PostgreSQL node now and publish what was seen."""

    subject: ClassVar[str] = "emrdr.cmd.monitor.observe"


@register
class PromoteNode(Command):
    """Manual failover: promote NODE to primary (fencing the old one first)."""

    subject: ClassVar[str] = "emrdr.cmd.dr.promote"
    node: str


@register
class Switchover(Command):
    """Planned, lossless change of primary to NODE."""

    subject: ClassVar[str] = "emrdr.cmd.dr.switchover"
    to_node: str


@register
class ActivateDrSite(Command):
    """Seed scenario 2: build a new primary at the DR site from the repository."""

    subject: ClassVar[str] = "emrdr.cmd.dr.activate_site"
    target_dir: str | None = None
    port: int | None = None


@register
class RecoverCorruption(Command):
    """Seed scenario 3: scope, stop applications, restore to a point in time, verify, resume."""

    subject: ClassVar[str] = "emrdr.cmd.dr.recover_corruption"
    to_time: datetime
    dry_run: bool = False


COMMAND_TYPES: tuple[type[Command], ...] = (
    StartBackup,
    StartRestore,
    RestoreTable,
    EnforceRetention,
    SetLegalHold,
    RotateKeys,
    StartVerification,
    CheckIntegrity,
    ObserveCluster,
    PromoteNode,
    Switchover,
    ActivateDrSite,
    RecoverCorruption,
)
