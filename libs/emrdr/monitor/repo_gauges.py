"""Repository-derived gauges of the backup-worker: encrypted share and oldest full backup age.

``emrdr_backup_encrypted_ratio`` is the share of the repository's complete backups (those with a
manifest) whose manifest is *verifiably* encrypted: it opens with AES-256-GCM under a data key
of the key ring and the key id it records (``Manifest.key_id``) is a key of the ring. A manifest
that fails authentication (plaintext, tampered, sealed by a foreign key) counts as not
encrypted. ``emrdr_retention_oldest_full_age_seconds`` is now minus ``stopped_at`` of the
oldest full backup whose manifest reads, measured at scrape time. With no backups (or no
readable full backup) the gauge has no sample rather than a made-up value; a refresh that
cannot read the repository leaves both without samples until the next refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from emrdr.config import Settings
from emrdr.engine.repository import Repository, open_repository
from emrdr.repo import IntegrityError, ObjectNotFound, UnknownDataKey

log = logging.getLogger(__name__)

ENCRYPTED_RATIO = "emrdr_backup_encrypted_ratio"
OLDEST_FULL_AGE = "emrdr_retention_oldest_full_age_seconds"
ENCRYPTED_HELP = (
    "Share (0-1) of complete backups whose manifest authenticates under AES-256-GCM with a "
    "data key of the key ring and records that key id; absent when the repository has none"
)
OLDEST_FULL_HELP = (
    "Seconds since stopped_at of the oldest full backup whose manifest reads; absent when "
    "there is none"
)


@dataclass(frozen=True)
class BackupSeal:
    """What one complete backup's manifest shows: encrypted or not, and why."""

    backup_id: str
    encrypted: bool
    reason: str
    kind: str | None = None
    stopped_at: datetime | None = None


@dataclass(frozen=True)
class RepoFigures:
    """The figures behind the gauges; None where there is nothing to measure."""

    backups: int
    encrypted_ratio: float | None
    oldest_full_stopped_at: datetime | None

    def oldest_full_age_s(self, now: datetime) -> float | None:
        if self.oldest_full_stopped_at is None:
            return None
        return max(0.0, (now - self.oldest_full_stopped_at).total_seconds())


def inspect_backup(repo: Repository, backup_id: str) -> BackupSeal | None:
    """Whether ``backup_id``'s manifest is verifiably encrypted; None if it vanished (retention)."""
    try:
        manifest = repo.read_manifest(backup_id)
    except ObjectNotFound:
        return None
    except (IntegrityError, ValueError) as exc:
        return BackupSeal(backup_id, False, f"manifest does not authenticate: {exc}")
    try:
        repo.keyring.data_key(manifest.key_id)
    except UnknownDataKey:
        return BackupSeal(
            backup_id, False, f"manifest records data key {manifest.key_id!r}, not in the ring",
            manifest.kind, manifest.stopped_at,
        )
    return BackupSeal(
        backup_id, True, f"sealed under data key {manifest.key_id}",
        manifest.kind, manifest.stopped_at,
    )


def figures(seals: Sequence[BackupSeal]) -> RepoFigures:
    """Encrypted share and oldest readable full backup of the inspected backups."""
    encrypted = sum(s.encrypted for s in seals)
    fulls = [s.stopped_at for s in seals if s.kind == "full" and s.stopped_at is not None]
    return RepoFigures(
        backups=len(seals),
        encrypted_ratio=encrypted / len(seals) if seals else None,
        oldest_full_stopped_at=min(fulls) if fulls else None,
    )


class RepositoryGauges(Collector):
    """Collector for both gauges; :meth:`refresh` re-reads the repository.

    Authenticated manifests are cached by backup id (objects are immutable), so a refresh reads
    only new backups and re-checks the ones that failed before.
    """

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.current: RepoFigures | None = None
        self._verified: dict[str, BackupSeal] = {}
        self._wake = asyncio.Event()
        if registry is not None:
            registry.register(self)

    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily(ENCRYPTED_RATIO, ENCRYPTED_HELP),
            GaugeMetricFamily(OLDEST_FULL_AGE, OLDEST_FULL_HELP),
        ]

    def collect(self) -> Iterator[Metric]:
        current = self.current
        ratio = GaugeMetricFamily(ENCRYPTED_RATIO, ENCRYPTED_HELP)
        age = GaugeMetricFamily(OLDEST_FULL_AGE, OLDEST_FULL_HELP)
        if current is not None and current.encrypted_ratio is not None:
            ratio.add_metric([], current.encrypted_ratio)
        age_s = current.oldest_full_age_s(datetime.now(UTC)) if current is not None else None
        if age_s is not None:
            age.add_metric([], age_s)
        yield ratio
        yield age

    def refresh_from(self, repo: Repository) -> RepoFigures:
        """Inspect every complete backup of ``repo`` and publish the figures."""
        seals: list[BackupSeal] = []
        for backup_id in repo.backup_ids():
            seal = self._verified.get(backup_id) or inspect_backup(repo, backup_id)
            if seal is None:
                continue
            if not seal.encrypted:
                log.warning("backup %s is not verifiably encrypted: %s", backup_id, seal.reason)
            seals.append(seal)
        self._verified = {s.backup_id: s for s in seals if s.encrypted}
        self.current = figures(seals)
        return self.current

    def refresh(self) -> RepoFigures | None:
        """Open the configured repository and refresh; on failure the gauges lose their
        samples (logged) rather than keep stale values."""
        try:
            return self.refresh_from(open_repository(self.settings))
        except Exception as exc:
            log.warning("repository gauges not refreshed: %s", exc)
            self.current = None
            return None

    def poke(self) -> None:
        """Ask :meth:`run` to refresh now (after a backup or retention)."""
        self._wake.set()

    async def run(self, every_s: float = 900.0) -> None:
        """Refresh at start, whenever poked, and at least every ``every_s`` seconds."""
        while True:
            self._wake.clear()
            started = time.monotonic()
            await asyncio.to_thread(self.refresh)
            log.debug("repository gauges refreshed in %.2fs", time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), every_s)
