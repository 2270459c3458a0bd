"""Configuration: one settings object from a TOML file and ``EMRDR_*`` environment variables.

Precedence (highest first): environment (``EMRDR_NATS__URL=...``), the TOML file named by
``EMRDR_CONFIG`` (or ``$EMRDR_HOME/emrdr.toml``), defaults.  With no configuration at all the
embedded stack is used: ``emrdr up`` writes ``$EMRDR_HOME/run/stack.json`` and every other
command finds the running NATS server and PostgreSQL nodes through it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from emrdr.failover.settings import CoordinatorSettings, FailoverSettings
from emrdr.notify.settings import NotifySettings
from emrdr.paths import default_home


def default_pg_bindir() -> Path:
    """The PostgreSQL 15 server binaries (``pg_config --bindir``), not all of which are on PATH."""
    env = os.environ.get("EMRDR_PG_BINDIR")
    if env:
        return Path(env)
    for candidate in (Path("/usr/lib/postgresql/15/bin"),):
        if (candidate / "initdb").exists():
            return candidate
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if out:
            return Path(out)
    return Path("/usr/lib/postgresql/15/bin")


class NatsSettings(BaseModel):
    url: str | None = Field(
        default=None, description="NATS URL; unset means the embedded server of `emrdr up`."
    )
    user: str | None = None
    password: str | None = None
    connect_timeout: float = 5.0


class PgNode(BaseModel):
    """One PostgreSQL node emrdr knows about."""

    name: str
    host: str = "127.0.0.1"
    port: int = 5432
    data_dir: Path | None = Field(
        default=None, description="Local data directory, if managed here."
    )
    role: Literal["primary", "replica", "unknown"] = "unknown"


class PgSettings(BaseModel):
    nodes: list[PgNode] = Field(default_factory=list)
    user: str = "postgres"
    password: str | None = None
    database: str = "emr"
    bindir: Path = Field(default_factory=default_pg_bindir)
    os_user: str = Field(
        default="emrdr",
        description="Unprivileged OS user that runs sandbox clusters when emrdr runs as root.",
    )


class RepoSettings(BaseModel):
    kind: Literal["local", "s3"] = "local"
    path: Path | None = Field(
        default=None, description="Local repository; default $EMRDR_HOME/repo"
    )
    s3_endpoint: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_region: str = "us-east-1"
    zstd_level: int = 1  # smaller than level 3 on PostgreSQL data, and twice as fast
    passphrase_env: str = "EMRDR_REPO_PASSPHRASE"
    key_file: Path | None = None


class ScheduleEntry(BaseModel):
    """A cron slot that fires one command."""

    cron: str = Field(description="Five-field cron expression, evaluated in `timezone`.")
    command: Literal["backup_full", "backup_incremental", "verify", "retention", "key_rotation"]
    enabled: bool = True


def default_schedules() -> dict[str, ScheduleEntry]:
    """Defaults from the seed: full daily 02:00, incremental every 4 h, weekly verification,
    daily retention, quarterly key rotation."""
    return {
        "full-daily": ScheduleEntry(cron="0 2 * * *", command="backup_full"),
        "incremental-4h": ScheduleEntry(cron="0 */4 * * *", command="backup_incremental"),
        "verify-weekly": ScheduleEntry(cron="0 5 * * 0", command="verify"),
        "retention-daily": ScheduleEntry(cron="30 3 * * *", command="retention"),
        "key-rotation-quarterly": ScheduleEntry(cron="0 4 1 */3 *", command="key_rotation"),
    }


class SchedulerSettings(BaseModel):
    timezone: str = "UTC"
    schedules: dict[str, ScheduleEntry] = Field(default_factory=default_schedules)
    catch_up: Literal["skip", "latest", "all"] = Field(
        default="latest",
        description="Missed slots after downtime: skip them, fire the latest one, or fire all.",
    )
    max_catch_up: int = Field(default=24, description="Upper bound on slots fired by 'all'.")
    tick_seconds: float = 5.0


class RetentionSettings(BaseModel):
    """Retention from the seed's policy table."""

    full_days: int = 2555
    incremental_days: int = 90
    wal_days: int = 30
    gfs_daily: int = Field(default=0, description="Also keep the newest full of each of N days.")
    gfs_weekly: int = Field(default=0, description="... of each of the last N ISO weeks.")
    gfs_monthly: int = Field(default=0, description="... of each of the last N months.")
    gfs_yearly: int = Field(default=0, description="... of each of the last N years.")


class ThresholdSettings(BaseModel):
    """Replication lag thresholds from the seed's alert table, in seconds."""

    lag_warning_s: float = 300.0
    lag_critical_s: float = 600.0
    lag_emergency_s: float = 1800.0
    storage_warning_pct: float = 80.0
    storage_critical_pct: float = 90.0
    storage_emergency_pct: float = 95.0


class ServiceSettings(BaseModel):
    heartbeat_seconds: float = 5.0
    heartbeat_ttl_seconds: float = 20.0
    max_deliver: int = 5
    retry_backoff_s: float = Field(
        default=2.0, description="First NAK delay after a handler error; doubles, capped at 30 s."
    )
    ack_wait_seconds: float = 600.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, description="0 picks a free port.")


def _config_file() -> Path | None:
    env = os.environ.get("EMRDR_CONFIG")
    if env:
        return Path(env)
    candidate = default_home() / "emrdr.toml"
    return candidate if candidate.exists() else None


class _TomlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_file()
        if path is None:
            return {}
        if not path.exists():
            raise FileNotFoundError(f"EMRDR_CONFIG names {path}, which does not exist")
        with path.open("rb") as fh:
            return tomllib.load(fh)


class Settings(BaseSettings):
    """Everything emrdr reads from its environment, in one place."""

    model_config = SettingsConfigDict(
        env_prefix="EMRDR_", env_nested_delimiter="__", extra="ignore"
    )

    home: Path = Field(default_factory=default_home)
    nats: NatsSettings = Field(default_factory=NatsSettings)
    pg: PgSettings = Field(default_factory=PgSettings)
    repo: RepoSettings = Field(default_factory=RepoSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    thresholds: ThresholdSettings = Field(default_factory=ThresholdSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    failover: FailoverSettings = Field(default_factory=FailoverSettings)
    coordinator: CoordinatorSettings = Field(default_factory=CoordinatorSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    actor: str = Field(default_factory=lambda: os.environ.get("USER", "operator"))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))

    # --- derived locations -------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def stack_file(self) -> Path:
        return self.run_dir / "stack.json"

    @property
    def repo_path(self) -> Path:
        return self.repo.path or (self.home / "repo")

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.home / "outbox"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    def stack_state(self) -> dict[str, Any] | None:
        """What a running ``emrdr up`` published about itself, if anything."""
        try:
            data: dict[str, Any] = json.loads(self.stack_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data

    def resolved_nats_url(self) -> str:
        """Configured NATS URL, else the embedded one of a running stack."""
        if self.nats.url:
            return self.nats.url
        state = self.stack_state()
        if state and state.get("nats_url"):
            return str(state["nats_url"])
        raise LookupError(
            "no NATS server configured and no running stack found: start one with `emrdr up` "
            f"(state directory {self.home}) or set EMRDR_NATS__URL"
        )

    def resolved_pg_nodes(self) -> list[PgNode]:
        """Configured nodes, else those of the embedded stack."""
        if self.pg.nodes:
            return list(self.pg.nodes)
        state = self.stack_state()
        if state:
            return [PgNode.model_validate(n) for n in state.get("pg_nodes", [])]
        return []


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reload_settings() -> Settings:
    get_settings.cache_clear()
    return get_settings()
