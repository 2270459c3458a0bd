"""One facade over the repository: storage + key ring + chunk store + manifests + WAL objects.

Every engine module (backup, WAL, restore, retention, verify) opens the repository through
:func:`open_repository` and reads and writes manifests and WAL only through this class, so the
layout in :mod:`emrdr.repo.manifest` is used in exactly one place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import zstandard

from emrdr.config import Settings
from emrdr.repo import (
    ChunkStore,
    IntegrityError,
    KeyFileSource,
    KeyRing,
    KeySource,
    ObjectNotFound,
    PassphraseSource,
    Storage,
    aad_for,
    open_sealed,
    open_storage,
    seal,
)
from emrdr.repo.manifest import (
    Manifest,
    hold_key,
    manifest_copy_key,
    manifest_key,
    started_key,
    wal_key,
)


class NoRepositoryKey(RuntimeError):
    """No key source is configured for the repository."""


def sandbox_key_file(settings: Settings) -> Path:
    return settings.keys_dir / "repo.key"


def key_source(settings: Settings) -> KeySource:
    """The key-encryption key source: configured key file, passphrase variable, or the
    sandbox key file that ``emrdr up`` creates."""
    repo = settings.repo
    if repo.key_file is not None:
        return KeyFileSource(repo.key_file)
    if os.environ.get(repo.passphrase_env):
        return PassphraseSource.from_env(repo.passphrase_env)
    sandbox = sandbox_key_file(settings)
    if sandbox.exists():
        return KeyFileSource(sandbox)
    raise NoRepositoryKey(
        f"no repository key: set {repo.passphrase_env} or repo.key_file "
        f"(the embedded stack creates {sandbox})"
    )


def ensure_sandbox_key(settings: Settings) -> Path:
    path = sandbox_key_file(settings)
    if not path.exists() and settings.repo.key_file is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        KeyFileSource.generate(path)
    return path


@dataclass
class Repository:
    storage: Storage
    keyring: KeyRing
    chunks: ChunkStore

    # --- manifests ----------------------------------------------------------------------
    def write_manifest(self, manifest: Manifest) -> None:
        """Seal and store the manifest twice; the first copy's presence completes the backup.

        The copy is written first, so a listed (complete) backup always has both.
        """
        raw = zstandard.ZstdCompressor(level=3).compress(manifest.model_dump_json().encode())
        aad = aad_for("manifest", manifest.backup_id)
        blob = seal(self.keyring.active, raw, aad)
        self.storage.put(manifest_copy_key(manifest.backup_id), blob)
        self.storage.put(manifest_key(manifest.backup_id), blob)

    def read_manifest(self, backup_id: str) -> Manifest:
        """The manifest, from the first copy that authenticates; names both failures if none."""
        errors: list[str] = []
        for key in (manifest_key(backup_id), manifest_copy_key(backup_id)):
            try:
                blob = self.storage.get(key)
                raw = open_sealed(self.keyring, blob, aad_for("manifest", backup_id))
                return Manifest.model_validate_json(zstandard.ZstdDecompressor().decompress(raw))
            except (ObjectNotFound, IntegrityError) as exc:
                errors.append(f"{key}: {exc}")
        if all("not found" in e.lower() for e in errors):
            raise ObjectNotFound(manifest_key(backup_id), "repository")
        raise IntegrityError("manifest", backup_id, "; ".join(errors))

    def backup_ids(self) -> list[str]:
        """Ids of complete backups (those with a manifest), oldest first."""
        ids = {k.split("/")[1] for k in self.storage.list("backups/") if k.endswith("/manifest")}
        return sorted(ids)

    def incomplete_backup_ids(self) -> list[str]:
        """Backups that started but never wrote a manifest (running, failed or killed)."""
        started = {k.split("/")[1] for k in self.storage.list("backups/") if k.endswith("/started")}
        return sorted(started - set(self.backup_ids()))

    def mark_started(self, backup_id: str, info: dict[str, object]) -> None:
        aad = aad_for("started", backup_id)
        self.storage.put(
            started_key(backup_id), seal(self.keyring.active, json.dumps(info).encode(), aad)
        )

    def is_held(self, backup_id: str) -> bool:
        return self.storage.exists(hold_key(backup_id))

    # --- WAL ----------------------------------------------------------------------------
    def put_wal(self, name: str, data: bytes) -> bool:
        """Store a WAL file (compressed, sealed); True if new. Same name, other content -> error
        from the storage's immutability, surfaced by the caller."""
        raw = zstandard.ZstdCompressor(level=1).compress(data)
        blob = seal(self.keyring.active, raw, aad_for("wal", name))
        return self.storage.put(wal_key(name), blob)

    def get_wal(self, name: str) -> bytes:
        blob = self.storage.get(wal_key(name))
        raw = open_sealed(self.keyring, blob, aad_for("wal", name))
        return zstandard.ZstdDecompressor().decompress(raw)

    def has_wal(self, name: str) -> bool:
        return self.storage.exists(wal_key(name))

    def wal_names(self, timeline: int | None = None) -> list[str]:
        prefix = f"wal/{timeline:08X}/" if timeline is not None else "wal/"
        return [k.rsplit("/", 1)[1] for k in self.storage.list(prefix)]


def open_repository(settings: Settings, create: bool = False) -> Repository:
    """Open (or with ``create``, initialise) the configured repository."""
    storage = open_storage(settings)
    source = key_source(settings)
    if KeyRing.exists(storage):
        ring = KeyRing.open(storage, source)
    elif create:
        ring = KeyRing.init(storage, source)
    else:
        raise ObjectNotFound("keys/", f"repository {storage.describe()} is not initialised")
    return Repository(storage, ring, ChunkStore(storage, ring, zstd_level=settings.repo.zstd_level))
