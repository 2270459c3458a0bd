"""Settings of the failure detector and of candidate choice (defaults reach kill -9 to a
writable new primary in well under 10 s with 1 s polls)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MIB = 1024 * 1024

FenceMode = Literal["read_only", "stop", "hook"]


class FailoverSettings(BaseModel):
    """How a failure is judged and which replica may be promoted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    poll_interval_s: float = Field(default=1.0, gt=0, description="Seconds between health polls.")
    failures_required: int = Field(
        default=3, ge=1, description="Consecutive failed checks before a primary is failed."
    )
    window_s: float = Field(
        default=2.0,
        ge=0,
        description="The failed checks must span at least this many seconds (first to last).",
    )
    stale_after_s: float = Field(
        default=10.0,
        gt=0,
        description="A monitor whose newest observation is older than this has no vote.",
    )
    expected_monitors: int | None = Field(
        default=None,
        ge=1,
        description="Monitors that should report; quorum is a majority of this (or of those seen).",
    )
    alert_max_age_s: float = Field(
        default=300.0,
        gt=0,
        description="A firing alert older than this no longer raises suspicion.",
    )
    max_lag_bytes: int = Field(
        default=16 * MIB, ge=0, description="A replica further behind may not be promoted."
    )
    sync_mode: bool = Field(
        default=False, description="Only a synchronous standby may be promoted (RPO 0)."
    )
    fence_mode: FenceMode = "read_only"
    fence_hook: str | None = Field(
        default=None,
        description="Operator fencing command (mode 'hook'); node facts in EMRDR_FENCE_*.",
    )
    lease_ttl_s: float = Field(default=10.0, gt=0, description="TTL of the coordinator lease.")


class CoordinatorSettings(BaseModel):
    """The dr-coordinator process: lease, Alertmanager endpoint, what follows a failover."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lease_bucket: str = Field(
        default="emrdr_leases", description="KV bucket of the lease (its TTL is the bucket's)."
    )
    lease_key: str = "coordinator"
    alertmanager_host: str = "127.0.0.1"
    alertmanager_port: int | None = Field(
        default=0, description="Port of POST /alertmanager; 0 picks a free one, None disables it."
    )
    alertmanager_token: str | None = Field(
        default=None, description="Bearer token Alertmanager must send (unset: none required)."
    )
    auto_rejoin: bool = Field(
        default=True, description="Rejoin a failed-over primary as a replica when it returns."
    )
    backup_after_failover: bool = Field(
        default=True, description="Issue StartBackup(kind=full) after a new primary is up."
    )
    manage_sync_standbys: bool = Field(
        default=True,
        description="In sync mode, keep synchronous_standby_names = ANY 1 (replicas) on the "
        "primary.",
    )
