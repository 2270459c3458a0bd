"""The backup-worker's repository gauges over a real local repository with real sealed manifests
(and a plaintext and a foreign-key one planted), read through a real Prometheus registry."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zstandard
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from emrdr.config import RepoSettings, Settings
from emrdr.engine.repository import Repository, open_repository
from emrdr.monitor.repo_gauges import (
    ENCRYPTED_RATIO,
    OLDEST_FULL_AGE,
    BackupSeal,
    RepositoryGauges,
    figures,
    inspect_backup,
)
from emrdr.repo import KeyFileSource
from emrdr.repo.manifest import Manifest, backup_id_for, manifest_copy_key, manifest_key

NOW = datetime.now(UTC).replace(microsecond=0)


def make_manifest(repo: Repository, days_ago: float, kind: str = "full",
                  key_id: str | None = None) -> Manifest:
    stopped = datetime.now(UTC) - timedelta(days=days_ago)  # the gauge measures at scrape time
    return Manifest(
        backup_id=backup_id_for(stopped - timedelta(minutes=5), "full" if kind == "full"
                                else "incremental"),
        kind="full" if kind == "full" else "incremental",
        label="test", started_at=stopped - timedelta(minutes=5), stopped_at=stopped,
        start_lsn="0/2000028", stop_lsn="0/2000100", start_wal="000000010000000000000002",
        stop_wal="000000010000000000000002", timeline=1, system_identifier="7300000000000000001",
        pg_version=15, key_id=key_id or repo.keyring.active.id, chunk_size=4 << 20,
        zstd_level=3, files=[], backup_label="START WAL LOCATION: 0/2000028\n",
    )


def plant_plaintext(repo: Repository, manifest: Manifest) -> None:
    """A manifest stored compressed but not sealed (what an unencrypted backup would leave)."""
    raw = zstandard.ZstdCompressor().compress(manifest.model_dump_json().encode())
    repo.storage.put(manifest_copy_key(manifest.backup_id), raw)
    repo.storage.put(manifest_key(manifest.backup_id), raw)


def samples(registry: CollectorRegistry) -> dict[str, float]:
    text = generate_latest(registry).decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    key = tmp_path / "repo.key"
    KeyFileSource.generate(key)
    return Settings(home=tmp_path / "home", repo=RepoSettings(path=tmp_path / "repo",
                                                               key_file=key))


@pytest.fixture
def repo(settings: Settings) -> Repository:
    return open_repository(settings, create=True)


def test_figures_of_nothing_are_unknown_not_zero() -> None:
    empty = figures([])
    assert (empty.backups, empty.encrypted_ratio, empty.oldest_full_age_s(NOW)) == (0, None, None)


def test_figures_count_encrypted_share_and_oldest_readable_full() -> None:
    day = timedelta(days=1)
    seals = [
        BackupSeal("a", True, "ok", "full", NOW - 10 * day),
        BackupSeal("b", True, "ok", "incremental", NOW - 20 * day),
        BackupSeal("c", False, "does not authenticate"),  # unreadable: no kind, no time
        BackupSeal("d", True, "ok", "full", NOW - 3 * day),
    ]
    f = figures(seals)
    assert f.encrypted_ratio == 0.75
    assert f.oldest_full_age_s(NOW) == 10 * 86400


def test_inspect_tells_sealed_from_plaintext_and_foreign_key(repo: Repository) -> None:
    good = make_manifest(repo, 2)
    repo.write_manifest(good)
    plain = make_manifest(repo, 3)
    plant_plaintext(repo, plain)
    foreign = make_manifest(repo, 4, key_id="dek-from-elsewhere")
    repo.write_manifest(foreign)

    ok = inspect_backup(repo, good.backup_id)
    assert ok is not None and ok.encrypted and ok.kind == "full", ok
    bad = inspect_backup(repo, plain.backup_id)
    assert bad is not None and not bad.encrypted
    assert "does not authenticate" in bad.reason and bad.stopped_at is None
    odd = inspect_backup(repo, foreign.backup_id)
    assert odd is not None and not odd.encrypted and "dek-from-elsewhere" in odd.reason
    assert inspect_backup(repo, "20200101T000000Z-F") is None


def test_gauges_in_the_exposition_follow_the_repository(settings: Settings,
                                                        repo: Repository) -> None:
    registry = CollectorRegistry()
    gauges = RepositoryGauges(settings, registry=registry)
    text = generate_latest(registry).decode()
    assert f"# TYPE {ENCRYPTED_RATIO} gauge" in text and f"# TYPE {OLDEST_FULL_AGE} gauge" in text
    assert samples(registry) == {}, "no figures before the first refresh"

    gauges.refresh()
    assert samples(registry) == {}, "an empty repository has no ratio and no oldest full"

    old_full = make_manifest(repo, 30)
    for m in (old_full, make_manifest(repo, 40, "incremental"), make_manifest(repo, 1)):
        repo.write_manifest(m)
    gauges.refresh()
    got = samples(registry)
    assert got[ENCRYPTED_RATIO] == 1.0
    assert got[OLDEST_FULL_AGE] == pytest.approx(30 * 86400, abs=120)

    plant_plaintext(repo, make_manifest(repo, 50))  # older, but unreadable: not the oldest full
    gauges.refresh()
    got = samples(registry)
    assert got[ENCRYPTED_RATIO] == 0.75
    assert got[OLDEST_FULL_AGE] == pytest.approx(30 * 86400, abs=120)

    for key in (manifest_key(old_full.backup_id), manifest_copy_key(old_full.backup_id)):
        repo.storage.delete(key)  # retention removed it
    gauges.refresh()
    got = samples(registry)
    assert got[ENCRYPTED_RATIO] == pytest.approx(2 / 3)
    assert got[OLDEST_FULL_AGE] == pytest.approx(86400, abs=120)


def test_an_unreadable_repository_drops_the_samples(tmp_path: Path, settings: Settings,
                                                    repo: Repository) -> None:
    repo.write_manifest(make_manifest(repo, 1))
    registry = CollectorRegistry()
    gauges = RepositoryGauges(settings, registry=registry)
    assert gauges.refresh() is not None and ENCRYPTED_RATIO in samples(registry)
    gauges.settings = settings.model_copy(
        update={"repo": settings.repo.model_copy(update={"path": tmp_path / "nowhere"})}
    )
    assert gauges.refresh() is None
    assert samples(registry) == {}


async def test_run_refreshes_at_start_and_when_poked(settings: Settings,
                                                     repo: Repository) -> None:
    registry = CollectorRegistry()
    gauges = RepositoryGauges(settings, registry=registry)
    task = asyncio.create_task(gauges.run(every_s=60.0))
    try:
        for _ in range(100):
            if gauges.current is not None:
                break
            await asyncio.sleep(0.02)
        assert gauges.current is not None and gauges.current.backups == 0
        repo.write_manifest(make_manifest(repo, 5))
        gauges.poke()
        for _ in range(100):
            if gauges.current.backups == 1:
                break
            await asyncio.sleep(0.02)
        assert samples(registry)[OLDEST_FULL_AGE] == pytest.approx(5 * 86400, abs=120)
    finally:
        task.cancel()
